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
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from domain.registry import Registry

from .push import PushResult
from .push_group import PushUnit, UnitResult, push_alone, push_group

log = logging.getLogger("galley.push")

#: Ops in one group, at most: a group's transaction stays short however many pushes wait.
MAX_GROUP_OPS = 1_000
#: Devices whose lane is remembered, at most (the memory is forgotten past it: only speed).
_MAX_REMEMBERED = 100_000


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
    """Applies push requests in groups, on the sync threads (see the module docstring)."""

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
        self._lanes: dict[str, deque[_Waiting]] = {}
        self._draining: set[str] = set()
        self._lane_of: dict[str, str] = {}

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
        lane = self._lane_of.get(unit.device_id, "")
        with self._guard:
            self._lanes.setdefault(lane, deque()).append(waiting)
            start = lane not in self._draining
            self._draining.add(lane)
        if start:
            self._schedule(lane)
        return await waiting.future

    def _groupable(self, waiting: _Waiting) -> bool:
        return waiting.change_sets <= self._group_limit and waiting.ops <= MAX_GROUP_OPS

    def _schedule(self, lane: str) -> None:
        try:
            self._executor.submit(self._drain, lane)
        except RuntimeError:  # shutting down: the executor takes nothing new
            self._fail_lane(lane, RuntimeError("the server is shutting down"))

    def _fail_lane(self, lane: str, exc: Exception) -> None:
        with self._guard:
            waiting = list(self._lanes.pop(lane, ()))
            self._draining.discard(lane)
        for w in waiting:
            _settle(w, exc)

    def _take(self, lane: str) -> list[_Waiting]:
        """The next group of ``lane`` (called with the guard held)."""
        queue = self._lanes[lane]
        first = queue.popleft()
        group = [first]
        if not self._groupable(first):
            return group
        change_sets, ops = first.change_sets, first.ops
        while queue and self._groupable(queue[0]):
            nxt = queue[0]
            if change_sets + nxt.change_sets > self._group_limit or ops + nxt.ops > MAX_GROUP_OPS:
                break
            group.append(queue.popleft())
            change_sets += nxt.change_sets
            ops += nxt.ops
        return group

    def _drain(self, lane: str) -> None:
        """One group of ``lane``; the next one is scheduled behind other lanes' work."""
        with self._guard:
            group = self._take(lane) if self._lanes.get(lane) else []
        try:
            if group:
                self._apply(group)
        finally:
            with self._guard:
                more = bool(self._lanes.get(lane))
                if not more:
                    self._lanes.pop(lane, None)
                    self._draining.discard(lane)
            if more:
                self._schedule(lane)

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
                    results: list[UnitResult] = [push_alone(conn, units[0], self._registry)]
                else:
                    results = push_group(conn, units, registry=self._registry)
        except Exception as exc:  # the database is unreachable, say: every unit fails with it
            for w in admitted:
                _settle(w, exc)
            return
        versions: dict[str, int] = {}
        for w, result in zip(admitted, results, strict=True):
            if isinstance(result, PushResult) and result.versions:
                self._remember(w.unit.device_id, result.versions)
                for scope, version in result.versions.items():
                    versions[scope] = max(versions.get(scope, 0), version)
            _settle(w, result)
        if versions:
            self._published(versions)

    def _remember(self, device_id: str, versions: dict[str, int]) -> None:
        if len(self._lane_of) >= _MAX_REMEMBERED:
            self._lane_of.clear()
        self._lane_of[device_id] = " ".join(sorted(versions))


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
