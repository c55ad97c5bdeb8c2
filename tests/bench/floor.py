"""The floors: what raw pymysql achieves on the same database, with none of Galley in the way.

* Initial sync: one ``SELECT`` of the scope's rows in version order and a MessagePack encoding of
  them in the wire shape of ``RowChange`` (row images passed through as stored, as Galley does).
* Push: "locked-counter transactions" from the same number of threads on the same number of
  counters as the push run: ``BEGIN; SELECT … FOR UPDATE`` the counter; ``UPDATE`` it; ``INSERT``
  one row; ``COMMIT``. That is the least any gap-free versioned write can cost.
* Pull with nothing new: the statements one such pull runs (snapshot level, identity with its
  session check and branches, device with the write checkpoint, scope heads, one range probe per
  scope, rollback) on one connection, no HTTP.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import msgspec
from sqlalchemy.engine import make_url

from .dataset import connect
from .stats import percentiles


@dataclass(frozen=True)
class Throughput:
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def initial_sync_floor(database_url: str, scope: str, repeats: int = 3) -> Throughput:
    """Best of ``repeats``: select every row of ``scope`` and encode it as one MessagePack body."""
    url = make_url(database_url)
    encode = msgspec.msgpack.Encoder().encode
    best: Throughput | None = None
    for _ in range(repeats):
        conn = connect(url)
        try:
            started = time.perf_counter()
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT entity, row_id, version, deleted, data FROM sync_rows"
                    " WHERE scope=%s AND version>%s ORDER BY version",
                    (scope, 0),
                )
                rows = cur.fetchall()
            body = encode(
                [
                    {
                        "entity": entity,
                        "id": row_id,
                        "scope": scope,
                        "version": version,
                        "deleted": bool(deleted),
                        "data": None if deleted else msgspec.Raw(data),
                    }
                    for entity, row_id, version, deleted, data in rows
                ]
            )
            elapsed = time.perf_counter() - started
        finally:
            conn.close()
        assert body
        result = Throughput(len(rows), elapsed)
        if best is None or result.rate > best.rate:
            best = result
    assert best is not None
    return best


def locked_counter_floor(
    database_url: str, threads: int, counters: int, seconds: float, suffix: str = ""
) -> Throughput:
    """Transactions/s of ``threads`` writers; thread ``i`` numbers its rows with counter
    ``i % counters``."""
    url = make_url(database_url)
    payload = b"x" * 200
    done = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def writer(index: int) -> None:
        conn = connect(url, autocommit=False)
        counter = index % counters
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            start.wait()
            while not stop.is_set():
                with conn.cursor() as cur:
                    cur.execute("BEGIN")
                    cur.execute(
                        f"SELECT n FROM bench_counters{suffix} WHERE id=%s FOR UPDATE", (counter,)
                    )
                    (n,) = cur.fetchone()
                    cur.execute(
                        f"UPDATE bench_counters{suffix} SET n=%s WHERE id=%s", (n + 1, counter)
                    )
                    cur.execute(
                        f"INSERT INTO bench_rows{suffix} (counter_id, n, payload)"
                        " VALUES (%s, %s, %s)",
                        (counter, n + 1, payload),
                    )
                    conn.commit()
                done[index] += 1
        finally:
            conn.close()

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return Throughput(sum(done), time.perf_counter() - began)


def idle_pull_floor(
    database_url: str,
    *,
    user_id: str,
    device_id: str,
    cursors: dict[str, int],
    requests: int,
) -> dict[str, float]:
    """Latency percentiles (ms) of the statements an up-to-date pull runs, raw."""
    url = make_url(database_url)
    conn = connect(url, autocommit=False)
    scopes = list(cursors)
    marks = ", ".join(["%s"] * len(scopes))
    samples: list[float] = []
    try:
        for _ in range(requests):
            started = time.perf_counter()
            with conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur.execute(
                    "SELECT u.id, u.role, u.display_name, u.is_active, u.token_epoch,"
                    " EXISTS (SELECT r.id FROM refresh_tokens r WHERE r.access_jti=%s"
                    " AND r.revoked_at IS NOT NULL), ub.branch_id"
                    " FROM users u LEFT JOIN user_branches ub ON ub.user_id = u.id"
                    " WHERE u.id=%s",
                    ("bench-token-id", user_id),
                )
                cur.fetchall()
                cur.execute(
                    "SELECT last_applied_seq, seen_horizons, pull_cursors, pulled_role, user_id,"
                    " revoked_at FROM devices WHERE id=%s",
                    (device_id,),
                )
                cur.fetchall()
                cur.execute(f"SELECT * FROM sync_scopes WHERE scope IN ({marks})", scopes)
                cur.fetchall()
                for scope, cursor in cursors.items():
                    cur.execute(
                        "SELECT entity, row_id, version, deleted, data FROM sync_rows"
                        " WHERE scope=%s AND version>%s ORDER BY version LIMIT 1001",
                        (scope, cursor),
                    )
                    cur.fetchall()
                conn.rollback()
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        conn.close()
    return percentiles(samples)
