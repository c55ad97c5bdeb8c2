"""GET /audit: admins read the append-only audit log, newest first, paginated and filtered."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import login
from tests.factories import Factory


def test_admins_page_through_the_audit_log_newest_first(client: Any, factory: Factory) -> None:
    admin = factory.user("admin")
    staff = factory.user("staff")
    for _ in range(3):
        login(client, staff, password="wrong wrong wrong")
    login(client, staff)
    headers = factory.auth(admin)
    first = client.get("/api/v1/audit", params={"limit": "3"}, headers=headers)
    assert first.status_code == 200
    body = first.json()
    assert [e["event"] for e in body["data"]] == ["login.succeeded"] + ["login.failed"] * 2
    assert body["meta"]["limit"] == 3 and body["meta"]["next_cursor"]
    ids = [e["id"] for e in body["data"]]
    assert ids == sorted(ids, reverse=True)
    rest = client.get(
        "/api/v1/audit",
        params={"limit": "3", "cursor": body["meta"]["next_cursor"]},
        headers=headers,
    ).json()
    assert [e["event"] for e in rest["data"]] == ["login.failed"]
    assert rest["meta"]["next_cursor"] is None
    entry = body["data"][0]
    assert entry["subject_user_id"] == staff.id
    assert entry["ip"] == "testclient"
    assert entry["details"]["method"] == "password"


def test_the_audit_log_filters_by_event_and_subject(client: Any, factory: Factory) -> None:
    admin = factory.user("admin")
    a, b = factory.user("staff"), factory.user("staff")
    login(client, a)
    login(client, b, password="wrong wrong wrong")
    headers = factory.auth(admin)
    failed = client.get("/api/v1/audit", params={"event": "login.failed"}, headers=headers).json()
    assert [e["subject_user_id"] for e in failed["data"]] == [b.id]
    about_a = client.get("/api/v1/audit", params={"subject_user_id": a.id}, headers=headers).json()
    assert [e["event"] for e in about_a["data"]] == ["login.succeeded"]


def test_a_bad_audit_cursor_is_a_422(client: Any, factory: Factory) -> None:
    admin = factory.user("admin")
    from api.contract import encode_cursor

    response = client.get(
        "/api/v1/audit", params={"cursor": encode_cursor("x")}, headers=factory.auth(admin)
    )
    assert response.status_code == 422
    assert "cursor" in response.json()["details"]
