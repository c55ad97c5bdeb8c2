"""The sync loop of the reference client (docs/protocol.md § Client state machine).

One :meth:`SyncClient.sync` runs, from whatever state the replica file is in:

1. **register** the device once (remembering the server's last applied seq);
2. **push** the outbox in seq order until every change-set has an answer;
3. **pull** pages from the staged (or committed) cursors into staging until ``has_more`` is
   false, checking each page's checksum;
4. **commit**: apply the staged pages at once, verify each scope's count/checksum, drop the
   change-sets the pull's write checkpoint contains, re-apply the still-pending ones.

Each step is safe to repeat, so any transient failure (network, 5xx) restarts the loop after an
exponential backoff with full jitter, and a process killed anywhere resumes from the file.
``reset_required`` (or a replica that fails verification) rebuilds the affected scopes from
version 0, keeping the outbox.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from .. import messages as m
from ..checksums import MOD, row_checksum
from ..codec import MSGPACK
from .errors import (
    CorruptPage,
    DeviceNotRegistered,
    ReplicaMismatch,
    ResetRequired,
    SyncError,
    SyncFailed,
    TransientError,
)
from .records import IntentApplier, Row
from .replica import Replica
from .transport import TokenProvider, Transport

_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}


def _sync_lock(path: str) -> threading.Lock:
    key = os.path.realpath(path)
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base*2**n))."""

    base: float = 0.25
    cap: float = 30.0
    attempts: int = 8
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        wait = self.rng.uniform(0, min(self.cap, self.base * 2**attempt))
        if retry_after is not None:
            wait = max(wait, min(self.cap, retry_after))
        return wait


@dataclass
class SyncReport:
    """What one :meth:`SyncClient.sync` did."""

    pushed: int = 0
    applied: int = 0
    rejected: int = 0
    conflicts: int = 0
    renumbered: int = 0
    pages: int = 0
    rows: int = 0
    dropped_change_sets: int = 0
    resets: list[str] = field(default_factory=list)
    retries: int = 0


class ChangeSetBuilder:
    """Collects the ops of one change-set (see :meth:`SyncClient.change_set`)."""

    def __init__(self, replica: Replica) -> None:
        self._replica = replica
        self.ops: list[m.Op] = []
        self.hints: dict[str, str] = {}
        self._created: set[tuple[str, str]] = set()

    def create(
        self,
        entity: str,
        fields: Mapping[str, m.Scalar],
        *,
        id: str | None = None,
        scope: str | None = None,
    ) -> str:
        """Create a row (a new UUID unless ``id`` is given); returns its id. ``scope`` is
        optional and only labels the row in the local view until the server's copy arrives."""
        row_id = (id or str(uuid.uuid4())).lower()
        self.ops.append(m.Create(entity, row_id, dict(fields)))
        self._created.add((entity, row_id))
        if scope is not None:
            self.hints[row_id] = scope
        return row_id

    def patch(self, entity: str, row_id: str, fields: Mapping[str, m.Scalar]) -> None:
        """Change ``fields`` of a row the app can see, based on the version it sees."""
        self.ops.append(m.Patch(entity, row_id.lower(), self._base(entity, row_id), dict(fields)))

    def delete(self, entity: str, row_id: str) -> None:
        """Delete a row the app can see."""
        self.ops.append(m.Delete(entity, row_id.lower(), self._base(entity, row_id)))

    def intent(self, name: str, args: Mapping[str, m.Scalar]) -> None:
        """A domain intent (the server applies its meaning to its current state)."""
        self.ops.append(m.Intent(name, dict(args)))

    def _base(self, entity: str, row_id: str) -> int:
        if (entity, row_id.lower()) in self._created:
            return 0
        row = self._replica.get(entity, row_id)
        if row is None:
            raise LookupError(f"{entity} {row_id} is not in the replica")
        return row.version


class SyncClient:
    """A device: its replica file, its outbox and the sync loop.

    ``http`` is any :class:`httpx.Client` (Starlette's ``TestClient`` in tests) and
    ``token_provider(refresh)`` returns a bearer token — a fresh one when ``refresh`` is true
    (after a 401). ``intents`` gives the optimistic local effect of domain intents.
    """

    def __init__(
        self,
        path: str,
        http: httpx.Client,
        base_url: str,
        token_provider: TokenProvider,
        *,
        device_id: str | None = None,
        platform: str = "python",
        app_version: str = "1.0.0",
        intents: Mapping[str, IntentApplier] | None = None,
        page_limit: int = m.DEFAULT_PULL_LIMIT,
        initial_page_limit: int | None = m.MAX_PULL_LIMIT,
        backoff: Backoff | None = None,
        media_type: str = MSGPACK,
    ) -> None:
        self.replica = Replica(path, device_id=device_id, intents=intents)
        self.transport = Transport(http, base_url, token_provider, media_type=media_type)
        self.platform = platform
        self.app_version = app_version
        self.page_limit = page_limit
        # Catching up from version 0 (first sync, reset), the fewer round trips the better: the
        # largest pages the server allows. (None: ``page_limit`` throughout.)
        self.initial_page_limit = initial_page_limit or page_limit
        self.backoff = backoff or Backoff()

    @property
    def device_id(self) -> str:
        return self.replica.device_id

    def close(self) -> None:
        self.replica.close()

    # --- the app's side ------------------------------------------------------------------------

    @contextmanager
    def change_set(self) -> Iterator[ChangeSetBuilder]:
        """Group ops into one change-set, queued (and shown) when the block ends without error::

        with client.change_set() as cs:
            item = cs.create("inventory_items", {...})
            cs.patch("menu_items", menu_id, {"linked_sku": "FLOUR-1"})
        """
        builder = ChangeSetBuilder(self.replica)
        yield builder
        if builder.ops:
            self.replica.record_change_set(
                builder.ops, created_at=datetime.now(UTC).isoformat(), hints=builder.hints
            )

    def create(
        self,
        entity: str,
        fields: Mapping[str, m.Scalar],
        *,
        id: str | None = None,
        scope: str | None = None,
    ) -> str:
        """A change-set of one create; returns the new row's id."""
        with self.change_set() as cs:
            row_id = cs.create(entity, fields, id=id, scope=scope)
        return row_id

    def patch(self, entity: str, row_id: str, fields: Mapping[str, m.Scalar]) -> None:
        """A change-set of one patch."""
        with self.change_set() as cs:
            cs.patch(entity, row_id, fields)

    def delete(self, entity: str, row_id: str) -> None:
        """A change-set of one delete."""
        with self.change_set() as cs:
            cs.delete(entity, row_id)

    def intent(self, name: str, args: Mapping[str, m.Scalar]) -> None:
        """A change-set of one intent."""
        with self.change_set() as cs:
            cs.intent(name, args)

    def get(self, entity: str, row_id: str) -> Row | None:
        return self.replica.get(entity, row_id)

    def rows(self, entity: str | None = None) -> list[Row]:
        return self.replica.rows(entity)

    # --- the loop ------------------------------------------------------------------------------

    def sync(self) -> SyncReport:
        """Push, pull until caught up, commit; retry transient failures with backoff.

        Raises :class:`SyncFailed` when the retry budget runs out (nothing is lost: sync again
        later) and the other :class:`SyncError` subclasses for what retrying cannot fix.
        """
        # One sync per replica file at a time in this process (an app's foreground and
        # background syncs would otherwise interleave their pages in one staging table).
        with _sync_lock(self.replica.path):
            return self._sync_with_retries()

    def _sync_with_retries(self) -> SyncReport:
        report = SyncReport()
        failures = 0
        resets = 0
        registrations = 0
        while True:
            try:
                self._sync_once(report)
                return report
            except TransientError as exc:
                failures += 1
                report.retries += 1
                if failures >= self.backoff.attempts:
                    raise SyncFailed(f"gave up after {failures} attempts: {exc}") from exc
                self.backoff.sleep(self.backoff.delay(failures, exc.retry_after))
            except ResetRequired as exc:
                resets += 1
                if resets > 3:
                    raise
                report.resets.extend(exc.scopes)
                self.replica.begin_reset(exc.scopes)
            except ReplicaMismatch as exc:
                # Rebuild the scopes from 0 once; a second mismatch is a bug worth raising.
                resets += 1
                if resets > 3 or set(exc.scopes) <= set(self.replica.reset_scopes()):
                    raise
                report.resets.extend(exc.scopes)
                self.replica.begin_reset(exc.scopes)
            except DeviceNotRegistered:
                registrations += 1
                if registrations > 1:
                    raise
                self._register()

    def _register(self) -> None:
        info = self.transport.register(
            m.RegisterDevice(
                protocol=m.PROTOCOL_VERSION,
                device_id=self.device_id,
                platform=self.platform,
                app_version=self.app_version,
            )
        )
        self.replica.mark_registered(info.last_applied_seq)

    def _sync_once(self, report: SyncReport) -> None:
        # Step 1: register once per replica.
        if not self.replica.registered:
            self._register()
        self._push(report)
        self._pull(report)

    def _push(self, report: SyncReport) -> None:
        # Step 2: every change-set gets an answer before we pull (a pull can only drop what
        # has been answered).
        while True:
            batch = self.replica.next_push_batch()
            if not batch:
                return
            response = self.transport.push(m.PushRequest(m.PROTOCOL_VERSION, self.device_id, batch))
            record = self.replica.record_push(response)
            report.pushed += len(response.outcomes)
            report.applied += record.applied
            report.rejected += record.rejected
            report.conflicts += record.conflicts
            report.renumbered += record.renumbered
            if response.error is not None and not record.renumbered:
                # A stop we cannot repair by renumbering (e.g. the server expects a seq we
                # never had): retrying would loop, so say it.
                raise SyncError(f"push stopped: {response.error.code}: {response.error.message}")
            if not response.outcomes and not record.renumbered:
                raise SyncError("the server answered a push with no outcome and no error")

    def _pull(self, report: SyncReport) -> None:
        # Step 3: pages go to staging; the view does not move until we are caught up.
        limit = self.page_limit
        # From scratch: nothing committed yet (a first sync, or one resumed after an
        # interruption), or every scope being reset.
        if not any(self.replica.cursors().values()) or not any(
            self.replica.pull_cursors().values()
        ):
            limit = max(self.page_limit, self.initial_page_limit)
        while True:
            cursors = self.replica.pull_cursors()
            page = self.transport.pull(
                m.PullRequest(m.PROTOCOL_VERSION, self.device_id, cursors=cursors, limit=limit)
            )
            total = 0
            for change in page.changes:
                total = (total + row_checksum(change.entity, change.id, change.version)) % MOD
            if total != page.page_checksum:
                raise CorruptPage(f"page checksum {page.page_checksum} != computed {total}")
            if page.has_more and page.cursors == cursors and not page.changes:
                raise SyncError("the server says has_more but its cursors did not move")
            self.replica.stage_page(page)
            report.pages += 1
            report.rows += len(page.changes)
            if not page.has_more:
                break
        # Step 4: all at once, verified.
        commit = self.replica.commit_staged()
        report.dropped_change_sets += commit.dropped_change_sets
