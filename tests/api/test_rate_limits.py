"""Rate limits (per IP, per account) and the temporary lockout after repeated failures."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from sync_server.account_tables import audit_log
from sync_server.errors import ApiError
from sync_server.ratelimit import RateLimiter, RatePolicy
from sync_server.resources import Resources
from tests.api.conftest import login
from tests.factories import Factory, User
from tests.syncing import (
    JSON,
    change_set,
    create,
    encode,
    item,
    last_applied_seq,
    post,
    pull_body,
    push_body,
)

WINDOW = 2  # seconds: short windows so recovery is observable in a test


def _install(resources: Resources, policy: RatePolicy, url: str | None = None) -> RateLimiter:
    limiter = RateLimiter(url, policy)
    resources.extras["ratelimiter"] = limiter
    return limiter


def _events(db: Engine) -> list[tuple[str, str]]:
    with db.connect() as conn:
        rows = conn.execute(select(audit_log.c.event, audit_log.c.outcome).order_by(audit_log.c.id))
        return [(r.event, r.outcome) for r in rows]


def test_login_is_rate_limited_per_ip_with_retry_after_and_recovers(
    client: Any, resources: Resources, staff: User
) -> None:
    _install(resources, RatePolicy(login_per_ip=f"3/{WINDOW} seconds"))
    for _ in range(3):
        assert login(client, staff).status_code == 200
    limited = login(client, staff)
    assert limited.status_code == 429
    assert limited.json()["code"] == "rate_limited"
    assert set(limited.json()) == {"code", "message", "details"}
    assert 1 <= int(limited.headers["Retry-After"]) <= WINDOW
    time.sleep(WINDOW + 0.2)
    assert login(client, staff).status_code == 200


def test_login_is_rate_limited_per_account_across_ips(
    client: Any, resources: Resources, factory: Factory
) -> None:
    _install(resources, RatePolicy(login_per_account=f"2/{WINDOW} seconds"))
    target, other = factory.user("staff"), factory.user("staff")
    assert login(client, target).status_code == 200
    assert login(client, target).status_code == 200
    assert login(client, target).status_code == 429
    # Another account from the same IP is not affected.
    assert login(client, other).status_code == 200


def test_repeated_failures_lock_the_account_even_for_the_right_password_then_it_recovers(
    client: Any, resources: Resources, staff: User, db: Engine
) -> None:
    _install(resources, RatePolicy(lockout=f"3/{WINDOW} seconds"))
    for _ in range(3):
        assert login(client, staff, password="guess guess guess").status_code == 401
    locked = login(client, staff)
    assert locked.status_code == 429
    assert locked.json()["code"] == "account_locked"
    assert int(locked.headers["Retry-After"]) >= 1
    events = _events(db)
    assert events.count(("login.failed", "failure")) == 3
    assert ("login.locked", "locked") in events
    assert ("login.failed", "locked") in events  # the refused attempt during the lockout
    time.sleep(WINDOW + 0.2)
    assert login(client, staff).status_code == 200


def test_a_success_clears_the_failure_count(client: Any, resources: Resources, staff: User) -> None:
    _install(resources, RatePolicy(lockout=f"3/{WINDOW * 30} seconds"))
    for _ in range(2):
        login(client, staff, password="guess guess guess")
    assert login(client, staff).status_code == 200
    for _ in range(2):
        login(client, staff, password="guess guess guess")
    assert login(client, staff).status_code == 200


def test_refresh_is_rate_limited_per_ip(
    client: Any, resources: Resources, sign_in: Any, staff: User
) -> None:
    _install(resources, RatePolicy(refresh_per_ip=f"2/{WINDOW * 30} seconds"))
    for _ in range(2):
        assert client.post("/api/v1/auth/refresh", json={"refresh_token": "x"}).status_code == 401
    limited = client.post("/api/v1/auth/refresh", json={"refresh_token": "x"})
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers


def test_the_client_ip_comes_from_x_forwarded_for_only_behind_a_trusted_proxy(
    client: Any, resources: Resources, staff: User
) -> None:
    _install(resources, RatePolicy(login_per_ip=f"1/{WINDOW * 30} seconds"))
    first = client.post(
        "/api/v1/auth/login",
        json={"email": staff.email, "password": staff.password},
        headers={"X-Forwarded-For": "203.0.113.1"},
    )
    assert first.status_code == 200
    # Untrusted header: a client cannot dodge the per-IP limit by inventing addresses.
    second = client.post(
        "/api/v1/auth/login",
        json={"email": staff.email, "password": staff.password},
        headers={"X-Forwarded-For": "203.0.113.2"},
    )
    assert second.status_code == 429


@pytest.mark.integration
def test_limits_are_shared_through_redis_between_processes(
    redis_client: Any, redis_url: str
) -> None:
    policy = RatePolicy(lockout=f"2/{WINDOW} seconds")
    first = RateLimiter(redis_url, policy)
    second = RateLimiter(redis_url, policy)  # another server process
    assert first.hit(policy.lockout, "lockout", "sam@example.test").allowed
    assert second.hit(policy.lockout, "lockout", "sam@example.test").allowed
    refused = first.hit(policy.lockout, "lockout", "sam@example.test")
    assert not refused.allowed and 1 <= refused.retry_after <= WINDOW
    assert not second.blocked(policy.lockout, "lockout", "sam@example.test").allowed
    assert any(b"galley-limits" in key for key in redis_client.keys("*"))
    time.sleep(WINDOW + 0.2)
    assert second.blocked(policy.lockout, "lockout", "sam@example.test").allowed


@pytest.mark.integration
def test_the_app_uses_redis_for_limits_when_configured(
    redis_client: Any, redis_url: str, db: Engine, factory: Factory
) -> None:
    from starlette.testclient import TestClient

    from sync_server.app import create_app
    from sync_server.resources import build_resources
    from tests.conftest import make_settings

    settings = make_settings(db.url.render_as_string(hide_password=False), redis_url=redis_url)
    res = build_resources(settings, engine=db)
    try:
        user = factory.user("staff")
        with TestClient(create_app(resources=res)) as api_client:
            api_client.post("/api/v1/auth/login", json={"email": user.email, "password": "nope"})
        limiter = res.extras["ratelimiter"]
        assert type(limiter.storage).__name__ == "RedisStorage"
        assert redis_client.keys("galley-limits*")
    finally:
        res.release()


def test_the_lockout_counts_per_account_whether_email_or_username_is_used(
    client: Any, resources: Resources, staff: User, db: Engine
) -> None:
    from sqlalchemy import update

    from sync_server.tables import users

    with db.begin() as conn:
        conn.execute(update(users).where(users.c.id == staff.id).values(username="sam"))
    _install(resources, RatePolicy(lockout=f"2/{WINDOW * 30} seconds"))
    login(client, staff, password="guess guess guess")
    client.post("/api/v1/auth/login", json={"username": "sam", "password": "guess again"})
    locked = client.post("/api/v1/auth/login", json={"username": "sam", "password": staff.password})
    assert locked.status_code == 429
    assert locked.json()["code"] == "account_locked"


def test_refresh_is_rate_limited_per_account(
    client: Any, resources: Resources, sign_in: Any, factory: Factory
) -> None:
    user, other = factory.user("staff"), factory.user("staff")
    phone, tablet, elsewhere = sign_in(user), sign_in(user), sign_in(other)
    _install(resources, RatePolicy(refresh_per_account=f"2/{WINDOW * 30} seconds"))
    first = client.post("/api/v1/auth/refresh", json={"refresh_token": phone.refresh_token})
    assert first.status_code == 200
    second = client.post("/api/v1/auth/refresh", json={"refresh_token": tablet.refresh_token})
    assert second.status_code == 200
    third = client.post(
        "/api/v1/auth/refresh", json={"refresh_token": first.json()["data"]["refresh_token"]}
    )
    assert third.status_code == 429
    assert (
        client.post(
            "/api/v1/auth/refresh", json={"refresh_token": elsewhere.refresh_token}
        ).status_code
        == 200
    )


# --- /sync/v1: requests per user --------------------------------------------------------------


def _pull(client: Any, factory: Factory, user: User, device: str) -> Any:
    return client.post(
        "/sync/v1/pull",
        content=encode(pull_body(device)),
        headers={**factory.auth(user), "Content-Type": JSON, "Accept": JSON},
    )


def test_sync_requests_are_throttled_per_user_across_endpoints_and_recover(
    client: Any, resources: Resources, factory: Factory
) -> None:
    _install(resources, RatePolicy(sync_per_user=f"3/{WINDOW} seconds"))
    branch = factory.branch()
    busy, quiet = factory.user("staff", [branch]), factory.user("staff", [branch])
    busy_device, quiet_device = factory.device(busy), factory.device(quiet)
    for _ in range(3):
        assert _pull(client, factory, busy, busy_device).status_code == 200

    limited = _pull(client, factory, busy, busy_device)
    assert limited.status_code == 429
    assert limited.json()["code"] == "rate_limited"
    assert set(limited.json()) == {"code", "message", "details"}
    assert 1 <= int(limited.headers["Retry-After"]) <= WINDOW
    # Pushes count against the same allowance, and nothing of a refused push is applied.
    status, body = post(
        client,
        "push",
        push_body(busy_device, change_set(1, create("inventory_items", **item()))),
        factory.auth(busy),
    )
    assert (status, body["code"]) == (429, "rate_limited")
    assert last_applied_seq(resources.engine, busy_device) == 0
    # Another user is not affected.
    assert _pull(client, factory, quiet, quiet_device).status_code == 200

    time.sleep(WINDOW + 0.2)
    assert _pull(client, factory, busy, busy_device).status_code == 200


def test_sync_is_not_throttled_when_the_limit_is_off(
    client: Any, resources: Resources, factory: Factory
) -> None:
    _install(resources, RatePolicy(sync_per_user=None))
    user = factory.user("staff", [factory.branch()])
    device = factory.device(user)
    assert all(_pull(client, factory, user, device).status_code == 200 for _ in range(20))


@pytest.mark.integration
def test_sync_throttling_is_shared_through_redis_between_processes(
    redis_client: Any, redis_url: str
) -> None:
    policy = RatePolicy(sync_per_user=f"2/{WINDOW} seconds")
    first, second = RateLimiter(redis_url, policy), RateLimiter(redis_url, policy)
    first.throttle(policy.sync_per_user, "sync", "user-1")
    second.throttle(policy.sync_per_user, "sync", "user-1")
    with pytest.raises(ApiError) as refused:
        first.throttle(policy.sync_per_user, "sync", "user-1")
    assert refused.value.status == 429
    second.throttle(policy.sync_per_user, "sync", "user-2")


def test_sync_keeps_working_unthrottled_when_the_limit_store_is_unreachable(
    client: Any, resources: Resources, factory: Factory
) -> None:
    # Nothing listens on port 1: the real Redis client fails to connect. Throttling must not
    # take sync down with it, nor cost every request a timeout.
    _install(resources, RatePolicy(sync_per_user=f"1/{WINDOW} seconds"), "redis://127.0.0.1:1/0")
    user = factory.user("staff", [factory.branch()])
    device = factory.device(user)
    started = time.monotonic()
    assert [_pull(client, factory, user, device).status_code for _ in range(5)] == [200] * 5
    assert time.monotonic() - started < 5


def test_the_configured_sync_rate_limit_is_what_the_app_enforces(
    client: Any, resources: Resources, factory: Factory
) -> None:
    from dataclasses import replace

    resources.settings = replace(resources.settings, sync_rate_limit=f"2/{WINDOW} seconds")
    resources.extras.pop("ratelimiter", None)  # built from the settings on first use
    user = factory.user("staff", [factory.branch()])
    device = factory.device(user)
    statuses = [_pull(client, factory, user, device).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
