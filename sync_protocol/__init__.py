"""Galley's sync protocol: wire messages, codecs and the reference device client.

This package imports nothing else of Galley's, so a client can depend on it alone.
"""

from .checksums import row_checksum, sum_checksums
from .codec import JSON, MSGPACK, decode, encode
from .messages import (
    PROTOCOL_VERSION,
    ChangeSet,
    Create,
    Delete,
    DeviceInfo,
    ErrorBody,
    Intent,
    Op,
    OpError,
    Outcome,
    Patch,
    PullRequest,
    PullResponse,
    PushRequest,
    PushResponse,
    RegisterDevice,
    RowChange,
    ScopeState,
)

__all__ = [
    "JSON",
    "MSGPACK",
    "PROTOCOL_VERSION",
    "ChangeSet",
    "Create",
    "Delete",
    "DeviceInfo",
    "ErrorBody",
    "Intent",
    "Op",
    "OpError",
    "Outcome",
    "Patch",
    "PullRequest",
    "PullResponse",
    "PushRequest",
    "PushResponse",
    "RegisterDevice",
    "RowChange",
    "ScopeState",
    "decode",
    "encode",
    "row_checksum",
    "sum_checksums",
]
