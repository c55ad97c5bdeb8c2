"""The reference device client of Galley's sync protocol (docs/protocol.md § Client).

A device keeps a SQLite replica (:class:`Replica`), writes offline into an outbox and runs
:meth:`SyncClient.sync` when it can. Like the rest of :mod:`sync_protocol`, it depends only on
the standard library, msgspec and httpx.
"""

from .errors import (
    CorruptPage,
    DeviceNotRegistered,
    NetworkError,
    ReplicaMismatch,
    RequestRefused,
    ResetRequired,
    ServerError,
    SyncError,
    SyncFailed,
    TransientError,
    Unauthorized,
    UpgradeRequired,
)
from .records import IntentApplier, PendingChangeSet, RejectedChangeSet, Row
from .replica import Replica
from .sync import Backoff, ChangeSetBuilder, SyncClient, SyncReport
from .transport import TokenProvider, Transport

__all__ = [
    "Backoff",
    "ChangeSetBuilder",
    "CorruptPage",
    "DeviceNotRegistered",
    "IntentApplier",
    "NetworkError",
    "PendingChangeSet",
    "RejectedChangeSet",
    "Replica",
    "ReplicaMismatch",
    "RequestRefused",
    "ResetRequired",
    "Row",
    "ServerError",
    "SyncClient",
    "SyncError",
    "SyncFailed",
    "SyncReport",
    "TokenProvider",
    "TransientError",
    "Transport",
    "Unauthorized",
    "UpgradeRequired",
]
