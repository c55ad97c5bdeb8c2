"""Malformed and hostile requests to /sync/v1: each answered with the right 4xx in the error
shape ``{"code", "message", "details"}``, and nothing applied.

"Nothing applied" is checked against everything a push can change: the replication log, the
scope counters, every device's last applied seq, the change-set records and the conflicts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from sync_server.app import create_app
from sync_server.resources import build_resources
from sync_server.tables import devices, users
from tests.conftest import make_settings
from tests.factories import Factory, User
from tests.syncing import (
    JSON,
    MSGPACK,
    PROTOCOL,
    change_set,
    cheap_passwords,
    create,
    item,
    new_id,
    post,
    pull_body,
    push_body,
    server_rows,
    snapshot,
)

__all__ = ["cheap_passwords"]


@dataclass
class Setup:
    user: User
    device: str
    headers: dict[str, str]
    other_device: str  # registered to another user
    factory: Factory


@pytest.fixture
def setup(factory: Factory, cheap_passwords: None) -> Setup:
    user = factory.user("manager")
    device = factory.device(user)
    other = factory.user("staff")
    return Setup(user, device, factory.auth(user), factory.device(other), factory)


def good_cs(seq: int = 1) -> dict[str, Any]:
    return change_set(seq, create("inventory_items", **item()))


def raw(
    client: Any,
    path: str,
    content: bytes,
    headers: dict[str, str],
    content_type: str | None = JSON,
) -> Any:
    sent = dict(headers)
    if content_type is not None:
        sent["Content-Type"] = content_type
    return client.post(f"/sync/v1/{path}", content=content, headers=sent)


def assert_error_shape(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    media = response.headers["content-type"].split(";")[0]
    body = (
        msgspec.msgpack.decode(response.content)
        if media == MSGPACK
        else msgspec.json.decode(response.content)
    )
    assert set(body) == {"code", "message", "details"}
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], dict)
    for key, messages in body["details"].items():
        assert isinstance(key, str)
        assert isinstance(messages, list) and all(isinstance(m, str) for m in messages)
    return body  # type: ignore[no-any-return]


def enc(body: Any) -> bytes:
    return msgspec.json.encode(body)


# Each case: (id, path, build(setup) -> (content, headers, content_type), status, code)
Case = tuple[str, str, Callable[[Setup], tuple[bytes, dict[str, str], str | None]], int, str]


def _push(s: Setup, *sets: dict[str, Any], **top: Any) -> bytes:
    return enc({**push_body(s.device, *sets), **top})


CASES: list[Case] = [
    (
        "malformed_json",
        "push",
        lambda s: (b'{"protocol": "1.0",', s.headers, JSON),
        400,
        "malformed_body",
    ),
    (
        "malformed_msgpack",
        "push",
        lambda s: (b"\xc1\xc1\xc1", s.headers, MSGPACK),
        400,
        "malformed_body",
    ),
    (
        "truncated_msgpack",
        "push",
        lambda s: (msgspec.msgpack.encode(push_body(s.device, good_cs()))[:-5], s.headers, MSGPACK),
        400,
        "malformed_body",
    ),
    (
        "msgpack_string_not_utf8",
        "push",
        lambda s: (
            msgspec.msgpack.encode(push_body(s.device, good_cs())).replace(
                b"Flour", b"\xed\xa0\x80Fl"
            ),
            s.headers,
            MSGPACK,
        ),
        400,
        "malformed_body",
    ),
    (
        "deeply_nested_json",
        "push",
        lambda s: (
            b'{"protocol": "2.0", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            s.headers,
            JSON,
        ),
        422,
        "validation_error",
    ),
    (
        "deeply_nested_msgpack",
        "pull",
        lambda s: (
            b"\x82\xa8protocol\xa31.0\xa1x" + b"\x91" * 50_000 + b"\xc0",
            s.headers,
            MSGPACK,
        ),
        422,
        "validation_error",
    ),
    (
        "text_plain",
        "push",
        lambda s: (_push(s, good_cs()), s.headers, "text/plain"),
        415,
        "unsupported_media_type",
    ),
    (
        "no_content_type",
        "push",
        lambda s: (_push(s, good_cs()), s.headers, None),
        415,
        "unsupported_media_type",
    ),
    (
        "form_encoded",
        "pull",
        lambda s: (b"a=1", s.headers, "application/x-www-form-urlencoded"),
        415,
        "unsupported_media_type",
    ),
    ("no_token", "push", lambda s: (_push(s, good_cs()), {}, JSON), 401, "unauthenticated"),
    (
        "garbage_token",
        "push",
        lambda s: (_push(s, good_cs()), {"Authorization": "Bearer abc.def.ghi"}, JSON),
        401,
        "unauthenticated",
    ),
    (
        "basic_auth",
        "pull",
        lambda s: (enc(pull_body(s.device)), {"Authorization": "Basic dXNlcjpwYXNz"}, JSON),
        401,
        "unauthenticated",
    ),
    (
        "seq_zero",
        "push",
        lambda s: (_push(s, good_cs(0)), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "seq_as_string",
        "push",
        lambda s: (_push(s, {**good_cs(), "seq": "1"}), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "bad_device_uuid",
        "push",
        lambda s: (enc(push_body("not-a-uuid", good_cs())), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "bad_change_set_uuid",
        "push",
        lambda s: (_push(s, {**good_cs(), "id": "123"}), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "bad_row_uuid",
        "push",
        lambda s: (
            _push(s, change_set(1, create("inventory_items", "x" * 36, **item()))),
            s.headers,
            JSON,
        ),
        422,
        "validation_error",
    ),
    (
        "no_ops",
        "push",
        lambda s: (_push(s, change_set(1)), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "501_ops",
        "push",
        lambda s: (
            _push(s, change_set(1, *[create("inventory_items", **item()) for _ in range(501)])),
            s.headers,
            JSON,
        ),
        422,
        "validation_error",
    ),
    (
        "101_change_sets",
        "push",
        lambda s: (_push(s, *[good_cs(i) for i in range(1, 102)]), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "unknown_top_level_field",
        "push",
        lambda s: (_push(s, good_cs(), force=True), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "unknown_op_kind",
        "push",
        lambda s: (
            _push(s, change_set(1, {"op": "upsert", "entity": "x", "id": new_id()})),
            s.headers,
            JSON,
        ),
        422,
        "validation_error",
    ),
    (
        "nested_field_value",
        "push",
        lambda s: (
            _push(s, change_set(1, create("inventory_items", **item(name={"a": 1})))),
            s.headers,
            JSON,
        ),
        422,
        "validation_error",
    ),
    (
        "missing_protocol",
        "push",
        lambda s: (enc({"device_id": s.device, "change_sets": [good_cs()]}), s.headers, JSON),
        422,
        "validation_error",
    ),
    ("array_body", "push", lambda s: (enc([good_cs()]), s.headers, JSON), 422, "validation_error"),
    (
        "negative_cursor",
        "pull",
        lambda s: (enc(pull_body(s.device, {"org": -1})), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "limit_over_max",
        "pull",
        lambda s: (enc(pull_body(s.device, limit=10_001)), s.headers, JSON),
        422,
        "validation_error",
    ),
    (
        "protocol_2",
        "push",
        lambda s: (_push(s, good_cs(), protocol="2.0"), s.headers, JSON),
        426,
        "upgrade_required",
    ),
    (
        "protocol_2_new_shape",
        "push",
        lambda s: (enc({"protocol": "2.0", "device": s.device, "batches": []}), s.headers, JSON),
        426,
        "upgrade_required",
    ),
    (
        "protocol_0_pull",
        "pull",
        lambda s: (enc({**pull_body(s.device), "protocol": "0.9"}), s.headers, JSON),
        426,
        "upgrade_required",
    ),
    (
        "unregistered_device",
        "push",
        lambda s: (enc(push_body(new_id(), good_cs())), s.headers, JSON),
        404,
        "device_not_registered",
    ),
    (
        "unregistered_device_pull",
        "pull",
        lambda s: (enc(pull_body(new_id())), s.headers, JSON),
        404,
        "device_not_registered",
    ),
    (
        "other_users_device",
        "push",
        lambda s: (enc(push_body(s.other_device, good_cs())), s.headers, JSON),
        403,
        "device_forbidden",
    ),
    (
        "other_users_device_pull",
        "pull",
        lambda s: (enc(pull_body(s.other_device)), s.headers, JSON),
        403,
        "device_forbidden",
    ),
    (
        "device_of_another_user_registered",
        "devices",
        lambda s: (
            enc(
                {
                    "protocol": PROTOCOL,
                    "device_id": s.other_device,
                    "platform": "ios",
                    "app_version": "1",
                }
            ),
            s.headers,
            JSON,
        ),
        409,
        "device_owned_by_other_user",
    ),
]


@pytest.mark.parametrize(
    ("name", "path", "build", "status", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_a_bad_request_gets_its_4xx_in_the_error_shape_and_changes_nothing(
    client: Any,
    db: Engine,
    setup: Setup,
    name: str,
    path: str,
    build: Callable[[Setup], tuple[bytes, dict[str, str], str | None]],
    status: int,
    code: str,
) -> None:
    before = snapshot(db)
    content, headers, content_type = build(setup)

    response = raw(client, path, content, headers, content_type)

    assert_error_shape(response, status, code)
    assert snapshot(db) == before
    # And the device's queue still works from seq 1.
    ok, body = post(client, "push", push_body(setup.device, good_cs(1)), setup.headers)
    assert ok == 200 and body["outcomes"][0]["status"] == "applied"


def test_validation_errors_name_the_offending_field(client: Any, db: Engine, setup: Setup) -> None:
    response = raw(client, "push", _push(setup, good_cs(0)), setup.headers)
    body = assert_error_shape(response, 422, "validation_error")
    assert list(body["details"]) == ["$.change_sets[0].seq"]


def test_an_unsupported_protocol_tells_the_client_to_upgrade(
    client: Any, db: Engine, setup: Setup
) -> None:
    response = raw(client, "push", _push(setup, good_cs(), protocol="2.0"), setup.headers)
    body = assert_error_shape(response, 426, "upgrade_required")
    assert "1.0" in body["message"] and "pdate" in body["message"]


def test_errors_to_a_msgpack_client_are_msgpack(client: Any, db: Engine, setup: Setup) -> None:
    body = msgspec.msgpack.encode(push_body(setup.device, good_cs(0)))
    response = raw(client, "push", body, {**setup.headers, "Accept": MSGPACK}, MSGPACK)
    assert response.headers["content-type"].startswith(MSGPACK)
    assert_error_shape(response, 422, "validation_error")


def test_an_expired_or_revoked_token_is_refused_and_nothing_applied(
    client: Any, db: Engine, setup: Setup
) -> None:
    tokens = setup.factory.res.tokens
    expired = tokens.mint(
        user_id=setup.user.id,
        role=setup.user.role,
        branch_ids=list(setup.user.branch_ids),
        epoch=0,
        now=time.time() - 7200,
    )
    before = snapshot(db)
    response = raw(client, "push", _push(setup, good_cs()), {"Authorization": f"Bearer {expired}"})
    assert_error_shape(response, 401, "unauthenticated")

    with db.begin() as conn:  # a role change or deactivation bumps the epoch
        conn.execute(update(users).where(users.c.id == setup.user.id).values(token_epoch=1))
    response = raw(client, "push", _push(setup, good_cs()), setup.headers)
    assert_error_shape(response, 401, "unauthenticated")
    assert snapshot(db) == before


@pytest.fixture
def small_client(db: Engine, cheap_passwords: None) -> Iterator[tuple[Any, Factory]]:
    """An app whose request body limit is 4 KB."""
    settings = make_settings(db.url.render_as_string(hide_password=False), max_request_bytes=4096)
    res = build_resources(settings, engine=db)
    with TestClient(create_app(resources=res)) as client:
        yield client, Factory(res)
    res.release()


def test_a_body_over_the_limit_is_413_and_nothing_is_applied(
    small_client: tuple[Any, Factory], db: Engine
) -> None:
    client, factory = small_client
    user = factory.user("manager")
    device, headers = factory.device(user), factory.auth(user)
    sets = [change_set(i, create("inventory_items", **item())) for i in range(1, 30)]
    content = enc(push_body(device, *sets))
    assert len(content) > 4096
    before = snapshot(db)

    declared = raw(client, "push", content, headers)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(content), 1000):
            yield content[start : start + 1000]

    streamed = client.post(
        "/sync/v1/push", content=chunks(), headers={**headers, "Content-Type": JSON}
    )

    for response in (declared, streamed):
        body = assert_error_shape(response, 413, "payload_too_large")
        assert "4096" in body["message"]
    assert snapshot(db) == before
    status, _ = post(client, "push", push_body(device, *sets[:2]), headers)
    assert status == 200


def test_a_wrong_method_gets_the_error_shape(client: Any, db: Engine, setup: Setup) -> None:
    response = client.get("/sync/v1/push", headers=setup.headers)
    assert_error_shape(response, 405, "method_not_allowed")


def test_a_revoked_device_may_neither_push_nor_pull(client: Any, db: Engine, setup: Setup) -> None:
    with db.begin() as conn:
        conn.execute(
            update(devices).where(devices.c.id == setup.device).values(revoked_at=datetime.now())
        )
    before = snapshot(db)
    for path, body in (
        ("push", _push(setup, good_cs())),
        ("pull", enc(pull_body(setup.device))),
    ):
        assert_error_shape(raw(client, path, body, setup.headers), 403, "device_forbidden")
    assert snapshot(db) == before


def test_registering_a_device_is_idempotent_and_reports_where_to_resume(
    client: Any, db: Engine, setup: Setup
) -> None:
    device = new_id()
    body = {"protocol": PROTOCOL, "device_id": device, "platform": "android", "app_version": "2.1"}

    status, first = post(client, "devices", body, setup.headers)
    assert status == 200
    assert first["device_id"] == device and first["user_id"] == setup.user.id
    assert first["last_applied_seq"] == 0
    assert first["scopes"] == ["org", f"branch:{setup.user.branch_ids[0]}"]
    post(client, "push", push_body(device, good_cs(1), good_cs(2)), setup.headers)

    status, again = post(client, "devices", {**body, "device_id": device.upper()}, setup.headers)

    assert status == 200
    assert again["last_applied_seq"] == 2  # a reinstall resumes at seq 3, never replays 1
    rows = [r for (e, i), r in server_rows(db).items() if e == "devices" and i == device]
    assert [r["data"]["platform"] for r in rows] == ["android"]
