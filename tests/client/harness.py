"""Devices for tests: the reference client over the real app, with a network that fails.

``FlakyHttp`` is Starlette's ``TestClient`` (an ``httpx.Client``) with the failures of a phone's
network added around the real request: offline (the request never leaves), lost responses (the
server processes the request, the answer never arrives), a process killed after the server
answered, or a synthetic 503 from a proxy in front of the server.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from starlette.testclient import TestClient

from sync_protocol.client import Backoff, SyncClient
from tests.factories import Factory, User

BASE_URL = "http://testserver"


class Crash(Exception):
    """The app's process died (not a network error: the sync loop must not catch it)."""


class FlakyHttp(TestClient):
    """A ``TestClient`` whose network can be switched off, lose answers or kill the app."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, base_url=BASE_URL)
        self.offline = False
        #: Answers to lose after the server processed the request (for paths ending in
        #: ``lose_paths``, all paths when None).
        self.lose_next = 0
        self.lose_paths: tuple[str, ...] | None = None
        #: Requests to let through before the network goes down (``offline`` becomes True).
        self.fail_after: int | None = None
        #: Requests to let through before the process dies right after the server's answer.
        self.crash_after: int | None = None
        #: Synthetic 503s a proxy answers before the server is reached.
        self.unavailable_next = 0
        self.sent: list[str] = []
        #: Answers lost so far (the server processed the request; the client never heard).
        self.lost = 0
        #: Called with each request's path before it is sent (to act "during" a sync).
        self.on_send: Callable[[str], None] | None = None

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        path = request.url.path
        if self.on_send is not None:
            self.on_send(path)
        if self.fail_after is not None:
            if self.fail_after <= 0:
                self.offline = True
                self.fail_after = None
            else:
                self.fail_after -= 1
        if self.offline:
            raise httpx.ConnectError("the device is offline", request=request)
        if self.unavailable_next:
            self.unavailable_next -= 1
            return httpx.Response(503, request=request, headers={"Retry-After": "0"})
        response = super().send(request, **kwargs)
        response.read()
        self.sent.append(path)
        if self.crash_after is not None:
            if self.crash_after <= 0:
                self.crash_after = None
                raise Crash(f"process killed after {path} was answered")
            self.crash_after -= 1
        if self.lose_next and (self.lose_paths is None or path.endswith(self.lose_paths)):
            self.lose_next -= 1
            self.lost += 1
            raise httpx.ReadError("connection reset before the answer arrived", request=request)
        return response


def mark_sold_out(args: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Local effect of the ``menu.mark_sold_out`` intent (the server decides for real)."""
    return {("menu_items", str(args["menu_item_id"])): {"available": False}}


INTENTS = {"menu.mark_sold_out": mark_sold_out}


class TokenSource:
    """Hands out tokens for a user, counting refreshes; ``expired_first`` starts stale."""

    def __init__(self, factory: Factory, user: User, *, expired_first: bool = False) -> None:
        self.factory = factory
        self.user = user
        self.expired_first = expired_first
        self.refreshes = 0
        self.refuse = False

    def __call__(self, refresh: bool) -> str:
        if refresh:
            self.refreshes += 1
        if self.refuse:
            return "not-a-token"
        if self.expired_first and not refresh and self.refreshes == 0:
            import time

            return self.factory.token(self.user, now=time.time() - 7200, ttl=60)
        return self.factory.token(self.user)


def quick_backoff(attempts: int = 6, sleeps: list[float] | None = None) -> Backoff:
    """Backoff that records its waits instead of sleeping."""
    record = sleeps if sleeps is not None else []
    sleep: Callable[[float], None] = record.append
    return Backoff(base=0.01, cap=0.1, attempts=attempts, sleep=sleep, rng=random.Random(7))


def device(
    path: str,
    http: httpx.Client,
    factory: Factory,
    user: User,
    *,
    device_id: str | None = None,
    tokens: TokenSource | None = None,
    page_limit: int = 1000,
    initial_page_limit: int | None = None,
    attempts: int = 6,
    **kwargs: Any,
) -> SyncClient:
    """A reference client for ``user`` with its replica at ``path``."""
    return SyncClient(
        path,
        http,
        BASE_URL,
        tokens or TokenSource(factory, user),
        device_id=device_id,
        intents=INTENTS,
        page_limit=page_limit,
        # Tests choose their page size for the initial sync too (small ones page through it).
        initial_page_limit=initial_page_limit,
        backoff=quick_backoff(attempts),
        **kwargs,
    )


def server_image(engine: Any, scopes: list[str], role: str) -> dict[tuple[str, str], Any]:
    """The live rows of ``scopes`` straight from ``sync_rows``, filtered for ``role``:
    (entity, id) -> (scope, version, data)."""
    import msgspec
    from sqlalchemy import select

    from domain.catalog import default_registry
    from domain.registry import filter_fields
    from domain.roles import Role
    from sync_server.tables import sync_rows

    registry = default_registry()
    out: dict[tuple[str, str], Any] = {}
    with engine.connect() as conn:
        for r in conn.execute(
            select(sync_rows).where(sync_rows.c.scope.in_(scopes), sync_rows.c.deleted.is_(False))
        ):
            data = msgspec.msgpack.decode(r.data)
            spec = registry.entity(r.entity)
            if spec is not None:
                data = filter_fields(spec, Role(role), data)
            out[(r.entity, r.row_id)] = (r.scope, r.version, data)
        conn.rollback()
    return out


def replica_image(client: SyncClient, *, view: bool = False) -> dict[tuple[str, str], Any]:
    """The same shape from a replica's confirmed rows (or the app's view)."""
    rows = client.rows() if view else client.replica.confirmed_rows()
    return {(r.entity, r.id): (r.scope, r.version, r.data) for r in rows}
