"""Where push requests wait to be applied, and how they are grouped (group commit).

Every push request becomes a :class:`~sync_server.push_group.PushUnit` in one queue per
process. A sync thread takes the units waiting (up to ``GALLEY_PUSH_GROUP_LIMIT`` change-sets and
:data:`MAX_GROUP_OPS` ops) and applies them as one group
(:func:`~sync_server.push_group.push_group`), then the next group, and so on: pushes that arrive
while a group is being applied share the next transaction instead of each queueing on the scope
counters for their own. Normally one group is applied at a time; its next one is scheduled behind
the threads' other work (device registrations).

A group still running after :data:`STALLED_AFTER` seconds is most likely waiting on a lock held
elsewhere: the pushes queued behind it then get a group of their own on another thread (up to
``GALLEY_DB_WORKERS`` groups at once). A push whose device is in a running group stays queued
until that group ends: its device's row is locked there, and it would hold up the rest of its
group (a retry of a stuck push must not stall the pushes that got around it).

A request too large for a group (a device sending its backlog) is applied alone by
:func:`~sync_server.push.push`, one transaction per change-set, in its turn.

**Gathering.** Devices pushing back to back (a queue sent request after request, a busy
service) would otherwise split into two cohorts that alternate: those answered by one group
push again while the next group, of the others, runs, and so on, each group paying the fixed
cost of a transaction for half of them. So when a group ends, the next one waits for the
devices just answered that had themselves pushed again promptly after their previous answer
(within ``GALLEY_PUSH_GATHER_MS``), until they are queued again or that long after the group
ended, whichever comes first. A device's first push, or one after a pause, is nobody's reason
to wait: a quiet server applies each push at once.
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
#: A group running this long (seconds) is taken to be stuck (on a lock held elsewhere): the
#: pushes waiting behind it get a group of their own on another thread. Groups normally take
#: milliseconds; a stuck one would otherwise hold every push of the process.
STALLED_AFTER = 0.25
#: Seconds an unused kept connection is trusted without the pool's liveness check.
KEEP_CONNECTION_FOR = 5.0


@dataclass
class _Waiting:
    unit: PushUnit
    #: Run before the unit joins a group (the rate limit); raising refuses the unit.
    admit: Callable[[], None]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[PushResult]
    change_sets: int
    ops: int
    #: Whether the device pushed within the gathering time of its previous answer.
    prompt: bool = False


class PushCommitter:
    """Applies push requests in groups, on a sync thread (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        registry: Registry,
        *,
        group_limit: int,
        max_running: int,
        published: Callable[[dict[str, int]], None],
        gather_for: float = 0.0,
        stalled_after: float = STALLED_AFTER,
    ) -> None:
        self._engine = engine
        self._executor = executor
        self._registry = registry
        self._group_limit = group_limit
        self._published = published
        self._guard = threading.Lock()
        #: Notified when a push is queued (a drain gathering its group waits on it).
        self._queued = threading.Condition(self._guard)
        self._gather_for = gather_for
        self._stalled_after = stalled_after
        #: The devices of the last group applied, and when it ended (monotonic).
        self._answered: dict[str, float] = {}
        #: Those of them the next group waits for (see :meth:`_gather`), and until when.
        self._expected: set[str] = set()
        self._gather_until = 0.0
        self._queue: deque[_Waiting] = deque()
        #: When each group being applied began (monotonic), newest last; each drain removes
        #: its own.
        self._running: list[float] = []
        #: Devices with a push in a running group -> how many such pushes.
        self._busy: dict[str, int] = {}
        self._max_running = max_running
        # A connection kept between groups: a busy server skips a pool checkout (and its
        # liveness ping) per group.
        self._conn: Connection | None = None
        self._last_used = 0.0
        self.closed = False

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
        started = time.monotonic()
        with self._guard:
            answered = self._answered.get(unit.device_id)
            waiting.prompt = answered is not None and started - answered <= self._gather_for
            self._queue.append(waiting)
            self._queued.notify()
            start = not self._running
            if start:
                self._running.append(started)
        if start:
            self._schedule(started)
        else:
            loop.call_later(self._stalled_after, self._widen)
        return await waiting.future

    def _widen(self) -> None:
        """Start another group beside the running ones if the newest of them has been running
        for long (waiting on a lock, most likely) and pushes still wait; if it has not been
        running for long yet, look again when it will have. (On the event loop.)"""
        now = time.monotonic()
        again = 0.0
        with self._guard:
            start = self._eligible() and 0 < len(self._running) < self._max_running
            if start:
                age = now - self._running[-1]
                if age < self._stalled_after:
                    start, again = False, self._stalled_after - age
                else:
                    self._running.append(now)
        if start:
            self._schedule(now)
        elif again:
            asyncio.get_running_loop().call_later(again, self._widen)

    def _lease(self) -> Connection:
        """The kept connection, or one from the pool (checked there, ``pool_pre_ping``) when it
        is in use by another group, broke, or sat unused for a while (the database may have
        dropped it meanwhile)."""
        with self._guard:
            conn, self._conn = self._conn, None
            stale = time.monotonic() - self._last_used > KEEP_CONNECTION_FOR
        if conn is not None and (stale or conn.invalidated):
            _close(conn)
            conn = None
        return conn if conn is not None else self._engine.connect()

    def _give_back(self, conn: Connection) -> None:
        with self._guard:
            keep = self._conn is None and not self.closed
            if keep:
                self._conn = conn
                self._last_used = time.monotonic()
        if not keep:
            _close(conn)

    def close(self) -> None:
        """Give the kept connection back to the pool (shutdown)."""
        with self._guard:
            self.closed = True
            self._queued.notify_all()
            conn, self._conn = self._conn, None
        if conn is not None:
            _close(conn)

    def _groupable(self, waiting: _Waiting) -> bool:
        return waiting.change_sets <= self._group_limit and waiting.ops <= MAX_GROUP_OPS

    def _schedule(self, started: float) -> None:
        """Run a drain, whose entry in ``_running`` is ``started``, on a sync thread."""
        try:
            self._executor.submit(self._drain, started)
        except RuntimeError:  # shutting down: the executor takes nothing new
            with self._guard:
                waiting = list(self._queue)
                self._queue.clear()
                self._running.clear()
            for w in waiting:
                _settle(w, RuntimeError("the server is shutting down"))

    def _eligible(self) -> bool:
        """Whether a queued push could join a group now (called with the guard held)."""
        return any(w.unit.device_id not in self._busy for w in self._queue)

    def _gather(self) -> None:
        """Before taking a group: wait until the devices expected back are queued again, or
        the gathering time after the last group is over (called with the guard held, which
        waiting releases). Only the one drain running waits: one started beside a stuck group
        must not."""
        while self._expected and not self.closed and len(self._running) == 1:
            left = self._gather_until - time.monotonic()
            if left <= 0:
                return
            queued = {w.unit.device_id for w in self._queue}
            if self._expected <= queued or self._full():
                return
            self._queued.wait(left)

    def _full(self) -> bool:
        """Whether the queue already holds a whole group (called with the guard held)."""
        change_sets = sum(w.change_sets for w in self._queue)
        ops = sum(w.ops for w in self._queue)
        return change_sets >= self._group_limit or ops >= MAX_GROUP_OPS

    def _take(self) -> list[_Waiting]:
        """The next group: the oldest pushes whose devices are in no running group, within
        the group's limits (called with the guard held)."""
        group: list[_Waiting] = []
        rest: deque[_Waiting] = deque()
        change_sets = ops = 0
        while self._queue:
            w = self._queue.popleft()
            if w.unit.device_id in self._busy:
                rest.append(w)
                continue
            if group and (
                not self._groupable(group[0])
                or not self._groupable(w)
                or change_sets + w.change_sets > self._group_limit
                or ops + w.ops > MAX_GROUP_OPS
            ):
                rest.append(w)
                break
            group.append(w)
            change_sets += w.change_sets
            ops += w.ops
        rest.extend(self._queue)
        self._queue = rest
        for w in group:
            self._busy[w.unit.device_id] = self._busy.get(w.unit.device_id, 0) + 1
        return group

    def _drain(self, started: float) -> None:
        """Apply one group; the next one is scheduled behind the threads' other work."""
        with self._guard:
            self._gather()
            group = self._take()
        try:
            if group:
                self._apply(group)
        except Exception as exc:  # a bug: the requests must still get an answer
            log.exception("applying a group of %d pushes failed", len(group))
            for w in group:
                _settle(w, exc)
        finally:
            with self._guard:
                for w in group:
                    left = self._busy.pop(w.unit.device_id) - 1
                    if left:
                        self._busy[w.unit.device_id] = left
                more = self._eligible()
                if started in self._running:  # gone only if shutdown cleared them all
                    self._running.remove(started)
                if more:
                    again = time.monotonic()
                    self._running.append(again)
            if more:
                self._schedule(again)

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
        conn: Connection | None = None
        started = time.monotonic()
        try:
            conn = self._lease()
            if len(admitted) == 1 and not self._groupable(admitted[0]):
                results: list[UnitResult] = [
                    push_alone(conn, units[0], registry=self._registry, identify=principals)
                ]
            else:
                results = push_group(conn, units, registry=self._registry, identify=principals)
        except Exception as exc:  # the database is unreachable, say: every unit fails with it
            if conn is not None:
                _close(conn)
            for w in admitted:
                _settle(w, exc)
            return
        try:
            if conn.in_transaction():  # a refusal's reads: nothing to keep
                conn.rollback()
        except Exception:  # the results stand (they were committed); the connection goes
            _close(conn)
        else:
            self._give_back(conn)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "applied %d pushes (%d change-sets) as one group in %.1f ms",
                len(admitted),
                sum(w.change_sets for w in admitted),
                (time.monotonic() - started) * 1000,
            )
        with self._guard:
            # Before any device hears back: its next push must find itself answered.
            ended = time.monotonic()
            self._answered = {w.unit.device_id: ended for w in admitted}
            self._expected = {w.unit.device_id for w in admitted if w.prompt}
            self._gather_until = ended + self._gather_for
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


def _close(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # a broken connection: the pool discards it
        log.debug("closing a push connection failed", exc_info=True)


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
