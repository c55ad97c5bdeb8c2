"""Idempotency-Key on creating POSTs (Stripe semantics), shown on POST /staff."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from api import idempotency
from sync_server.directory import utcnow
from sync_server.resources import Resources
from sync_server.tables import users
from tests.factories import Factory, User

PASSWORD = "basil and thyme forever 9"


def _body(admin_branch: str, email: str = "cook@example.test") -> dict[str, Any]:
    return {"email": email, "password": PASSWORD, "branch_ids": [admin_branch]}


def _count(db: Engine, email: str = "cook@example.test") -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).where(users.c.email == email)).scalar_one())


def _setup(factory: Factory) -> tuple[User, str]:
    branch = factory.branch()
    return factory.user("manager", [branch]), branch.id


def test_a_retry_with_the_same_key_replays_the_first_response(
    client: Any, factory: Factory, db: Engine
) -> None:
    manager, branch = _setup(factory)
    headers = {**factory.auth(manager), "Idempotency-Key": "create-cook-1"}
    first = client.post("/api/v1/staff", json=_body(branch), headers=headers)
    second = client.post("/api/v1/staff", json=_body(branch), headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert _count(db) == 1


def test_the_same_key_with_a_different_body_is_a_422(
    client: Any, factory: Factory, db: Engine
) -> None:
    manager, branch = _setup(factory)
    headers = {**factory.auth(manager), "Idempotency-Key": "k"}
    client.post("/api/v1/staff", json=_body(branch), headers=headers)
    other = client.post("/api/v1/staff", json=_body(branch, "chef@example.test"), headers=headers)
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"
    assert _count(db, "chef@example.test") == 0


def test_a_duplicate_while_the_first_is_in_flight_is_a_409(
    client: Any, factory: Factory, resources: Resources, db: Engine
) -> None:
    manager, branch = _setup(factory)
    body = _body(branch)
    # The first request has claimed the key and is still running.
    fingerprint = idempotency.request_hash("POST", "/api/v1/staff", body)
    assert idempotency.begin(db, manager.id, "in-flight", fingerprint, utcnow()) is None
    response = client.post(
        "/api/v1/staff",
        json=body,
        headers={**factory.auth(manager), "Idempotency-Key": "in-flight"},
    )
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_in_progress"
    assert _count(db) == 0


def test_concurrent_duplicates_create_exactly_once(
    client: Any, factory: Factory, db: Engine
) -> None:
    manager, branch = _setup(factory)
    headers = {**factory.auth(manager), "Idempotency-Key": "race"}
    results: list[Any] = []

    def send() -> None:
        results.append(client.post("/api/v1/staff", json=_body(branch), headers=headers))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {201, 409}
    created = [r.json() for r in results if r.status_code == 201]
    assert created and all(body == created[0] for body in created)
    assert _count(db) == 1


def test_a_refusal_is_replayed_too(client: Any, factory: Factory, db: Engine) -> None:
    manager, branch = _setup(factory)
    headers = {**factory.auth(manager), "Idempotency-Key": "dup"}
    taken = factory.user("staff").email
    first = client.post("/api/v1/staff", json=_body(branch, taken), headers=headers)
    again = client.post("/api/v1/staff", json=_body(branch, taken), headers=headers)
    assert first.status_code == again.status_code == 409
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"


def test_keys_expire_after_24_hours(
    client: Any, factory: Factory, resources: Resources, db: Engine
) -> None:
    manager, branch = _setup(factory)
    headers = {**factory.auth(manager), "Idempotency-Key": "old"}
    client.post("/api/v1/staff", json=_body(branch), headers=headers)
    resources.extras["clock"] = lambda: utcnow() + timedelta(hours=24, minutes=1)
    fresh = client.post("/api/v1/staff", json=_body(branch, "chef@example.test"), headers=headers)
    assert fresh.status_code == 201
    assert _count(db, "chef@example.test") == 1


def test_keys_are_per_user(client: Any, factory: Factory, db: Engine) -> None:
    manager, branch = _setup(factory)
    colleague = factory.user("manager", [factory.branch()])
    key = {"Idempotency-Key": "same"}
    a = client.post("/api/v1/staff", json=_body(branch), headers={**factory.auth(manager), **key})
    b = client.post(
        "/api/v1/staff",
        json=_body(colleague.branch_ids[0], "chef@example.test"),
        headers={**factory.auth(colleague), **key},
    )
    assert a.status_code == b.status_code == 201


def test_an_invalid_key_is_a_422(client: Any, factory: Factory, db: Engine) -> None:
    manager, branch = _setup(factory)
    response = client.post(
        "/api/v1/staff",
        json=_body(branch),
        headers={**factory.auth(manager), "Idempotency-Key": "x" * 256},
    )
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["details"]
    assert _count(db) == 0


def test_without_a_key_each_request_is_its_own(client: Any, factory: Factory, db: Engine) -> None:
    manager, branch = _setup(factory)
    first = client.post("/api/v1/staff", json=_body(branch), headers=factory.auth(manager))
    second = client.post("/api/v1/staff", json=_body(branch), headers=factory.auth(manager))
    assert (first.status_code, second.status_code) == (201, 409)
