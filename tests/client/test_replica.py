"""The replica on its own (no server): base versions, backoff, seq numbering."""

from __future__ import annotations

import random
from pathlib import Path

from sync_protocol import messages as m
from sync_protocol.client import Backoff, Replica

ROW = "0b8f6a52-3c1d-4e7a-9f20-6d4c8b1a2e93"


def test_a_patch_is_sent_with_its_own_earlier_writes_as_base_and_the_rest_as_seen(
    tmp_path: Path,
) -> None:
    replica = Replica(str(tmp_path / "r.db"))
    # The user saw the dish at version 4; this device's own change-set then wrote its price at
    # version 9. A later offline edit of price and name: the price is based on 9 (our write),
    # the name still on 4 (someone else may have renamed it since).
    with replica.transaction():
        replica.conn.execute(
            "INSERT INTO own_writes (entity, id, field, version) VALUES ('menu_items', ?, "
            "'price_cents', 9)",
            (ROW,),
        )
    replica.record_change_set(
        [m.Patch("menu_items", ROW, 4, {"price_cents": 700, "name": "Soup"})],
        created_at=None,
        hints={},
    )

    [change_set] = replica.next_push_batch()

    assert change_set.ops == [
        m.Patch("menu_items", ROW, 4, {"name": "Soup"}),
        m.Patch("menu_items", ROW, 9, {"price_cents": 700}),
    ]


def test_a_row_created_by_this_device_vouches_for_every_field_and_for_a_delete(
    tmp_path: Path,
) -> None:
    replica = Replica(str(tmp_path / "r.db"))
    with replica.transaction():
        replica.conn.execute(
            "INSERT INTO own_writes (entity, id, field, version) VALUES ('menu_items', ?, '*', 7)",
            (ROW,),
        )
    replica.record_change_set(
        [m.Patch("menu_items", ROW, 0, {"name": "Soup"}), m.Delete("menu_items", ROW, 0)],
        created_at=None,
        hints={},
    )

    [change_set] = replica.next_push_batch()

    assert change_set.ops == [
        m.Patch("menu_items", ROW, 7, {"name": "Soup"}),
        m.Delete("menu_items", ROW, 7),
    ]


def test_a_batch_stops_before_an_edit_of_a_row_the_batch_already_writes(tmp_path: Path) -> None:
    replica = Replica(str(tmp_path / "r.db"))
    other = "1c9e6b2a-5f3d-4a8b-9e7c-2d1f0a3b4c5d"
    fields: dict[str, m.Scalar] = {"name": "Soup", "price_cents": 500}
    for ops in (
        [m.Create("menu_items", ROW, fields)],
        [m.Create("menu_items", other, fields)],
        [m.Patch("menu_items", ROW, 0, {"price_cents": 550})],
    ):
        replica.record_change_set(ops, created_at=None, hints={})

    assert [cs.seq for cs in replica.next_push_batch()] == [1, 2]


def test_seqs_start_at_1_and_survive_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    replica = Replica(path)
    device_id = replica.device_id
    first = replica.record_change_set([m.Intent("x", {})], created_at=None, hints={})
    replica.close()

    replica = Replica(path)
    second = replica.record_change_set([m.Intent("x", {})], created_at=None, hints={})

    assert (first.seq, second.seq) == (1, 2) and replica.device_id == device_id
    assert [p.seq for p in replica.pending()] == [1, 2]


def test_a_replica_file_belongs_to_one_device(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    Replica(path, device_id="0b8f6a52-3c1d-4e7a-9f20-6d4c8b1a2e93").close()
    try:
        Replica(path, device_id="1c9e6b2a-5f3d-4a8b-9e7c-2d1f0a3b4c5d")
        raise AssertionError("opened another device's replica")
    except ValueError as exc:
        assert "0b8f6a52" in str(exc)


def test_backoff_waits_are_full_jitter_under_a_doubling_cap() -> None:
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(1))
    for attempt in range(1, 10):
        waits = [backoff.delay(attempt) for _ in range(200)]
        ceiling = min(8.0, 0.5 * 2**attempt)
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.8 and min(waits) < ceiling * 0.2  # spread, not fixed
    assert backoff.delay(1, retry_after=5.0) >= 5.0
