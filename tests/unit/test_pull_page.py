"""Pull step 5, the per-row loop: what each row becomes for a role, and the page checksum it
adds up — which must be exactly the protocol's ``row_checksum``, however it is computed."""

from __future__ import annotations

import random
import uuid
from typing import Any

import msgspec

from domain.catalog import default_registry
from domain.roles import Role
from sync_protocol.checksums import MOD, row_checksum, sum_checksums
from sync_server.pull import PageRow, RowOut, page_changes

REGISTRY = default_registry()


def _run(rows: list[PageRow], role: Role, *, raw_msgpack: bool) -> tuple[list[RowOut], int]:
    out: list[RowOut] = []
    total = page_changes(
        rows, "org", role=role, registry=REGISTRY, raw_msgpack=raw_msgpack, plans={}, out=out
    )
    return out, total


def _row(entity: str, version: int, data: dict[str, Any], deleted: bool = False) -> PageRow:
    return (entity, str(uuid.uuid4()), version, deleted, msgspec.msgpack.encode(data))


def test_the_page_checksum_is_the_sum_of_the_protocols_row_checksums_for_many_rows() -> None:
    rng = random.Random(20261125)
    entities = ["staff", "inventory_items", "menu_items", "x", "é:ü", "名前", ""]
    rows: list[PageRow] = []
    for _ in range(5_000):
        row_id = rng.choice(
            [str(uuid.UUID(int=rng.getrandbits(128))), f"id:{rng.random()}", "ß☃", "", "0"]
        )
        version = rng.choice([0, 1, rng.randrange(2**31), rng.randrange(2**63), 10**18 + 7])
        rows.append((rng.choice(entities), row_id, version, True, b""))
    _, total = _run(rows, Role.ADMIN, raw_msgpack=True)
    assert total == sum_checksums(row_checksum(e, r, v) for e, r, v, _d, _b in rows)
    for entity, row_id, version, deleted, blob in rows[:500]:
        _, single = _run([(entity, row_id, version, deleted, blob)], Role.ADMIN, raw_msgpack=True)
        assert single == row_checksum(entity, row_id, version)
    assert 0 <= total < MOD


def test_rows_pass_through_as_stored_msgpack_only_when_the_role_may_see_every_field() -> None:
    staff = {"display_name": "Ana", "email": "ana@example.com", "phone": None, "active": True}
    stock = {"name": "Flour", "quantity": 3}
    rows = [_row("staff", 7, staff), _row("inventory_items", 7, stock)]

    manager, _ = _run(rows, Role.MANAGER, raw_msgpack=True)
    assert [type(change.data) for change in manager] == [msgspec.Raw, msgspec.Raw]
    assert bytes(manager[0].data) == rows[0][4]

    clerk, _ = _run(rows, Role.STAFF, raw_msgpack=True)
    assert clerk[0].data == {"display_name": "Ana", "active": True}
    assert type(clerk[1].data) is msgspec.Raw


def test_without_msgpack_pass_through_every_image_is_decoded_and_filtered_for_the_role() -> None:
    staff = {"display_name": "Ana", "email": "ana@example.com", "undeclared": 1}
    rows = [_row("staff", 3, staff), _row("unknown_entity", 3, {"a": 1})]
    admin, _ = _run(rows, Role.ADMIN, raw_msgpack=False)
    # An allow-list: a key the registry does not declare is never sent once decoded.
    assert admin[0].data == {"display_name": "Ana", "email": "ana@example.com"}
    assert admin[1].data == {"a": 1}


def test_a_tombstone_carries_no_data_and_keeps_its_identity_scope_and_version() -> None:
    row = ("staff", "r-1", 42, 1, b"\x80")
    (change,), total = _run([row], Role.STAFF, raw_msgpack=True)
    assert (change.entity, change.id, change.scope, change.version) == ("staff", "r-1", "org", 42)
    assert change.deleted is True and change.data is None
    assert total == row_checksum("staff", "r-1", 42)
