"""The operations a device pushes, as plain data (the wire structs are mapped onto these)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .fields import Value
from .registry import ORG_SCOPE, scope_branch
from .roles import Role


@dataclass(frozen=True)
class CreateOp:
    """Create a row with a client-generated (lower-case) UUID."""

    entity: str
    id: str
    fields: Mapping[str, Value]


@dataclass(frozen=True)
class PatchOp:
    """Change some fields of a row; ``base_version`` is the row version the device last saw."""

    entity: str
    id: str
    base_version: int
    fields: Mapping[str, Value]


@dataclass(frozen=True)
class DeleteOp:
    """Delete a row (leaving a tombstone); ``base_version`` as for :class:`PatchOp`."""

    entity: str
    id: str
    base_version: int


@dataclass(frozen=True)
class IntentOp:
    """A domain operation registered as an :class:`~domain.registry.IntentSpec`."""

    name: str
    args: Mapping[str, Value]


Op = CreateOp | PatchOp | DeleteOp | IntentOp


@dataclass(frozen=True)
class Principal:
    """Who is writing: the authenticated user behind a device."""

    user_id: str
    role: Role
    branch_ids: frozenset[str]
    device_branch_id: str | None = None

    def may_access(self, scope: str) -> bool:
        """Whether this user may read and write rows of ``scope``.

        Everyone reaches the organisation scope; others only the branches in ``branch_ids``.
        For an admin the engine fills ``branch_ids`` with every existing branch, so an admin
        reaches them all but never a branch that does not exist: the engine locks (and so
        creates) a scope's counter before the planner validates the ops that name it, and a
        row in a non-existent branch would only fail later on a foreign key.
        """
        if scope == ORG_SCOPE:
            return True
        branch = scope_branch(scope)
        return branch is not None and branch in self.branch_ids


@dataclass(frozen=True)
class RowState:
    """The server's current image of a synced row (a tombstone when ``deleted``)."""

    entity: str
    id: str
    scope: str
    version: int
    deleted: bool
    data: Mapping[str, Value | list[str]]
    #: field -> version at which it was last written (for field-level merges).
    field_versions: Mapping[str, int] = field(default_factory=dict)
