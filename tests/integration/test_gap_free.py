"""The gap test (issue point 4): no puller ever misses a committed change.

Eight devices push change-sets concurrently while pullers page through the log with cursors.
Every transaction sleeps at random *between allocating its scope versions and committing*, the
window in which a timestamp- or sequence-cursor design loses late commits. A ledger records every
write at the moment its transaction commits, so after every complete pull (``has_more`` false)
the oracle knows exactly what a replica at the puller's cursor must hold: for each row, its
latest write at or below the cursor. Nothing committed at or below a cursor may be missing.
(Only complete pulls are checked: a page cut short holds the latest images of the rows it
carries, not the state at its cursor, which is why clients stage pages until caught up.)
At the end, every committed write was delivered to every puller or superseded by a later write
of the same row that was, and each replica equals the server's rows exactly.

Run on SQLite and MariaDB (the one that matters: real row locks, READ COMMITTED writers,
REPEATABLE READ pulls). Breaking the counter lock (reading the version without FOR UPDATE)
makes this test fail: transactions then share versions and late commits fall behind cursors.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from domain.registry import filter_fields
from domain.roles import Role
from sync_protocol.checksums import row_checksum, sum_checksums
from sync_server.changelog import ChangeLog
from sync_server.pull import pull, visible_scopes
from sync_server.push import push
from tests.factories import Factory, User
from tests.syncing import (
    REGISTRY,
    change_set,
    cheap_passwords,
    create,
    delete,
    dish,
    intent,
    item,
    patch,
    principal,
    server_rows,
    to_change_sets,
    version_of,
)

__all__ = ["cheap_passwords"]

PUSHERS = 8
CHANGE_SETS_PER_PUSHER = 14
PULLERS = 3
Key = tuple[str, str]


@dataclass(frozen=True)
class Write:
    scope: str
    version: int
    key: Key
    deleted: bool
    data: dict[str, Any]


@dataclass
class CommitLedger:
    """Every synced write, appended when its transaction commits (in commit order)."""

    history: dict[str, list[Write]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)
    local: threading.local = field(default_factory=threading.local)

    def pending(self) -> list[Write]:
        if not hasattr(self.local, "writes"):
            self.local.writes = []
        return self.local.writes  # type: ignore[no-any-return]

    def on_commit(self, _conn: Any) -> None:
        # Fires before COMMIT is sent, while the transaction still holds its scope locks: the
        # append order per scope is the order in which the scopes were released.
        writes = self.pending()
        if writes:
            with self.lock:
                for w in writes:
                    self.history[w.scope].append(w)
            writes.clear()

    def on_rollback(self, _conn: Any) -> None:
        self.pending().clear()  # a deadlock retry: those versions were never committed

    def as_of(self, scope: str, cursor: int) -> dict[Key, tuple[int, dict[str, Any]]]:
        """The live rows of ``scope`` a replica at ``cursor`` must hold."""
        latest: dict[Key, Write] = {}
        with self.lock:
            for w in self.history[scope]:
                if w.version <= cursor and (
                    w.key not in latest or latest[w.key].version < w.version
                ):
                    latest[w.key] = w
        return {k: (w.version, w.data) for k, w in latest.items() if not w.deleted}


@pytest.fixture
def ledger(db: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[CommitLedger]:
    """Installs the ledger and the random delay inside every writing transaction."""
    book = CommitLedger()
    original = ChangeLog.finish

    def finish(self: ChangeLog) -> dict[str, int]:
        written = original(self)  # the versions are allocated and the counters updated
        book.pending().extend(
            Write(r.scope, r.version, (r.entity, r.id), r.deleted, dict(r.data))
            for r in self._rows.values()
            if r is not None and written.get(r.scope) == r.version
        )
        time.sleep(random.uniform(0, 0.004))  # ... and the commit comes late
        return written

    monkeypatch.setattr(ChangeLog, "finish", finish)
    event.listen(db, "commit", book.on_commit)
    event.listen(db, "rollback", book.on_rollback)
    yield book
    event.remove(db, "commit", book.on_commit)
    event.remove(db, "rollback", book.on_rollback)


def seed(book: CommitLedger, db: Engine) -> None:
    """What was written before the ledger listened (branches, staff, devices)."""
    for key, row in server_rows(db).items():
        book.history[row["scope"]].append(
            Write(row["scope"], row["version"], key, row["deleted"], row["data"])
        )
    for writes in book.history.values():
        writes.sort(key=lambda w: w.version)


@dataclass
class Puller:
    device: str
    user: User
    scopes: list[str]
    cursors: dict[str, int] = field(default_factory=dict)
    replica: dict[str, dict[Key, tuple[int, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    checks: int = 0
    #: Every (row, version) any page delivered, tombstones included.
    seen: set[tuple[Key, int]] = field(default_factory=set)

    def pull_until_caught_up(self, db: Engine, book: CommitLedger, limit: int) -> None:
        role = Role(self.user.role)
        while True:
            page = pull(
                db,
                device_id=self.device,
                role=role,
                scopes=self.scopes,
                cursors=self.cursors,
                limit=limit,
                registry=REGISTRY,
            )
            assert page.page_checksum == sum_checksums(
                row_checksum(c.entity, c.id, c.version) for c in page.changes
            )
            for c in page.changes:
                assert c.version > self.cursors.get(c.scope, 0), "a change at or below the cursor"
                rows = self.replica[c.scope]
                self.seen.add(((c.entity, c.id), c.version))
                if c.deleted:
                    rows.pop((c.entity, c.id), None)
                else:
                    rows[(c.entity, c.id)] = (c.version, c.data)
            self.cursors = dict(page.cursors)
            for state in page.scopes:
                live = self.replica[state.scope]
                assert (
                    len(live),
                    sum_checksums(row_checksum(*k, v) for k, (v, _) in live.items()),
                ) == (
                    state.count,
                    state.checksum,
                ), f"replica of {state.scope} disagrees with the scope checksum"
            if not page.has_more:
                break
        # Caught up: every scope's replica is the committed state at its cursor.
        for scope in self.scopes:
            expected = {
                k: (v, filter_fields(REGISTRY.entities[k[0]], role, data))
                for k, (v, data) in book.as_of(scope, self.cursors.get(scope, 0)).items()
            }
            assert self.replica[scope] == expected, (
                f"{self.device} at {scope}@{self.cursors.get(scope)} misses committed changes"
            )
        self.checks += 1


def pusher_work(
    db: Engine, user: User, device: str, known: dict[str, list[str]], rng: random.Random
) -> None:
    """Random creates, patches, deletes and intents; sometimes a resend of the last batch."""
    who = principal(user)
    manager = user.role == "manager"
    seq = 0
    last_batch: list[Any] = []
    while seq < CHANGE_SETS_PER_PUSHER:
        batch = []
        for _ in range(rng.randint(1, 3)):
            seq += 1
            ops: list[dict[str, Any]] = []
            for _ in range(rng.randint(1, 3)):
                roll = rng.random()
                items, dishes = list(known["inventory_items"]), list(known["menu_items"])
                if roll < 0.35 or not items:
                    ops.append(create("inventory_items", **item()))
                elif roll < 0.6:
                    ops.append(
                        patch("inventory_items", rng.choice(items), 0, name=f"n{rng.random()}")
                    )
                elif roll < 0.7 and manager:
                    victim = rng.choice(items)
                    ops.append(
                        delete("inventory_items", victim, version_of(db, "inventory_items", victim))
                    )
                elif roll < 0.85 and manager:
                    ops.append(create("menu_items", **dish()))  # org and branch in one txn
                elif dishes:
                    ops.append(intent("menu.mark_sold_out", menu_item_id=rng.choice(dishes)))
            if ops:
                batch.append(change_set(seq, *ops))
            else:
                seq -= 1
        if not batch:
            continue
        if last_batch and rng.random() < 0.2:
            replay = push(
                db,
                device_id=device,
                principal=who,
                change_sets=to_change_sets(*last_batch),
                registry=REGISTRY,
            )
            assert all(o.replayed for o in replay.outcomes)
        result = push(
            db,
            device_id=device,
            principal=who,
            change_sets=to_change_sets(*batch),
            registry=REGISTRY,
        )
        assert result.gap is None and len(result.outcomes) == len(batch)
        for cs, outcome in zip(batch, result.outcomes, strict=True):
            assert not outcome.replayed
            if outcome.status != "rejected":
                for op in cs["ops"]:
                    if op["op"] == "create":
                        known[op["entity"]].append(op["id"])
        last_batch = batch
        time.sleep(rng.uniform(0, 0.003))


def test_pullers_never_miss_a_commit_while_pushers_race_with_late_commits(
    db: Engine, factory: Factory, ledger: CommitLedger, cheap_passwords: None
) -> None:
    branch = factory.branch()
    users = [factory.user("manager" if i % 2 else "staff", [branch]) for i in range(PUSHERS)]
    devices = [factory.device(u) for u in users]
    readers = [factory.user("manager" if i else "staff", [branch]) for i in range(PULLERS)]
    pullers = [
        Puller(factory.device(u), u, visible_scopes(Role(u.role), frozenset(u.branch_ids)))
        for u in readers
    ]
    seed(ledger, db)
    known: dict[str, list[str]] = {"inventory_items": [], "menu_items": []}
    errors: list[BaseException] = []
    done = threading.Event()

    def guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
            done.set()

    def puller_loop(p: Puller, rng: random.Random) -> None:
        while not done.is_set():
            p.pull_until_caught_up(db, ledger, limit=rng.choice([3, 10, 1000]))
            time.sleep(rng.uniform(0, 0.005))

    push_threads = [
        threading.Thread(target=guarded, args=(pusher_work, db, u, d, known, random.Random(i)))
        for i, (u, d) in enumerate(zip(users, devices, strict=True))
    ]
    pull_threads = [
        threading.Thread(target=guarded, args=(puller_loop, p, random.Random(100 + i)))
        for i, p in enumerate(pullers)
    ]
    for t in pull_threads + push_threads:
        t.start()
    for t in push_threads:
        t.join(timeout=60)
    done.set()
    for t in pull_threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]

    # Version order is commit order, and versions have no holes: commits appear in the ledger
    # (in the order the scope locks were released) with strictly increasing versions per scope.
    for scope, writes in ledger.history.items():
        versions = [w.version for w in writes]
        assert versions == sorted(versions), f"{scope}: commit order differs from version order"
        distinct = sorted(set(versions))
        assert distinct == list(range(distinct[0], distinct[-1] + 1)), f"{scope}: version hole"

    # After the last push every puller catches up to exactly the server's rows.
    final = server_rows(db)
    for p in pullers:
        p.pull_until_caught_up(db, ledger, limit=50)
        assert p.checks > 1
        # Every committed write at or below the final cursor was delivered, or superseded by a
        # later write of the same row that was.
        for scope in p.scopes:
            writes = ledger.history[scope]
            for w in writes:
                assert (w.key, w.version) in p.seen or any(
                    later.key == w.key
                    and later.version > w.version
                    and (later.key, later.version) in p.seen
                    for later in writes
                ), f"{p.device} never received {w}"
        role = Role(p.user.role)
        for scope in p.scopes:
            expected = {
                k: (r["version"], filter_fields(REGISTRY.entities[k[0]], role, r["data"]))
                for k, r in final.items()
                if r["scope"] == scope and not r["deleted"]
            }
            assert p.replica[scope] == expected
    assert len(known["inventory_items"]) > PUSHERS
    assert any(r["deleted"] for r in final.values())  # tombstones were part of the race
