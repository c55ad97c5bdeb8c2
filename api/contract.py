"""The /api/v1 contract layer: operations declared once, served, checked and documented.

An :class:`Operation` names its method and path, the permission it needs (or ``PUBLIC``), its
request body, query and response types (msgspec Structs) — the same declaration validates input,
encodes output and generates the OpenAPI document (``api.openapi``). Every operation runs through
:func:`_endpoint`, which applies the contract uniformly:

1. authenticate (unless public) and check the declared permission against ``role_permissions``;
2. read and decode the body: malformed JSON is a 400, a body that does not match the schema a 422
   with field-level details (``{"field": ["message"]}``);
3. run the handler in the thread pool (it blocks on the database), inside one transaction when
   the operation is ``transactional``, with Idempotency-Key handling when it is ``idempotent``;
4. wrap the result in the envelope ``{"data": …, "meta": …}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sync_server.account_tables import role_permissions
from sync_server.authn import AUTHENTICATED, PUBLIC, Identity, authenticate, declare_access
from sync_server.db import run_in_transaction
from sync_server.directory import utcnow
from sync_server.errors import ApiError
from sync_server.ratelimit import RateLimiter, limiter_for
from sync_server.resources import Resources

from . import idempotency

JSON_TYPE = "application/json"
DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 100
#: The largest /api/v1 request body: accounts and staff requests are small.
MAX_BODY_BYTES = 64 * 1024

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Reply:
    """What a handler returns: ``data`` (a Struct, list or None), optional ``meta``, status."""

    data: Any = None
    meta: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Page:
    """Cursor pagination parameters of a list request (``?cursor=&limit=``)."""

    after: Any
    limit: int

    def meta(self, rows: list[Any], key: Callable[[Any], Any]) -> tuple[list[Any], dict[str, Any]]:
        """Trim the look-ahead row (handlers fetch ``limit + 1``) and build the page meta."""
        more = len(rows) > self.limit
        rows = rows[: self.limit]
        cursor = encode_cursor(key(rows[-1])) if more and rows else None
        return rows, {"next_cursor": cursor, "limit": self.limit}


@dataclass
class Context:
    """Everything a handler may use about the request being served."""

    request: Request
    resources: Resources
    identity: Identity | None
    ip: str
    now: datetime
    path: dict[str, str]
    query: Any = None
    page: Page | None = None

    @property
    def user(self) -> Identity:
        assert self.identity is not None, "public operations have no identity"
        return self.identity

    @property
    def limiter(self) -> RateLimiter:
        return limiter_for(self.resources)


@dataclass
class Operation:
    method: str
    path: str
    handler: Handler
    access: str
    summary: str
    tag: str
    body: Any = None
    response: Any = None
    status: int = 200
    query: Any = None
    paginated: bool = False
    transactional: bool = False
    idempotent: bool = False
    #: Body fields that exist elsewhere but may not be sent here (a 422 naming them).
    forbidden_fields: tuple[str, ...] = ()
    errors: tuple[int, ...] = ()

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


class Api:
    """The registry of operations of one API version."""

    def __init__(self) -> None:
        self.operations: list[Operation] = []

    def operation(
        self, method: str, path: str, *, access: str, summary: str, tag: str, **options: Any
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            op = Operation(method, path, handler, access, summary, tag, **options)
            if op.idempotent and not op.transactional:
                raise ValueError("idempotent operations must be transactional")
            self.operations.append(op)
            return handler

        return register

    def routes(self) -> list[Route]:
        methods: dict[str, set[str]] = {}
        for op in self.operations:
            methods.setdefault(op.path, {"HEAD"} if op.method == "GET" else set()).add(op.method)
        return [
            _OperationRoute(op.path, _endpoint(op), methods=[op.method], allow=methods[op.path])
            for op in self.operations
        ]


class _OperationRoute(Route):
    """One operation's route. Operations sharing a path are separate routes, so a 405 must name
    every method of the path in ``Allow``, not only this route's."""

    def __init__(self, path: str, endpoint: Any, *, methods: list[str], allow: set[str]) -> None:
        super().__init__(path, endpoint, methods=methods)
        self.allow = ", ".join(sorted(allow))

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            raise HTTPException(status_code=405, headers={"Allow": self.allow})
        await super().handle(scope, receive, send)


# --- helpers used by handlers ----------------------------------------------------------------


def now_for(resources: Resources) -> datetime:
    """The current UTC time; tests may install a clock in ``resources.extras["clock"]``."""
    clock = resources.extras.get("clock")
    return clock() if clock is not None else utcnow()  # type: ignore[no-any-return]


def client_ip(request: Request, resources: Resources) -> str:
    if resources.settings.trust_proxy_headers:
        forwarded = request.headers.get("x-forwarded-for", "")
        first = forwarded.split(",")[0].strip()
        if first:
            return first[:64]
    return request.client.host if request.client else "unknown"


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Any:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ApiError(
            422, "validation_error", "Invalid cursor.", {"cursor": ["invalid"]}
        ) from None


def permissions_for(conn: Connection, role: str) -> frozenset[str]:
    return frozenset(
        conn.execute(
            select(role_permissions.c.permission).where(role_permissions.c.role == role)
        ).scalars()
    )


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"No such {what}.")


# --- the uniform endpoint ----------------------------------------------------------------------


_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def _validation_error(exc: msgspec.ValidationError, where: str = "body") -> ApiError:
    text = str(exc)
    key = "_"
    if " - at `" in text:
        text, _, at = text.rpartition(" - at `")
        key = at.rstrip("`").removeprefix("$").lstrip(".") or "_"
    # msgspec reports a missing field at the object holding it: name the field itself, so
    # the client can show the message next to it ("Object missing required field `email`").
    missing = _MISSING_FIELD.search(text)
    if missing is not None:
        name = missing.group(1)
        key = f"{key}.{name}" if key != "_" else name
        text = "required"
    return ApiError(422, "validation_error", f"The request {where} is not valid.", {key: [text]})


def _check_fields(op: Operation, raw: Any) -> None:
    if not isinstance(raw, dict):
        raise ApiError(
            422, "validation_error", "The request body must be a JSON object.", {"_": ["object"]}
        )
    known = set(op.body.__struct_fields__)
    details: dict[str, list[str]] = {}
    for name in raw:
        if name in op.forbidden_fields:
            details[str(name)] = ["cannot be changed here"]
        elif name not in known:
            details[str(name)] = ["unknown field"]
    if details:
        raise ApiError(422, "validation_error", "The request body has invalid fields.", details)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"The body exceeds {MAX_BODY_BYTES} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "payload_too_large", f"The body exceeds {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_body(op: Operation, content_type: str, body: bytes) -> tuple[Any, Any]:
    """(typed body, the decoded JSON value) — the latter keys idempotency."""
    if op.body is None:
        return None, None
    if content_type.split(";")[0].strip().lower() != JSON_TYPE:
        raise ApiError(415, "unsupported_media_type", "Send application/json.")
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_body", f"The body is not valid JSON: {exc}") from None
    _check_fields(op, raw)
    try:
        return msgspec.convert(raw, type=op.body), raw
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None


def _decode_query(op: Operation, request: Request) -> tuple[Any, Page | None]:
    params = dict(request.query_params)
    page = None
    if op.paginated:
        limit_text = params.pop("limit", None)
        cursor = params.pop("cursor", None)
        limit = DEFAULT_PAGE_SIZE
        if limit_text is not None:
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE_SIZE:
                raise ApiError(
                    422,
                    "validation_error",
                    "The query is not valid.",
                    {"limit": [f"must be an integer from 1 to {MAX_PAGE_SIZE}"]},
                )
            limit = int(limit_text)
        page = Page(decode_cursor(cursor) if cursor else None, limit)
    known = set(op.query.__struct_fields__) if op.query is not None else set()
    unknown = sorted(name for name in params if name not in known)
    if unknown:
        raise ApiError(
            422,
            "validation_error",
            "The query is not valid.",
            {name or "_": ["unknown query parameter"] for name in unknown},
        )
    query = None
    if op.query is not None:
        try:
            query = msgspec.convert(
                {k: v for k, v in params.items() if k in known}, type=op.query, strict=False
            )
        except msgspec.ValidationError as exc:
            raise _validation_error(exc, "query") from None
    return query, page


def _authorize(op: Operation, request: Request, resources: Resources) -> Identity | None:
    if op.access == PUBLIC:
        return None
    identity = authenticate(request)
    if op.access == AUTHENTICATED:
        return identity
    with resources.engine.connect() as conn:
        granted = permissions_for(conn, identity.role.value)
        conn.rollback()
    if op.access not in granted:
        raise ApiError(
            403, "forbidden", "Your role does not allow this.", {"_": [f"requires {op.access}"]}
        )
    return identity


def envelope(reply: Reply) -> Response:
    if reply.status == 204:
        return Response(status_code=204, headers=reply.headers)
    body: dict[str, Any] = {"data": reply.data, "meta": reply.meta}
    return Response(
        msgspec.json.encode(body),
        status_code=reply.status,
        media_type=JSON_TYPE,
        headers=reply.headers,
    )


def _as_reply(result: Any, op: Operation) -> Reply:
    return result if isinstance(result, Reply) else Reply(result, status=op.status)


def _run(op: Operation, ctx: Context, body: Any) -> Reply:
    if not op.transactional:
        return _as_reply(op.handler(ctx, body), op)
    return run_in_transaction(
        ctx.resources.engine, lambda conn: _as_reply(op.handler(ctx, body, conn), op)
    )


def _run_idempotent(op: Operation, ctx: Context, body: Any, raw: Any, key: str) -> Response:
    scope = ctx.identity.user_id if ctx.identity else f"ip:{ctx.ip}"
    request_hash = idempotency.request_hash(op.method, ctx.request.url.path, raw)
    engine = ctx.resources.engine
    replay = idempotency.begin(engine, scope, key, request_hash, ctx.now)
    if replay is not None:
        return Response(
            replay.body,
            status_code=replay.status,
            media_type=JSON_TYPE if replay.body else None,
            headers={"Idempotent-Replayed": "true"},
        )

    def work(conn: Connection) -> Response:
        response = envelope(_as_reply(op.handler(ctx, body, conn), op))
        idempotency.complete(conn, scope, key, response.status_code, bytes(response.body))
        return response

    try:
        return run_in_transaction(engine, work)
    except ApiError as error:
        # The handler refused (its effects rolled back): that answer is the key's answer too.
        rendered = msgspec.json.encode(error.body())
        idempotency.complete_alone(engine, scope, key, error.status, rendered)
        raise
    except BaseException:
        # Nothing was done: free the key so the client's retry can run.
        idempotency.abandon(engine, scope, key)
        raise


def _endpoint(op: Operation) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        resources: Resources = request.app.state.resources
        identity = await run_in_threadpool(_authorize, op, request, resources)
        query, page = _decode_query(op, request)
        raw_body = await _read_body(request) if op.body is not None else b""
        body, raw = _decode_body(op, request.headers.get("content-type", ""), raw_body)
        ctx = Context(
            request=request,
            resources=resources,
            identity=identity,
            ip=client_ip(request, resources),
            now=now_for(resources),
            path={k: str(v) for k, v in request.path_params.items()},
            query=query,
            page=page,
        )
        key = request.headers.get("idempotency-key")
        if op.idempotent and key is not None:
            idempotency.check_key(key)
            return await run_in_threadpool(_run_idempotent, op, ctx, body, raw, key)
        reply = await run_in_threadpool(_run, op, ctx, body)
        return envelope(reply)

    endpoint.__name__ = op.operation_id
    endpoint.__doc__ = op.summary
    declare_access(op.access, endpoint)
    return endpoint
