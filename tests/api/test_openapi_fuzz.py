"""Property-based run over the OpenAPI document (schemathesis): no input yields a 5xx, and every
response matches the documented status codes and schemas."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from sqlalchemy.engine import Engine

from api.openapi import build_document
from api.v1 import api
from sync_server.app import create_app
from sync_server.resources import build_resources
from tests.conftest import clean_database, make_settings
from tests.factories import Factory


@pytest.fixture
def fuzz_app(sqlite_engine: Engine) -> Iterator[tuple[Any, dict[str, str]]]:
    clean_database(sqlite_engine)
    res = build_resources(
        make_settings(sqlite_engine.url.render_as_string(hide_password=False)), engine=sqlite_engine
    )
    factory = Factory(res)
    branch = factory.branch()
    factory.user("staff", [branch])
    admin = factory.user("admin")
    APP.app = create_app(resources=res)
    APP.headers = factory.auth(admin)
    yield APP.app, APP.headers
    APP.app = None
    res.release()


class _AppUnderTest:
    """The ASGI app schemathesis calls: the one the current test built (fresh database)."""

    app: Any = None
    #: The admin's Authorization header, for the auth provider below.
    headers: dict[str, str] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


APP = _AppUnderTest()
# The document the app serves at /api/v1/openapi.json (a contract test checks they are equal).
schema = schemathesis.openapi.from_dict(build_document(api))
schema.app = APP


@schema.auth(refresh_interval=None)  # each test's own admin: never a cached token
class _AdminAuth:
    """The test's admin signs every request, through schemathesis' own auth hook rather than
    extra headers: schemathesis then knows the Authorization header is supplied, and does not
    count a request it generated without one, which the header then made valid, as invalid
    data the API wrongly accepted (a known false positive of passing auth as headers)."""

    def get(self, case: Any, context: Any) -> str:
        # Also asked while tests are collected, before any admin exists.
        return APP.headers.get("Authorization", "Bearer none-yet")

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": data}


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_input_makes_the_api_fail_or_break_its_contract(
    case: Any, fuzz_app: tuple[Any, dict[str, str]]
) -> None:
    case.call_and_validate(
        base_url="http://testserver/api/v1",
        # Opaque values (cursors, tokens, ids) can be schema-valid and still unknown: a 422 or
        # 404 for them is the contract, not a defect.
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )
