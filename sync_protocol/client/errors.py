"""What can go wrong between a device and the server, as the client sees it.

Two families: *transient* errors (:class:`NetworkError`, :class:`ServerError`) are retried with
backoff by the sync loop, because every step of a sync can be repeated safely; the others need
something to change first (a new token, an app upgrade, a bug fixed) and are raised to the app.
"""

from __future__ import annotations

from ..messages import ErrorBody


class SyncError(Exception):
    """Base class of every error the reference client raises."""


class TransientError(SyncError):
    """Worth retrying as is, after a pause."""

    #: Seconds the server asked us to wait (``Retry-After``), if it said.
    retry_after: float | None = None


class NetworkError(TransientError):
    """The request or its response was lost: the server may or may not have processed it."""


class ServerError(TransientError):
    """A 5xx or 429 answer: the server is there but cannot serve us right now."""

    def __init__(self, status: int, body: ErrorBody | None, retry_after: float | None) -> None:
        super().__init__(f"server answered {status}: {body.code if body else 'no error body'}")
        self.status = status
        self.body = body
        self.retry_after = retry_after


class RequestRefused(SyncError):
    """A 4xx the client cannot fix by retrying (its ``body`` says why)."""

    def __init__(self, status: int, body: ErrorBody) -> None:
        super().__init__(f"{status} {body.code}: {body.message}")
        self.status = status
        self.body = body


class Unauthorized(RequestRefused):
    """Still 401 after refreshing the token: the user must sign in again."""


class UpgradeRequired(RequestRefused):
    """The server no longer speaks this client's protocol version (426)."""


class DeviceNotRegistered(RequestRefused):
    """The server does not know this device id (404): register it, then retry."""


class ResetRequired(RequestRefused):
    """409 ``reset_required``: the replica of ``scopes`` is older than the tombstone horizon."""

    def __init__(self, status: int, body: ErrorBody) -> None:
        super().__init__(status, body)
        self.scopes = list(body.details.get("scopes", []))


class SyncFailed(SyncError):
    """Transient errors persisted past the retry budget; nothing was lost, sync again later."""


class ReplicaMismatch(SyncError):
    """The replica of ``scopes`` disagrees with the server's count/checksum."""

    def __init__(self, scopes: list[str]) -> None:
        super().__init__(f"the replica differs from the server in {', '.join(scopes)}")
        self.scopes = scopes


class CorruptPage(TransientError):
    """A pull page whose rows do not add up to its ``page_checksum``."""
