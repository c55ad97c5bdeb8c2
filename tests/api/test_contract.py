"""The /api/v1 contract: generated OpenAPI document, docs page, envelopes and security headers."""

from __future__ import annotations

from typing import Any

from starlette.testclient import TestClient

from api.openapi import build_document
from api.v1 import api
from sync_server.app import create_app
from sync_server.resources import Resources
from tests.factories import Factory


def test_the_openapi_document_is_generated_from_the_operations(client: Any) -> None:
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document == build_document(api)
    assert document["openapi"] == "3.1.0"
    for op in api.operations:
        described = document["paths"][op.path][op.method.lower()]
        assert described["x-permission"] == op.access
        assert described["security"] == ([] if op.access == "public" else [{"bearerAuth": []}])
    assert {"User", "Session", "Error", "StaffCreate"} <= set(document["components"]["schemas"])
    login_body = document["paths"]["/auth/login"]["post"]["requestBody"]
    assert login_body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LoginRequest"
    }
    assert "Idempotency-Key" in str(document["paths"]["/staff"]["post"]["parameters"])


def test_the_docs_page_is_self_contained_and_locked_down(client: Any) -> None:
    response = client.get("/api/v1/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "<script" not in response.text
    assert "/api/v1/auth/login" in response.text
    assert "StaffCreate" in response.text


def test_security_headers_are_on_every_response(client: Any, factory: Factory) -> None:
    for response in (
        client.get("/healthz"),
        client.get("/api/v1/users/me"),
        client.get("/api/v1/staff", headers=factory.auth(factory.user("manager"))),
        client.post("/sync/v1/pull", json={}),
        client.get("/nowhere"),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert "server" not in response.headers
        # Plain HTTP: no HSTS (browsers ignore it there; the TLS proxy case is below).
        assert "Strict-Transport-Security" not in response.headers


def test_hsts_is_sent_over_tls(resources: Resources) -> None:
    with TestClient(create_app(resources=resources), base_url="https://testserver") as tls:
        assert "max-age=" in tls.get("/healthz").headers["Strict-Transport-Security"]


def test_hsts_from_a_proxy_needs_trusted_proxy_headers(resources: Resources) -> None:
    from dataclasses import replace

    headers = {"X-Forwarded-Proto": "https"}
    with TestClient(create_app(resources=resources)) as plain:
        assert "Strict-Transport-Security" not in plain.get("/healthz", headers=headers).headers
    resources.settings = replace(resources.settings, trust_proxy_headers=True)
    with TestClient(create_app(resources=resources)) as proxied:
        assert "Strict-Transport-Security" in proxied.get("/healthz", headers=headers).headers


def test_a_wrong_method_is_a_405_naming_every_allowed_method(client: Any) -> None:
    response = client.delete("/api/v1/users/me")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "PATCH"}


def test_unknown_paths_and_query_parameters_answer_in_the_error_shape(
    client: Any, factory: Factory
) -> None:
    missing = client.get("/api/v1/nothing-here")
    assert missing.status_code == 404
    assert set(missing.json()) == {"code", "message", "details"}
    manager = factory.user("manager")
    unknown = client.get("/api/v1/staff", params={"sort": "name"}, headers=factory.auth(manager))
    assert unknown.status_code == 422
    assert unknown.json()["details"] == {"sort": ["unknown query parameter"]}


def test_a_body_that_is_not_json_is_a_415_and_not_an_object_a_422(
    client: Any, factory: Factory
) -> None:
    text = client.post("/api/v1/auth/login", content=b"x", headers={"content-type": "text/plain"})
    assert text.status_code == 415
    array = client.post("/api/v1/auth/login", json=[1, 2])
    assert array.status_code == 422
    assert array.json()["code"] == "validation_error"


def test_an_oversized_body_is_a_413(client: Any) -> None:
    response = client.post(
        "/api/v1/auth/login",
        content=b'{"email": "' + b"a" * 70_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413


def test_an_unexpected_failure_is_a_bare_500_without_internals(resources: Resources) -> None:
    resources.extras["clock"] = lambda: 1 / 0  # any bug inside a handler
    with TestClient(create_app(resources=resources), raise_server_exceptions=False) as c:
        response = c.post("/api/v1/auth/refresh", json={"refresh_token": "x"})
    assert response.status_code == 500
    assert response.json() == {
        "code": "internal_error",
        "message": "The server failed to handle this request.",
        "details": {},
    }
    assert "Traceback" not in response.text and "ZeroDivision" not in response.text
    assert response.headers["X-Content-Type-Options"] == "nosniff"
