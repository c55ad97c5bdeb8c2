"""Plain data of the reference client: what the app reads and what a sync step reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import messages as m

Key = tuple[str, str]
#: Optimistic effect of a domain intent: args -> field changes per row. The server stays the
#: judge; this only lets the app show the intent's effect before the next sync.
IntentApplier = Callable[[Mapping[str, Any]], Mapping[Key, Mapping[str, Any]]]


@dataclass(frozen=True)
class Row:
    """A row as the app sees it; ``version`` is the server version its data is based on (0 for
    a row created on this device and not yet pulled back), ``pending`` that local changes are
    applied over it."""

    entity: str
    id: str
    scope: str | None
    version: int
    data: dict[str, Any]
    pending: bool


@dataclass(frozen=True)
class PendingChangeSet:
    seq: int
    id: str
    created_at: str | None
    ops: list[m.Op]
    #: ``pending`` (no answer yet), ``applied`` or ``applied_with_conflicts`` (answered, kept
    #: until a pull contains it).
    status: str


@dataclass(frozen=True)
class RejectedChangeSet:
    seq: int
    id: str
    created_at: str | None
    ops: list[m.Op]
    errors: list[m.OpError]


@dataclass(frozen=True)
class StagedPull:
    """Where an unfinished pull stands: the cursors to continue from, and what the latest page
    said about the device's write checkpoint and the scopes it finished."""

    cursors: dict[str, int]
    last_applied_seq: int
    scopes: list[m.ScopeState]


@dataclass
class PushRecord:
    """What one push answer changed locally."""

    applied: int = 0
    rejected: int = 0
    conflicts: int = 0
    renumbered: int = 0


@dataclass
class CommitRecord:
    """What applying a finished pull changed locally."""

    rows: int = 0
    dropped_change_sets: int = 0
    reset_scopes: tuple[str, ...] = ()


def op_key(op: m.Op) -> Key | None:
    if isinstance(op, m.Intent):
        return None
    return (op.entity, op.id.lower())
