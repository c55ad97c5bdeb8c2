"""Every message of the sync protocol, declared once.

These structs are the validation (decoding rejects wrong shapes and types), the encoding
(MessagePack or JSON) and the reference for ``docs/protocol.md``. Field names are part of the
wire contract: renaming one is a breaking change.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

#: ``major.minor``. A server refuses a request whose major differs from its own.
PROTOCOL_VERSION = "1.0"

UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
Uuid = Annotated[str, msgspec.Meta(pattern=UUID_PATTERN)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Version = Annotated[int, msgspec.Meta(ge=0)]
Seq = Annotated[int, msgspec.Meta(ge=1)]
#: Field values: scalars only. Entity-specific types and lengths are checked by the server's
#: entity registry, which answers with a per-op error rather than refusing the whole request.
Scalar = str | int | float | bool | None
Fields = dict[Annotated[str, msgspec.Meta(max_length=64)], Scalar]

MAX_OPS_PER_CHANGE_SET = 500
MAX_CHANGE_SETS_PER_PUSH = 100
MAX_PULL_LIMIT = 10_000
DEFAULT_PULL_LIMIT = 1_000


class _Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    pass


# --- push ------------------------------------------------------------------------------------


class Create(_Message, tag="create", tag_field="op"):
    """Create a row with a client-generated UUID."""

    entity: Name
    id: Uuid
    fields: Fields


class Patch(_Message, tag="patch", tag_field="op"):
    """Change some fields of a row, saying which version of it the device last saw."""

    entity: Name
    id: Uuid
    base_version: Version
    fields: Fields


class Delete(_Message, tag="delete", tag_field="op"):
    """Delete a row, saying which version of it the device last saw."""

    entity: Name
    id: Uuid
    base_version: Version


class Intent(_Message, tag="intent", tag_field="op"):
    """A domain operation whose meaning the server applies to its current state (e.g. a stock
    movement), rather than a value to overwrite: intents merge instead of conflicting."""

    name: Name
    args: Fields


Op = Create | Patch | Delete | Intent


class ChangeSet(_Message):
    """A unit of offline work: applied atomically, exactly once, in ``seq`` order per device."""

    id: Uuid
    seq: Seq
    ops: Annotated[list[Op], msgspec.Meta(min_length=1, max_length=MAX_OPS_PER_CHANGE_SET)]
    created_at: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class PushRequest(_Message):
    protocol: Annotated[str, msgspec.Meta(max_length=16)]
    device_id: Uuid
    change_sets: Annotated[list[ChangeSet], msgspec.Meta(max_length=MAX_CHANGE_SETS_PER_PUSH)]


class OpError(_Message):
    """Why one op of a rejected change-set was refused (``op_index`` -1: the change-set)."""

    op_index: int
    code: str
    message: str
    field: str | None = None


class Outcome(_Message):
    change_set_id: str
    seq: int
    status: Literal["applied", "applied_with_conflicts", "rejected"]
    #: scope -> version the change-set's writes were committed at.
    versions: dict[str, int] = {}
    conflicts: list[str] = []
    errors: list[OpError] = []
    #: True when this outcome was stored earlier and is returned again for a replay.
    replayed: bool = False


class ErrorBody(_Message):
    code: str
    message: str
    details: dict[str, list[str]] = {}


class PushResponse(_Message):
    protocol: str
    outcomes: list[Outcome]
    last_applied_seq: int
    #: Set when processing stopped early (e.g. ``seq_gap``); outcomes so far are committed.
    error: ErrorBody | None = None


# --- pull ------------------------------------------------------------------------------------


class PullRequest(_Message):
    protocol: Annotated[str, msgspec.Meta(max_length=16)]
    device_id: Uuid
    #: scope -> last version the device holds (absent or 0: from the beginning).
    cursors: dict[Annotated[str, msgspec.Meta(max_length=64)], Version] = {}
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PULL_LIMIT)] = DEFAULT_PULL_LIMIT


class RowChange(_Message):
    """The latest state of one row (``data``), or its tombstone (``deleted`` and no data)."""

    entity: str
    id: str
    scope: str
    version: int
    deleted: bool
    data: dict[str, Any] | None


class ScopeState(_Message):
    """What a replica of ``scope`` at ``version`` must hold: ``count`` live rows whose
    :func:`~sync_protocol.checksums.row_checksum` values sum (mod 2**32) to ``checksum``."""

    scope: str
    version: int
    count: int
    checksum: int


class PullResponse(_Message):
    protocol: str
    changes: list[RowChange]
    cursors: dict[str, int]
    has_more: bool
    #: The device's last applied change-set seq, as of the same snapshot as ``changes``.
    last_applied_seq: int
    #: Sum (mod 2**32) of the row checksums of ``changes`` (tombstones included).
    page_checksum: int
    #: For each scope this page finished: the state to verify the replica against.
    scopes: list[ScopeState] = []


# --- devices ---------------------------------------------------------------------------------


class RegisterDevice(_Message):
    protocol: Annotated[str, msgspec.Meta(max_length=16)]
    device_id: Uuid
    platform: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    app_version: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


class DeviceInfo(_Message):
    protocol: str
    device_id: str
    user_id: str
    last_applied_seq: int
    scopes: list[str]
