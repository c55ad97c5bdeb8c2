"""Rate limits and temporary lockouts for the sign-in endpoints, on the ``limits`` library.

Counters live in Redis when ``REDIS_URL`` is configured, so every server process shares them; in
process memory otherwise (the single-process embedded mode). The moving-window strategy counts
exactly the hits of the last window, so ``Retry-After`` is the time until the oldest one ages out.

Sync requests (``/sync/v1``) are throttled per user with a fixed window instead: one counter
increment per request (moving windows keep every hit), on the hottest endpoints of the server.

A lockout is a limit on *failures* per account: once ``lockout`` failed attempts fall inside the
window, further attempts are refused until the window moves on, even with the right password.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.errors import StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from .errors import ApiError
from .resources import Resources

log = logging.getLogger("galley.ratelimit")


@dataclass(frozen=True)
class RatePolicy:
    """The limits, in ``limits`` notation ("N per period")."""

    login_per_ip: str = "30/minute"
    login_per_account: str = "10/minute"
    refresh_per_ip: str = "60/minute"
    refresh_per_account: str = "30/minute"
    biometric_per_ip: str = "30/minute"
    biometric_per_device: str = "10/minute"
    biometric_per_account: str = "10/minute"
    #: Failed password or biometric attempts per account before a temporary lockout.
    lockout: str = "5/15 minutes"
    #: /sync/v1 requests per user (all endpoints and devices together); None: unlimited.
    #: Initial sync at the default page size is ~100 requests for 100,000 rows.
    sync_per_user: str | None = "1200/minute"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: int  # seconds; 0 when allowed


class RateLimiter:
    """Hit counters keyed by a namespace and an identifier (an IP, an account, a device)."""

    def __init__(self, storage_url: str | None, policy: RatePolicy | None = None) -> None:
        storage = (
            storage_from_string(
                storage_url,
                key_prefix="galley-limits",
                # Errors of the store come out as StorageError (see throttle), and a store
                # that does not answer costs a request a second at most, not the OS timeout.
                wrap_exceptions=True,
                socket_connect_timeout=1,
                socket_timeout=1,
            )
            if storage_url
            else storage_from_string("memory://")
        )
        assert isinstance(storage, Storage)  # the synchronous flavour, for the thread pool
        self.storage = storage
        self._limiter = MovingWindowRateLimiter(self.storage)
        self._fixed = FixedWindowRateLimiter(self.storage)
        self._throttle_off_until = 0.0
        self.policy = policy or RatePolicy()

    def _retry_after(self, item: RateLimitItem, *keys: str) -> int:
        stats = self._limiter.get_window_stats(item, *keys)
        return max(1, math.ceil(stats.reset_time - time.time()))

    def hit(self, rule: str, *keys: str) -> Decision:
        """Count one attempt; refused when the limit was already reached."""
        item = parse(rule)
        if self._limiter.hit(item, *keys):
            return Decision(True, 0)
        return Decision(False, self._retry_after(item, *keys))

    def blocked(self, rule: str, *keys: str) -> Decision:
        """Whether the limit is reached, without counting an attempt."""
        item = parse(rule)
        if self._limiter.test(item, *keys):
            return Decision(True, 0)
        return Decision(False, self._retry_after(item, *keys))

    def clear(self, rule: str, *keys: str) -> None:
        self._limiter.clear(parse(rule), *keys)

    def enforce(self, rule: str, *keys: str) -> None:
        """Count one attempt and raise a 429 with ``Retry-After`` when over the limit."""
        decision = self.hit(rule, *keys)
        if not decision.allowed:
            raise too_many(decision.retry_after)

    def throttle(self, rule: str | None, *keys: str) -> None:
        """Count one request against a fixed-window ``rule`` (None: unlimited) and raise a 429
        with ``Retry-After`` when the window's allowance is spent."""
        if rule is None or time.monotonic() < self._throttle_off_until:
            return
        item = parse(rule)
        try:
            if self._fixed.hit(item, *keys):
                return
            stats = self._fixed.get_window_stats(item, *keys)
        except StorageError as exc:
            # Throttling protects the server; it must not take sync down with it. With the
            # store unreachable, requests go unthrottled (logged), and the store is left alone
            # for a while rather than costing every request a timeout.
            log.warning("rate-limit store unavailable, sync not throttled for 10 s: %s", exc)
            self._throttle_off_until = time.monotonic() + 10
            return
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise too_many(
            retry_after, message=f"Too many requests; try again in {retry_after} seconds."
        )


_lock = threading.Lock()


def limiter_for(resources: Resources) -> RateLimiter:
    """The process's limiter for ``resources``, built on first use (Redis-backed when
    ``REDIS_URL`` is configured, so every process shares the counters)."""
    with _lock:
        limiter = resources.extras.get("ratelimiter")
        if limiter is None:
            settings = resources.settings
            limiter = RateLimiter(
                settings.redis_url, RatePolicy(sync_per_user=settings.sync_rate_limit)
            )
            resources.extras["ratelimiter"] = limiter
    assert isinstance(limiter, RateLimiter)
    return limiter


def too_many(retry_after: int, code: str = "rate_limited", message: str | None = None) -> ApiError:
    return ApiError(
        429,
        code,
        message or f"Too many attempts; try again in {retry_after} seconds.",
        {"_": [f"retry after {retry_after} seconds"]},
        headers={"Retry-After": str(retry_after)},
    )
