"""Where push requests wait to be applied, and how they are grouped (group commit).

Every push request becomes a :class:`~sync_server.push_group.PushUnit` queued in a *lane*. A lane
is drained by one sync thread at a time: it takes the units waiting in it (up to
``GALLEY_PUSH_GROUP_LIMIT`` change-sets) and applies them as one group
(:func:`~sync_server.push_group.push_group`), then the next group, and so on. Pushes that would
queue on the same scope counter anyway therefore share one transaction instead of waiting for
each other's.

Lanes exist for throughput only, never for correctness (the locks of the push steps give
that): a device's lane is the set of scopes its last push wrote, learned from its results, so
the devices of a branch meet in the same lane and devices of other branches do not wait for
them. A device seen for the first time goes to the lane of unknown devices. A lane holds at most
one group in flight, and a drained lane hands its thread back between groups, so a busy lane
never keeps other lanes' pushes waiting for a thread.

A request too large for a group (a device sending its backlog) is applied alone by
:func:`~sync_server.push.push`, one transaction per change-set, in its lane's turn.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from sqlalchemy.engine import Connection, Engine

from domain.ops import Principal
from domain.registry import Registry

from .authn import load_identities
from .push import PushResult
from .push_group import PushUnit, UnitResult, push_alone, push_group
from .tokens import AccessClaims

log = logging.getLogger("galley.push")

#: Ops in one group, at most: a group's transaction stays short however many pushes wait.
MAX_GROUP_OPS = 1_000


@dataclass
class _Waiting:
    unit: PushUnit
    #: Run before the unit joins a group (the rate limit); raising refuses the unit.
    admit: Callable[[], None]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[PushResult]
    change_sets: int
    ops: int


class PushCommitter:
    """Applies push requests in groups, on a sync thread (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        registry: Registry,
        *,
        group_limit: int,
        published: Callable[[dict[str, int]], None],
    ) -> None:
        self._engine = engine
        self._executor = executor
        self._registry = registry
        self._group_limit = group_limit
        self._published = published
        self._guard = threading.Lock()
        self._queue: deque[_Waiting] = deque()
        self._draining = False
        # The connection groups run on, kept between groups: one group runs at a time, and a
        # busy server then skips a pool checkout (and its liveness ping) per group.
        self._conn: Connection | None = None
        self._last_used = 0.0

    async def push(self, unit: PushUnit, *, admit: Callable[[], None]) -> PushResult:
        """Queue ``unit`` and wait for its result (or the exception that refused it)."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(
            unit,
            admit,
            loop,
            loop.create_future(),
            len(unit.change_sets),
            sum(len(cs.ops) for cs in unit.change_sets),
        )
        with self._guard:
            self._queue.append(waiting)
            start = not self._draining
            self._draining = True
        if start:
            self._schedule()
        return await waiting.future

    def _connection(self) -> Connection:
        """The kept connection, or a fresh one from the pool (checked there, ``pool_pre_ping``)
        when there is none, it broke, or it sat unused for a while (the server may have
        dropped it meanwhile)."""
        now = time.monotonic()
        if self._conn is not None and (self._conn.invalidated or now - self._last_used > 5.0):
            self.close()
        if self._conn is None:
            self._conn = self._engine.connect()
        self._last_used = now
        return self._conn

    def close(self) -> None:
        """Give the kept connection back to the pool (shutdown; after an error)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a broken connection: the pool discards it
                log.debug("closing the push connection failed", exc_info=True)

    def _groupable(self, waiting: _Waiting) -> bool:
        return waiting.change_sets <= self._group_limit and waiting.ops <= MAX_GROUP_OPS

    def _schedule(self) -> None:
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # shutting down: the executor takes nothing new
            with self._guard:
                waiting = list(self._queue)
                self._queue.clear()
                self._draining = False
            for w in waiting:
                _settle(w, RuntimeError("the server is shutting down"))

    def _take(self) -> list[_Waiting]:
        """The next group (called with the guard held)."""
        first = self._queue.popleft()
        group = [first]
        if not self._groupable(first):
            return group
        change_sets, ops = first.change_sets, first.ops
        while self._queue and self._groupable(self._queue[0]):
            nxt = self._queue[0]
            if change_sets + nxt.change_sets > self._group_limit or ops + nxt.ops > MAX_GROUP_OPS:
                break
            group.append(self._queue.popleft())
            change_sets += nxt.change_sets
            ops += nxt.ops
        return group

    def _drain(self) -> None:
        """Apply one group; the next one is scheduled behind the other work of the threads."""
        with self._guard:
            group = self._take() if self._queue else []
        try:
            if group:
                self._apply(group)
        finally:
            with self._guard:
                more = bool(self._queue)
                self._draining = more
            if more:
                self._schedule()

    def _apply(self, group: Sequence[_Waiting]) -> None:
        admitted: list[_Waiting] = []
        for w in group:
            try:
                w.admit()
            except Exception as exc:
                _settle(w, exc)
            else:
                admitted.append(w)
        if not admitted:
            return
        units = [w.unit for w in admitted]
        try:
            with self._engine.connect() as conn:
                if len(admitted) == 1 and not self._groupable(admitted[0]):
                    results: list[UnitResult] = [
                        push_alone(conn, units[0], registry=self._registry, identify=principals)
                    ]
                else:
                    results = push_group(conn, units, registry=self._registry, identify=principals)
            if conn.in_transaction():  # a refusal's reads: nothing to keep
                conn.rollback()
        except Exception as exc:  # the database is unreachable, say: every unit fails with it
            for w in admitted:
                _settle(w, exc)
            return
        versions: dict[str, int] = {}
        for w, result in zip(admitted, results, strict=True):
            if isinstance(result, PushResult):
                for scope, version in result.versions.items():
                    versions[scope] = max(versions.get(scope, 0), version)
            _settle(w, result)
        if versions:
            self._published(versions)


def principals(conn: Connection, claims: Sequence[AccessClaims]) -> list[Principal | Exception]:
    """Who is pushing, for each unit's token claims: the user as the database says now."""
    return [
        who if isinstance(who, Exception) else Principal(who.user_id, who.role, who.branch_ids)
        for who in load_identities(conn, claims)
    ]


def _settle(waiting: _Waiting, result: UnitResult) -> None:
    """Hand ``result`` to the request waiting on the event loop (it may have gone away)."""

    def resolve() -> None:
        if waiting.future.done():  # the client disconnected; the result stays applied
            return
        if isinstance(result, Exception):
            waiting.future.set_exception(result)
        else:
            waiting.future.set_result(result)

    try:
        waiting.loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        log.debug("push result for device %s not delivered", waiting.unit.device_id)
