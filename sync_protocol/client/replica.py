"""The device's local SQLite replica: everything a device must keep across restarts.

One SQLite file holds, per device:

* ``server_rows`` — the rows of the device's scopes exactly as the server had them at the
  committed ``cursors`` (the *confirmed* state; no tombstones: a deleted row is simply absent),
  with ``scope_sums`` kept alongside so the replica can be checked against the server's
  count/checksum without a scan;
* ``outbox`` — change-sets written offline, in ``seq`` order, until the pulled state contains
  them (``status`` says whether the server has answered for them yet);
* ``rows`` — what the app reads: the confirmed state with every still-pending change-set
  re-applied over it (optimistic local apply);
* ``staging`` — pull pages received but not yet applied: a sync applies them all at once when
  the server says it is caught up, so the app never sees a half-synced replica;
* ``rejected`` and ``conflicts`` — what the server refused or flagged, for the app to show;
* ``own_writes`` — the versions at which this device's own change-sets were applied, so a
  later offline edit of the same row is not mistaken for a concurrent edit (see
  :meth:`Replica.next_push_batch`).

Rows are stored generically (entity, id, scope, version, data as JSON): the client needs no
schema. Every method that changes several tables does so in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec

from .. import messages as m
from ..checksums import MOD, row_checksum
from .errors import ReplicaMismatch
from .records import (
    CommitRecord,
    IntentApplier,
    Key,
    PendingChangeSet,
    PushRecord,
    RejectedChangeSet,
    Row,
    StagedPull,
    op_key,
)

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS server_rows (
    entity TEXT NOT NULL, id TEXT NOT NULL, scope TEXT NOT NULL, version INTEGER NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (entity, id));
CREATE INDEX IF NOT EXISTS server_rows_scope ON server_rows (scope);
CREATE TABLE IF NOT EXISTS scope_sums (
    scope TEXT PRIMARY KEY, count INTEGER NOT NULL, checksum INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (scope TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    entity TEXT NOT NULL, id TEXT NOT NULL, scope TEXT, version INTEGER NOT NULL,
    data TEXT NOT NULL, pending INTEGER NOT NULL, PRIMARY KEY (entity, id));
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, created_at TEXT, ops TEXT NOT NULL,
    hints TEXT NOT NULL, status TEXT NOT NULL, outcome TEXT);
CREATE TABLE IF NOT EXISTS staging (
    n INTEGER PRIMARY KEY AUTOINCREMENT, entity TEXT NOT NULL, id TEXT NOT NULL,
    scope TEXT NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL, data TEXT);
CREATE TABLE IF NOT EXISTS rejected (
    change_set_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, created_at TEXT, ops TEXT NOT NULL,
    errors TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conflicts (
    conflict_id TEXT PRIMARY KEY, change_set_id TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS own_writes (
    entity TEXT NOT NULL, id TEXT NOT NULL, field TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (entity, id, field));
"""
#: ``own_writes.field`` value meaning "this device created the row at that version".
CREATED = "*"

_ops_encoder = msgspec.json.Encoder()
_ops_decoder = msgspec.json.Decoder(list[m.Op])
_errors_decoder = msgspec.json.Decoder(list[m.OpError])
_change_set_decoder = msgspec.json.Decoder(m.ChangeSet)


class Replica:
    """The SQLite file of one device (see the module docstring). Not thread-safe: one per
    thread, like the sqlite3 connection it holds."""

    def __init__(
        self,
        path: str,
        *,
        device_id: str | None = None,
        intents: Mapping[str, IntentApplier] | None = None,
    ) -> None:
        self.path = path
        self.intents = dict(intents or {})
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            stored = self._meta("device_id")
            if stored is None:
                self._set_meta("device_id", (device_id or str(uuid.uuid4())).lower())
                self._set_meta("schema_version", SCHEMA_VERSION)
                self._set_meta("next_seq", "1")
                self._set_meta("checkpoint_seq", "0")
                self._set_meta("server_seq", "0")
            elif device_id is not None and device_id.lower() != stored:
                raise ValueError(f"{path} is the replica of device {stored}, not {device_id}")

    def close(self) -> None:
        self.conn.close()

    # --- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work (``BEGIN IMMEDIATE``: take the write lock up front)."""
        if self.conn.in_transaction:
            yield self.conn  # nested: part of the caller's transaction
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def _int_meta(self, key: str) -> int:
        return int(self._meta(key) or 0)

    # --- identity and sequence numbers ---------------------------------------------------------

    @property
    def device_id(self) -> str:
        value = self._meta("device_id")
        assert value is not None
        return value

    @property
    def registered(self) -> bool:
        return self._meta("registered") == "1"

    def mark_registered(self, server_last_applied_seq: int) -> None:
        """Remember the registration; never hand out a seq the server has already used (a
        re-installed app reusing its device id would otherwise have new work taken for
        replays of old work)."""
        with self.transaction():
            self._set_meta("registered", "1")
            self._note_server_seq(server_last_applied_seq)

    def _note_server_seq(self, last: int) -> None:
        self._set_meta("server_seq", str(max(self._int_meta("server_seq"), last)))
        if self._int_meta("next_seq") <= last:
            self._set_meta("next_seq", str(last + 1))

    @property
    def checkpoint_seq(self) -> int:
        """The device's last applied seq as of the confirmed state (write checkpoint)."""
        return self._int_meta("checkpoint_seq")

    @property
    def next_seq(self) -> int:
        return self._int_meta("next_seq")

    # --- reading (what the app sees) -----------------------------------------------------------

    def get(self, entity: str, row_id: str) -> Row | None:
        """The app's view of one row (pending local changes applied), or None."""
        r = self.conn.execute(
            "SELECT entity, id, scope, version, data, pending FROM rows "
            "WHERE entity = ? AND id = ?",
            (entity, row_id.lower()),
        ).fetchone()
        return None if r is None else _row(r)

    def rows(self, entity: str | None = None) -> list[Row]:
        """The app's view of every row (of ``entity``), in (entity, id) order."""
        sql = "SELECT entity, id, scope, version, data, pending FROM rows"
        args: tuple[str, ...] = ()
        if entity is not None:
            sql += " WHERE entity = ?"
            args = (entity,)
        return [_row(r) for r in self.conn.execute(sql + " ORDER BY entity, id", args)]

    def confirmed_rows(self) -> list[Row]:
        """The confirmed state: the server's rows as of the committed cursors."""
        return [
            Row(r[0], r[1], r[2], r[3], json.loads(r[4]), False)
            for r in self.conn.execute(
                "SELECT entity, id, scope, version, data FROM server_rows ORDER BY entity, id"
            )
        ]

    def cursors(self) -> dict[str, int]:
        """The committed cursor of each scope."""
        return {s: v for s, v in self.conn.execute("SELECT scope, version FROM cursors")}

    def pending(self) -> list[PendingChangeSet]:
        """The outbox, in seq order."""
        return [
            PendingChangeSet(r[0], r[1], r[2], _ops_decoder.decode(r[3]), r[4])
            for r in self.conn.execute(
                "SELECT seq, id, created_at, ops, status FROM outbox ORDER BY seq"
            )
        ]

    def rejected(self) -> list[RejectedChangeSet]:
        """Change-sets the server refused (they consumed their seq; nothing of them applied)."""
        return [
            RejectedChangeSet(
                r[0], r[1], r[2], _ops_decoder.decode(r[3]), _errors_decoder.decode(r[4])
            )
            for r in self.conn.execute(
                "SELECT seq, change_set_id, created_at, ops, errors FROM rejected ORDER BY seq"
            )
        ]

    def conflicts(self) -> list[tuple[str, str, int]]:
        """(conflict id, change-set id, seq) of every conflict the server reported to us."""
        return [
            (r[0], r[1], r[2])
            for r in self.conn.execute(
                "SELECT conflict_id, change_set_id, seq FROM conflicts ORDER BY seq, conflict_id"
            )
        ]

    # --- local writes --------------------------------------------------------------------------

    def record_change_set(
        self, ops: Sequence[m.Op], *, created_at: str | None, hints: Mapping[str, str]
    ) -> PendingChangeSet:
        """Queue ``ops`` as the next change-set and apply them to the app's view at once.

        ``hints`` maps the id of a row created here to its scope, when the app knows it.
        """
        if not ops:
            raise ValueError("a change-set needs at least one op")
        if len(ops) > m.MAX_OPS_PER_CHANGE_SET:
            raise ValueError(f"a change-set holds at most {m.MAX_OPS_PER_CHANGE_SET} ops")
        change_set_id = str(uuid.uuid4())
        # Check the wire constraints now: a change-set the server cannot even decode would be
        # answered 422 on every push and block the queue behind it forever.
        probe = m.ChangeSet(id=change_set_id, seq=1, ops=list(ops), created_at=created_at)
        try:
            _change_set_decoder.decode(_ops_encoder.encode(probe))
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid change-set: {exc}") from None
        with self.transaction():
            seq = self.next_seq
            self._set_meta("next_seq", str(seq + 1))
            self.conn.execute(
                "INSERT INTO outbox (seq, id, created_at, ops, hints, status) "
                "VALUES (?, ?, ?, ?, ?, 'pending')",
                (
                    seq,
                    change_set_id,
                    created_at,
                    _ops_encoder.encode(list(ops)).decode(),
                    json.dumps(dict(hints)),
                ),
            )
            self._apply_to_view(ops, hints)
        return PendingChangeSet(seq, change_set_id, created_at, list(ops), "pending")

    def _apply_to_view(self, ops: Iterable[m.Op], hints: Mapping[str, str]) -> None:
        for op in ops:
            if isinstance(op, m.Create):
                self._merge_into_view(op.entity, op.id.lower(), op.fields, hints.get(op.id))
            elif isinstance(op, m.Patch):
                self._merge_into_view(op.entity, op.id.lower(), op.fields, None, create=False)
            elif isinstance(op, m.Delete):
                self.conn.execute(
                    "DELETE FROM rows WHERE entity = ? AND id = ?", (op.entity, op.id.lower())
                )
            else:
                for (entity, row_id), changes in self._intent_effect(op).items():
                    self._merge_into_view(entity, row_id.lower(), changes, None, create=False)

    def _merge_into_view(
        self,
        entity: str,
        row_id: str,
        fields: Mapping[str, Any],
        scope: str | None,
        *,
        create: bool = True,
    ) -> None:
        current = self.conn.execute(
            "SELECT data FROM rows WHERE entity = ? AND id = ?", (entity, row_id)
        ).fetchone()
        if current is None:
            if create:
                self.conn.execute(
                    "INSERT INTO rows (entity, id, scope, version, data, pending) "
                    "VALUES (?, ?, ?, 0, ?, 1)",
                    (entity, row_id, scope, _dumps(fields)),
                )
            return
        data = {**json.loads(current[0]), **fields}
        self.conn.execute(
            "UPDATE rows SET data = ?, pending = 1 WHERE entity = ? AND id = ?",
            (_dumps(data), entity, row_id),
        )

    def _intent_effect(self, op: m.Intent) -> Mapping[Key, Mapping[str, Any]]:
        applier = self.intents.get(op.name)
        if applier is None:
            return {}  # no local meaning known: the next pull shows the effect
        try:
            return applier(op.args)
        except (KeyError, TypeError, ValueError):
            return {}  # bad arguments: the server will reject it and say why

    def _entry_keys(self, ops: Iterable[m.Op]) -> set[Key]:
        keys: set[Key] = set()
        for op in ops:
            key = op_key(op)
            if key is not None:
                keys.add(key)
            elif isinstance(op, m.Intent):
                keys.update((e, i.lower()) for e, i in self._intent_effect(op))
        return keys

    def _rebuild_view(self, keys: set[Key] | None) -> None:
        """Recompute the app's view: confirmed rows (all, or just ``keys``), then every
        change-set the confirmed state does not contain yet, re-applied in seq order."""
        overlay = [
            (_ops_decoder.decode(ops), json.loads(hints))
            for ops, hints in self.conn.execute(
                "SELECT ops, hints FROM outbox WHERE seq > ? ORDER BY seq",
                (self.checkpoint_seq,),
            )
        ]
        if keys is None:
            self.conn.execute("DELETE FROM rows")
            self.conn.execute(
                "INSERT INTO rows (entity, id, scope, version, data, pending) "
                "SELECT entity, id, scope, version, data, 0 FROM server_rows"
            )
        else:
            for ops, _hints in overlay:
                keys |= self._entry_keys(ops)
            pairs = sorted(keys)
            self.conn.executemany("DELETE FROM rows WHERE entity = ? AND id = ?", pairs)
            self.conn.executemany(
                "INSERT INTO rows (entity, id, scope, version, data, pending) "
                "SELECT entity, id, scope, version, data, 0 FROM server_rows "
                "WHERE entity = ? AND id = ?",
                pairs,
            )
        for ops, hints in overlay:
            self._apply_to_view(ops, hints)

    # --- push ------------------------------------------------------------------------------------

    def next_push_batch(
        self, *, max_change_sets: int = m.MAX_CHANGE_SETS_PER_PUSH, max_bytes: int = 4_000_000
    ) -> list[m.ChangeSet]:
        """The next change-sets to send: the unanswered ones, in seq order.

        The batch stops before a change-set that patches or deletes a row an earlier change-set
        of the same batch writes: its base version can only be set right once the earlier one's
        outcome says at which version it was applied. With that version known, the fields this
        device wrote itself are sent with it as their base (split into one patch per base), so
        creating a menu item offline and then correcting its price is not flagged as a
        concurrent edit — while a field someone else changed meanwhile still is.
        """
        entries = self.conn.execute(
            "SELECT seq, id, created_at, ops FROM outbox WHERE status = 'pending' ORDER BY seq"
        ).fetchall()
        batch: list[m.ChangeSet] = []
        touched: set[Key] = set()
        size = 0
        for seq, change_set_id, created_at, raw_ops in entries:
            ops = _ops_decoder.decode(raw_ops)
            keys = {k for k in (op_key(op) for op in ops) if k is not None}
            if batch and (keys & touched or len(batch) >= max_change_sets):
                break
            change_set = m.ChangeSet(
                id=change_set_id, seq=seq, ops=self._rebased(ops), created_at=created_at
            )
            size += len(raw_ops) + 200
            if batch and size > max_bytes:
                break
            batch.append(change_set)
            touched |= keys
        return batch

    def _rebased(self, ops: list[m.Op]) -> list[m.Op]:
        out: list[m.Op] = []
        for op in ops:
            if not isinstance(op, m.Patch | m.Delete):
                out.append(op)
                continue
            own = {
                f: v
                for f, v in self.conn.execute(
                    "SELECT field, version FROM own_writes WHERE entity = ? AND id = ?",
                    (op.entity, op.id.lower()),
                )
            }
            created = own.pop(CREATED, 0)
            if isinstance(op, m.Delete):
                # Only a creation vouches for every field; otherwise keep what the user saw.
                out.append(m.Delete(op.entity, op.id, max(op.base_version, created)))
                continue
            groups: dict[int, dict[str, Any]] = {}
            for name, value in op.fields.items():
                base = max(op.base_version, created, own.get(name, 0))
                groups.setdefault(base, {})[name] = value
            for base in sorted(groups):
                out.append(m.Patch(op.entity, op.id, base, groups[base]))
        if len(out) > m.MAX_OPS_PER_CHANGE_SET:
            return ops  # cannot split within the limit: the original bases are the safe side
        return out

    def record_push(self, response: m.PushResponse) -> PushRecord:
        """Store the outcomes of a push, in one transaction.

        Rejected change-sets leave the outbox for ``rejected`` (their effect leaves the view);
        answered ones stay, marked, until a pull contains them; conflicts are remembered. A
        ``seq_gap`` answer, or an outcome for a different change-set id under our seq (the
        server knew this device id before this replica existed), renumbers the unanswered
        change-sets after the server's last applied seq: they were provably never applied.
        """
        record = PushRecord()
        with self.transaction():
            rebuild: set[Key] = set()
            self._note_server_seq(response.last_applied_seq)
            for outcome in response.outcomes:
                entry = self.conn.execute(
                    "SELECT id, created_at, ops, hints FROM outbox WHERE seq = ?",
                    (outcome.seq,),
                ).fetchone()
                if entry is None:
                    continue  # answered and dropped before (a replayed answer)
                change_set_id, created_at, raw_ops, hints = entry
                if outcome.change_set_id.lower() != change_set_id:
                    record.renumbered += self._renumber(
                        outcome.seq, max(self.next_seq, response.last_applied_seq + 1)
                    )
                    break
                ops = _ops_decoder.decode(raw_ops)
                if outcome.status == "rejected":
                    record.rejected += 1
                    self.conn.execute(
                        "INSERT OR REPLACE INTO rejected "
                        "(change_set_id, seq, created_at, ops, errors) VALUES (?, ?, ?, ?, ?)",
                        (
                            change_set_id,
                            outcome.seq,
                            created_at,
                            raw_ops,
                            _ops_encoder.encode(outcome.errors).decode(),
                        ),
                    )
                    self.conn.execute("DELETE FROM outbox WHERE seq = ?", (outcome.seq,))
                    rebuild |= self._entry_keys(ops)
                    continue
                record.applied += 1
                record.conflicts += len(outcome.conflicts)
                self.conn.execute(
                    "UPDATE outbox SET status = ?, outcome = ? WHERE seq = ?",
                    (outcome.status, _ops_encoder.encode(outcome).decode(), outcome.seq),
                )
                self.conn.executemany(
                    "INSERT OR IGNORE INTO conflicts (conflict_id, change_set_id, seq) "
                    "VALUES (?, ?, ?)",
                    [(c, change_set_id, outcome.seq) for c in outcome.conflicts],
                )
                if outcome.status == "applied":
                    self._note_own_writes(ops, json.loads(hints), outcome.versions)
            error = response.error
            if error is not None and error.code == "seq_gap":
                expected = int(error.details.get("expected_seq", ["0"])[0])
                first = self.conn.execute(
                    "SELECT MIN(seq) FROM outbox WHERE status = 'pending'"
                ).fetchone()[0]
                if expected >= 1 and first is not None and expected < first:
                    record.renumbered += self._renumber(expected, expected, include_answered=True)
            if rebuild:
                self._rebuild_view(rebuild)
        return record

    def _renumber(self, from_seq: int, start: int, *, include_answered: bool = False) -> int:
        status = "" if include_answered else "AND status = 'pending'"
        entries = self.conn.execute(
            f"SELECT seq FROM outbox WHERE seq >= ? {status} ORDER BY seq", (from_seq,)
        ).fetchall()
        # Park them out of the way first: the new numbers may overlap the old ones.
        for (seq,) in entries:
            self.conn.execute(
                "UPDATE outbox SET seq = ?, status = 'pending', outcome = NULL WHERE seq = ?",
                (-seq, seq),
            )
        for i, (seq,) in enumerate(entries):
            self.conn.execute("UPDATE outbox SET seq = ? WHERE seq = ?", (start + i, -seq))
        self._set_meta("next_seq", str(start + len(entries)))
        return len(entries)

    def _note_own_writes(
        self, ops: list[m.Op], hints: Mapping[str, str], versions: Mapping[str, int]
    ) -> None:
        for op in ops:
            if not isinstance(op, m.Create | m.Patch):
                continue
            row_id = op.id.lower()
            scope = self._scope_of(op.entity, row_id, hints.get(op.id))
            if scope is None and len(versions) == 1:
                scope = next(iter(versions))
            version = versions.get(scope) if scope is not None else None
            if version is None:
                continue  # unknown: the original base version stays (the safe side)
            names = [CREATED] if isinstance(op, m.Create) else list(op.fields)
            self.conn.executemany(
                "INSERT INTO own_writes (entity, id, field, version) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (entity, id, field) DO UPDATE SET "
                "version = MAX(version, excluded.version)",
                [(op.entity, row_id, name, version) for name in names],
            )

    def _scope_of(self, entity: str, row_id: str, hint: str | None) -> str | None:
        for table in ("server_rows", "rows"):
            found = self.conn.execute(
                f"SELECT scope FROM {table} WHERE entity = ? AND id = ?", (entity, row_id)
            ).fetchone()
            if found is not None and found[0]:
                return str(found[0])
        return hint

    # --- pull ------------------------------------------------------------------------------------

    def staged(self) -> StagedPull | None:
        """The unfinished pull, if a sync was interrupted (or is running)."""
        raw = self._meta("staged")
        if raw is None:
            return None
        value = json.loads(raw)
        return StagedPull(
            cursors={k: int(v) for k, v in value["cursors"].items()},
            last_applied_seq=int(value["last_applied_seq"]),
            scopes=[m.ScopeState(**s) for s in value["scopes"]],
        )

    def reset_scopes(self) -> list[str]:
        """Scopes being rebuilt from version 0 (after ``reset_required`` or a mismatch)."""
        return list(json.loads(self._meta("reset_scopes") or "[]"))

    def pull_cursors(self) -> dict[str, int]:
        """Where the next pull page starts: the staged cursors of an unfinished pull, else the
        committed ones, with scopes being reset at 0."""
        staged = self.staged()
        cursors = staged.cursors if staged is not None else self.cursors()
        for scope in self.reset_scopes():
            if staged is None or scope not in staged.cursors:
                cursors[scope] = 0
        return cursors

    def stage_page(self, page: m.PullResponse) -> None:
        """Keep a page until the pull is caught up (the app's view does not change)."""
        with self.transaction():
            self.conn.executemany(
                "INSERT INTO staging (entity, id, scope, version, deleted, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.entity,
                        c.id.lower(),
                        c.scope,
                        c.version,
                        int(c.deleted),
                        None if c.data is None else _dumps(c.data),
                    )
                    for c in page.changes
                ],
            )
            self._set_meta(
                "staged",
                json.dumps(
                    {
                        "cursors": page.cursors,
                        "last_applied_seq": page.last_applied_seq,
                        "scopes": [msgspec.structs.asdict(s) for s in page.scopes],
                    }
                ),
            )
            self._note_server_seq(page.last_applied_seq)

    def begin_reset(self, scopes: Iterable[str]) -> None:
        """Rebuild ``scopes`` from version 0. The current rows stay visible until the new ones
        are all pulled; the outbox is kept (and pushed first by the next sync)."""
        with self.transaction():
            current = set(self.reset_scopes())
            self._set_meta("reset_scopes", json.dumps(sorted(current | set(scopes))))
            self.conn.execute("DELETE FROM staging")
            self._set_meta("staged", None)

    def commit_staged(self) -> CommitRecord:
        """Apply every staged page at once, verify the replica, drop what the pull contains.

        Raises :class:`ReplicaMismatch` (changing nothing) when a scope's live-row count or
        checksum differs from what the server said; the caller rebuilds those scopes.
        """
        record = CommitRecord()
        with self.transaction():
            staged = self.staged()
            if staged is None:
                return record
            sums = {s: [c, k] for s, c, k in self.conn.execute("SELECT * FROM scope_sums")}
            previous = self.cursors()
            resets = set(self.reset_scopes())
            gone = (resets | set(previous)) - set(staged.cursors)
            full_rebuild = bool(resets or gone)
            for scope in resets | gone:
                self.conn.execute("DELETE FROM server_rows WHERE scope = ?", (scope,))
                sums.pop(scope, None)
            changed = self._apply_staging(sums)
            record.rows = len(changed)
            bad = [
                st.scope
                for st in staged.scopes
                if tuple(sums.get(st.scope, [0, 0])) != (st.count, st.checksum)
                or staged.cursors.get(st.scope) != st.version
            ]
            if bad:
                raise ReplicaMismatch(bad)
            self.conn.execute("DELETE FROM scope_sums")
            self.conn.executemany(
                "INSERT INTO scope_sums (scope, count, checksum) VALUES (?, ?, ?)",
                [(s, c, k) for s, (c, k) in sums.items()],
            )
            self.conn.execute("DELETE FROM cursors")
            self.conn.executemany(
                "INSERT INTO cursors (scope, version) VALUES (?, ?)", staged.cursors.items()
            )
            # The write checkpoint: change-sets the pulled state contains leave the outbox
            # (those we never got an answer for stay until a push replay tells us the outcome).
            self._set_meta("checkpoint_seq", str(staged.last_applied_seq))
            for (raw_ops,) in self.conn.execute(
                "SELECT ops FROM outbox WHERE seq <= ? AND status != 'pending'",
                (staged.last_applied_seq,),
            ).fetchall():
                record.dropped_change_sets += 1
                changed |= self._entry_keys(_ops_decoder.decode(raw_ops))
            self.conn.execute(
                "DELETE FROM outbox WHERE seq <= ? AND status != 'pending'",
                (staged.last_applied_seq,),
            )
            if self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0:
                self.conn.execute("DELETE FROM own_writes")
            self.conn.execute("DELETE FROM staging")
            self._set_meta("staged", None)
            self._set_meta("reset_scopes", None)
            record.reset_scopes = tuple(sorted(resets))
            # Past a few thousand rows, recopying everything beats row-by-row replacement.
            self._rebuild_view(None if full_rebuild or len(changed) > 2000 else changed)
        return record

    def _apply_staging(self, sums: dict[str, list[int]]) -> set[Key]:
        """Replace the confirmed rows by the newest staged image of each staged row (set-based:
        an initial sync stages every row once), keeping the per-scope sums current."""
        latest = "SELECT MAX(n) FROM staging GROUP BY entity, id"
        # Rows about to be replaced or deleted leave the sums...
        for scope, entity, row_id, version in self.conn.execute(
            "SELECT scope, entity, id, version FROM server_rows "
            "WHERE (entity, id) IN (SELECT entity, id FROM staging)"
        ):
            s = sums.setdefault(scope, [0, 0])
            s[0] -= 1
            s[1] = (s[1] - row_checksum(entity, row_id, version)) % MOD
        self.conn.execute(
            "DELETE FROM server_rows WHERE (entity, id) IN (SELECT entity, id FROM staging)"
        )
        # ...and their newest staged image, unless a tombstone, takes their place.
        changed: set[Key] = set()
        for scope, entity, row_id, version, deleted in self.conn.execute(
            f"SELECT scope, entity, id, version, deleted FROM staging WHERE n IN ({latest})"
        ):
            changed.add((entity, row_id))
            if not deleted:
                s = sums.setdefault(scope, [0, 0])
                s[0] += 1
                s[1] = (s[1] + row_checksum(entity, row_id, version)) % MOD
        self.conn.execute(
            "INSERT INTO server_rows (entity, id, scope, version, data) "
            f"SELECT entity, id, scope, version, data FROM staging WHERE n IN ({latest}) "
            "AND deleted = 0"
        )
        return changed

    def verify(self) -> dict[str, tuple[int, int]]:
        """Recompute (count, checksum) of every scope from the confirmed rows (a full scan)."""
        out: dict[str, tuple[int, int]] = {}
        for entity, row_id, scope, version in self.conn.execute(
            "SELECT entity, id, scope, version FROM server_rows"
        ):
            count, total = out.get(scope, (0, 0))
            out[scope] = (count + 1, (total + row_checksum(entity, row_id, version)) % MOD)
        return out


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _row(r: tuple[Any, ...]) -> Row:
    return Row(r[0], r[1], r[2], int(r[3]), json.loads(r[4]), bool(r[5]))
