"""HTTP endpoints of the sync protocol: ``/sync/v1/devices``, ``/push`` and ``/pull``.

Thin: decode and validate the message, authenticate, run the engine in the thread pool (it
blocks on the database), encode the answer in the representation the client asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from domain.catalog import default_registry
from sync_protocol import messages as m
from sync_protocol.codec import JSON, MSGPACK

from .authn import Identity, authenticate, load_identity, verified_claims
from .db import read_transaction, run_in_transaction
from .directory import DeviceOwnedElsewhere, DeviceRefused, register_device
from .errors import ApiError
from .pull import PullOut, ResetRequired, pull, visible_scopes
from .push_group import PushUnit
from .ratelimit import limiter_for
from .resources import Resources

T = TypeVar("T")
REGISTRY = default_registry()


def _media_types(request: Request) -> tuple[str, str]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in (MSGPACK, JSON):
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send application/msgpack or application/json.",
        )
    accept = request.headers.get("accept", "")
    if MSGPACK in accept and JSON not in accept:
        response_type = MSGPACK
    elif JSON in accept and MSGPACK not in accept:
        response_type = JSON
    else:
        response_type = content_type
    return content_type, response_type


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"The request body exceeds {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"The request body exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_error(exc: msgspec.ValidationError) -> ApiError:
    text = str(exc)
    # msgspec says "... - at `$.change_sets[0].seq`": keep the path as the detail key.
    path = "_"
    if " - at `" in text:
        text, _, where = text.rpartition(" - at `")
        path = where.rstrip("`")
    return ApiError(
        422, "validation_error", "The message does not match the protocol.", {path: [text]}
    )


async def _decode(request: Request, type_: type[T]) -> tuple[T, str]:
    content_type, response_type = _media_types(request)
    resources: Resources = request.app.state.resources
    body = await _read_body(request, resources.settings.max_request_bytes)
    try:
        if content_type == MSGPACK:
            message = msgspec.msgpack.decode(body, type=type_)
        else:
            message = msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        # A client speaking another major version may send another shape altogether: tell it
        # to upgrade (426) rather than list what its message lacks.
        _check_protocol(_peek_protocol(body, content_type))
        raise _validation_error(exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # MessagePack strings that are not UTF-8 surface as UnicodeDecodeError, absurd nesting
        # as RecursionError: malformed bodies all the same, never a 500.
        raise ApiError(
            400, "malformed_body", f"The body is not valid {content_type}: {exc}"
        ) from None
    _check_protocol(getattr(message, "protocol", ""))
    return message, response_type


class _Envelope(msgspec.Struct):
    """Just the protocol version of any message (every other field ignored)."""

    protocol: str | None = None


def _peek_protocol(body: bytes, content_type: str) -> str | None:
    try:
        if content_type == MSGPACK:
            return msgspec.msgpack.decode(body, type=_Envelope).protocol
        return msgspec.json.decode(body, type=_Envelope).protocol
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None


def _check_protocol(version: str | None) -> None:
    if version is None:
        return  # no version to judge: the schema error says what is missing
    major = version.split(".", 1)[0]
    if major != m.PROTOCOL_VERSION.split(".", 1)[0]:
        raise ApiError(
            426,
            "upgrade_required",
            f"Protocol {version!r} is not supported; this server speaks {m.PROTOCOL_VERSION}. "
            "Update the app.",
            {"protocol": [f"supported: {m.PROTOCOL_VERSION}"]},
        )


def _encode(message: Any, media_type: str, status: int = 200) -> Response:
    body = (
        msgspec.msgpack.encode(message) if media_type == MSGPACK else msgspec.json.encode(message)
    )
    return Response(body, status_code=status, media_type=media_type)


def _device_refused(*, unregistered: bool) -> ApiError:
    if unregistered:
        return ApiError(404, "device_not_registered", "Register this device before syncing.")
    return ApiError(403, "device_forbidden", "This device does not belong to the signed-in user.")


async def _run(request: Request, fn: Callable[[], T], *, read: bool = False) -> T:
    resources: Resources = request.app.state.resources
    return await resources.run_blocking(fn, read=read)


def _throttle(resources: Resources, user_id: str) -> None:
    """Count one /sync/v1 request of ``user_id`` (429 past ``GALLEY_SYNC_RATE_LIMIT``). Called
    in the worker thread: with Redis it is a network call."""
    limiter = limiter_for(resources)
    limiter.throttle(limiter.policy.sync_per_user, "sync", user_id)


async def register(request: Request) -> Response:
    """Register a device under the signed-in user (idempotent)."""
    # Who is asking comes first: an anonymous client learns nothing about its message.
    _media_types(request)
    claims = verified_claims(request)

    def who() -> Identity:
        _throttle(request.app.state.resources, claims.user_id)
        return authenticate(request)

    identity = await _run(request, who)
    message, response_type = await _decode(request, m.RegisterDevice)
    resources: Resources = request.app.state.resources
    device_id = message.device_id.lower()
    home = (
        sorted(identity.branch_ids)[0]
        if len(identity.branch_ids) >= 1 and identity.role != "admin"
        else None
    )

    def work() -> int:
        return run_in_transaction(
            resources.engine,
            lambda conn: register_device(
                conn,
                device_id=device_id,
                user_id=identity.user_id,
                branch_id=home,
                platform=message.platform,
                app_version=message.app_version,
            ),
        )

    try:
        last = await _run(request, work)
    except DeviceOwnedElsewhere:
        raise ApiError(
            409, "device_owned_by_other_user", "This device id belongs to another user."
        ) from None
    info = m.DeviceInfo(
        protocol=m.PROTOCOL_VERSION,
        device_id=device_id,
        user_id=identity.user_id,
        last_applied_seq=last,
        scopes=visible_scopes(identity.role, identity.branch_ids),
    )
    return _encode(info, response_type)


async def push_endpoint(request: Request) -> Response:
    """Apply a batch of change-sets (docs/protocol.md § Push)."""
    # Who is asking comes first: an anonymous client learns nothing about its message.
    _media_types(request)
    claims = verified_claims(request)
    message, response_type = await _decode(request, m.PushRequest)
    resources: Resources = request.app.state.resources

    # Applied with the pushes of other devices waiting at the same time (group commit), in a
    # transaction that also reads the user's current state (deactivated, signed out) and
    # checks the device under its row lock (push step 1).
    unit = PushUnit(message.device_id.lower(), message.change_sets, claims)
    try:
        result = await resources.committer.push(
            unit, admit=partial(_throttle, resources, claims.user_id)
        )
    except DeviceRefused as exc:
        raise _device_refused(unregistered=exc.unregistered) from None
    error = None
    if result.refused is not None:
        refusal = _device_refused(unregistered=result.refused.unregistered)
        error = m.ErrorBody(refusal.code, refusal.message, {})
    elif result.gap is not None:
        error = m.ErrorBody(
            "seq_gap",
            f"Change-set seq {result.gap.expected} is the next one expected; resend from there.",
            {"expected_seq": [str(result.gap.expected)]},
        )
    return _encode(
        m.PushResponse(m.PROTOCOL_VERSION, result.outcomes, result.last_applied_seq, error),
        response_type,
    )


async def pull_endpoint(request: Request) -> Response:
    """One page of changes (docs/protocol.md § Pull)."""
    # Who is asking comes first: an anonymous client learns nothing about its message.
    _media_types(request)
    claims = verified_claims(request)
    message, response_type = await _decode(request, m.PullRequest)
    resources: Resources = request.app.state.resources

    def work() -> PullOut:
        # One connection, one snapshot, one thread hop: the user's current state, the device
        # check (404/403, as in push step 1) and the page are all read in the same snapshot.
        _throttle(resources, claims.user_id)
        with read_transaction(resources.engine) as conn:
            identity = load_identity(conn, claims)
            return pull(
                conn,
                device_id=message.device_id.lower(),
                role=identity.role,
                scopes=visible_scopes(identity.role, identity.branch_ids),
                cursors=dict(message.cursors),
                limit=message.limit,
                registry=REGISTRY,
                raw_msgpack=response_type == MSGPACK,
                user_id=identity.user_id,
            )

    try:
        page = await _run(request, work, read=True)
    except DeviceRefused as exc:
        raise _device_refused(unregistered=exc.unregistered) from None
    except ResetRequired as exc:
        raise ApiError(
            409, "reset_required", _RESET_MESSAGES[exc.reason], {"scopes": exc.scopes}
        ) from None
    return _encode(page, response_type)


_RESET_MESSAGES = {
    "behind": "The replica is too old to continue (older than the server's compaction horizon);"
    " discard it and pull from version 0.",
    "ahead": "The replica's cursors are ahead of this server (a replica of another database?);"
    " discard it and pull from version 0.",
    "role": "The user's role changed, and with it the fields the replica may hold; discard it"
    " and pull from version 0.",
}


def routes() -> list[Route]:
    return [
        Route("/devices", register, methods=["POST"]),
        Route("/push", push_endpoint, methods=["POST"]),
        Route("/pull", pull_endpoint, methods=["POST"]),
    ]
