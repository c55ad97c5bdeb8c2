"""Every route declares what it needs; roles map to the permission slugs seeded by migrations."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route

from api.v1 import api
from sync_server.account_tables import permissions, role_permissions
from sync_server.app import create_app
from sync_server.authn import AUTHENTICATED, PUBLIC, declared_access
from sync_server.resources import Resources
from tests.factories import Factory


def walk(routes: list[BaseRoute], prefix: str = "") -> list[tuple[str, Route]]:
    found: list[tuple[str, Route]] = []
    for route in routes:
        if isinstance(route, Mount):
            found += walk(list(route.routes), prefix + route.path)
        elif isinstance(route, Route):
            found.append((prefix + route.path, route))
        else:  # a websocket route or anything new must be looked at, not skipped
            found.append((prefix + getattr(route, "path", "?"), route))  # type: ignore[arg-type]
    return found


def undeclared(app: Starlette) -> list[str]:
    return [
        path
        for path, route in walk(list(app.routes))
        if declared_access(getattr(route, "endpoint", None)) is None  # type: ignore[arg-type]
    ]


def test_every_route_of_the_app_declares_a_permission_or_a_public_marker(
    resources: Resources, db: Engine
) -> None:
    app = create_app(resources=resources)
    routes = walk(list(app.routes))
    assert {"/healthz", "/sync/v1/push", "/api/v1/auth/login", "/api/v1/staff"} <= {
        path for path, _ in routes
    }
    assert undeclared(app) == []
    with db.connect() as conn:
        slugs = set(conn.execute(select(permissions.c.slug)).scalars())
    declared = {declared_access(route.endpoint) for _, route in routes}
    assert declared - {PUBLIC, AUTHENTICATED} <= slugs


def test_the_route_walk_catches_a_route_that_forgot_its_declaration() -> None:
    async def forgotten(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Mount("/x", routes=[Route("/forgotten", forgotten)])])
    assert undeclared(app) == ["/x/forgotten"]


def test_roles_map_to_the_seeded_permissions(db: Engine) -> None:
    with db.connect() as conn:
        grants: dict[str, set[str]] = {}
        for row in conn.execute(select(role_permissions)):
            grants.setdefault(row.role, set()).add(row.permission)
    assert grants["staff"] == {"profile.read", "profile.update", "biometric.enroll"}
    assert grants["staff"] < grants["manager"] < grants["admin"]
    assert "audit.read" in grants["admin"] and "audit.read" not in grants["manager"]


@pytest.mark.parametrize(
    "role, path, allowed",
    [
        ("staff", "/api/v1/staff", False),
        ("manager", "/api/v1/staff", True),
        ("admin", "/api/v1/staff", True),
        ("staff", "/api/v1/audit", False),
        ("manager", "/api/v1/audit", False),
        ("admin", "/api/v1/audit", True),
    ],
)
def test_permissions_are_enforced_by_role(
    role: str, path: str, allowed: bool, client: Any, factory: Factory
) -> None:
    user = factory.user(role)
    response = client.get(path, headers=factory.auth(user))
    assert response.status_code == (200 if allowed else 403)
    if not allowed:
        assert response.json()["code"] == "forbidden"


def test_each_operation_is_registered_once() -> None:
    keys = [(op.method, op.path) for op in api.operations]
    assert len(keys) == len(set(keys))
