"""What one request costs in database round trips: every statement the app sends for one push
and one pull, counted in-process (Starlette TestClient over the same app and engine).

Throughput on a shared counter is bounded by how long each transaction holds the counter's row
lock, and in this design that is dominated by the round trips made while holding it; so the
benchmark prints them next to the measured rates.
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import msgspec
import pymysql.connections  # type: ignore[import-untyped]
from sqlalchemy import event

from sync_protocol import messages as m
from sync_protocol.codec import MSGPACK
from sync_server.app import create_app
from sync_server.resources import Resources

with warnings.catch_warnings():
    # Starlette deprecates driving its TestClient with httpx; it is what this project pins.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

_encode = msgspec.msgpack.Encoder().encode


@dataclass(frozen=True)
class Anatomy:
    #: Statements sent, COMMIT and ROLLBACK included.
    statements: int
    #: Of those, sent while holding a scope counter's row lock (FOR UPDATE on sync_scopes
    #: up to the COMMIT that releases it).
    under_scope_lock: int
    #: Connections checked out of the pool.
    checkouts: int
    #: Commands sent to the database server, counted in the driver: the statements plus what
    #: SQLAlchemy sends unseen (pool pre-ping, reset-on-return rollback, isolation-level SETs).
    round_trips: int


class _Recorder:
    def __init__(self, resources: Resources) -> None:
        self.engine = resources.engine
        self.statements: list[str] = []
        self.commands: list[int] = []
        self.checkouts = 0

    def __enter__(self) -> _Recorder:
        self._original = pymysql.connections.Connection._execute_command
        original = self._original
        commands = self.commands

        def counting(conn: Any, command: int, sql: Any) -> Any:
            commands.append(command)
            return original(conn, command, sql)

        pymysql.connections.Connection._execute_command = counting
        event.listen(self.engine, "before_cursor_execute", self._execute)
        event.listen(self.engine, "commit", self._commit)
        event.listen(self.engine, "rollback", self._rollback)
        event.listen(self.engine.pool, "checkout", self._checkout)
        return self

    def __exit__(self, *exc: object) -> None:
        pymysql.connections.Connection._execute_command = self._original
        event.remove(self.engine, "before_cursor_execute", self._execute)
        event.remove(self.engine, "commit", self._commit)
        event.remove(self.engine, "rollback", self._rollback)
        event.remove(self.engine.pool, "checkout", self._checkout)

    def _execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(" ".join(statement.split()))

    def _commit(self, conn: Any) -> None:
        self.statements.append("COMMIT")

    def _rollback(self, conn: Any) -> None:
        self.statements.append("ROLLBACK")

    def _checkout(self, *args: Any) -> None:
        self.checkouts += 1

    def anatomy(self) -> Anatomy:
        locked = 0
        holding = False
        for statement in self.statements:
            if (
                statement.startswith("SELECT")
                and "FROM sync_scopes" in statement
                and ("FOR UPDATE" in statement)
            ):
                holding = True
            if holding:
                locked += 1
            if statement in ("COMMIT", "ROLLBACK"):
                holding = False
        return Anatomy(len(self.statements), locked, self.checkouts, len(self.commands))


def push_and_pull_anatomy(
    resources: Resources, token: str, device_id: str, ops_per_change_set: int
) -> tuple[Anatomy, Anatomy]:
    """Count the statements of a push of one change-set (1 create, then ``ops - 1`` renames of
    rows created just before) and of an up-to-date pull, for a fresh device."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": MSGPACK, "Accept": MSGPACK}
    ids = [str(uuid.uuid4()) for _ in range(ops_per_change_set)]
    warm = m.ChangeSet(
        str(uuid.uuid4()),
        1,
        [
            m.Create(
                "inventory_items",
                item_id,
                {"sku": f"ANAT-{item_id[:8]}", "name": "x", "category": "c", "unit": "kg"},
            )
            for item_id in ids[1:]
        ],
    )
    with TestClient(create_app(resources=resources)) as client:
        reply = client.post(
            "/sync/v1/push",
            content=_encode(m.PushRequest(m.PROTOCOL_VERSION, device_id, [warm])),
            headers=headers,
        )
        outcome = msgspec.msgpack.decode(reply.content, type=m.PushResponse).outcomes[0]
        version = next(iter(outcome.versions.values()))
        measured = m.ChangeSet(
            str(uuid.uuid4()),
            2,
            [
                m.Create(
                    "inventory_items",
                    ids[0],
                    {"sku": f"ANAT-{ids[0][:8]}", "name": "x", "category": "c", "unit": "kg"},
                ),
                *[m.Patch("inventory_items", i, version, {"name": "renamed"}) for i in ids[1:]],
            ],
        )
        with _Recorder(resources) as recorder:
            reply = client.post(
                "/sync/v1/push",
                content=_encode(m.PushRequest(m.PROTOCOL_VERSION, device_id, [measured])),
                headers=headers,
            )
        result = msgspec.msgpack.decode(reply.content, type=m.PushResponse)
        if result.outcomes[0].status != "applied":
            raise AssertionError(f"anatomy push was not applied: {result.outcomes[0]}")
        push = recorder.anatomy()

        cursors: dict[str, int] = {}
        while True:
            page = msgspec.msgpack.decode(
                client.post(
                    "/sync/v1/pull",
                    content=_encode(m.PullRequest(m.PROTOCOL_VERSION, device_id, cursors)),
                    headers=headers,
                ).content,
                type=m.PullResponse,
            )
            cursors = page.cursors
            if not page.has_more:
                break
        with _Recorder(resources) as recorder:
            client.post(
                "/sync/v1/pull",
                content=_encode(m.PullRequest(m.PROTOCOL_VERSION, device_id, cursors)),
                headers=headers,
            )
        pull = recorder.anatomy()
    return push, pull
