"""The reference device client of Galley's sync protocol (docs/protocol.md § 10).

A device keeps a SQLite replica (:class:`Replica`), writes offline into an outbox and runs
:meth:`SyncClient.sync` when it can. Like the rest of :mod:`sync_protocol`, it depends only on
the standard library, msgspec and httpx::

    client = SyncClient(
        "galley-replica.db",
        httpx.Client(timeout=30),
        "https://galley.example.com",
        token_provider=lambda refresh: session.refreshed_token() if refresh else session.token,
    )
    dish = client.create("menu_items", {"name": "Soup", "price_cents": 550}, scope="org")
    client.intent("menu.mark_sold_out", {"menu_item_id": dish})
    client.sync()  # push, pull until caught up, commit; retries transient failures
    client.rows("menu_items"), client.replica.rejected(), client.replica.conflicts()
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
