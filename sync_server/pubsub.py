"""Publish/subscribe of small notifications ("scope X reached version N").

Redis pub/sub when Redis is configured, so that every server process hears every commit; an
in-process fan-out otherwise (the embedded single-process default). Notifications are hints that
make devices pull sooner; correctness never depends on them (a device that misses one pulls on
its own schedule). Hence neither a failing handler nor an unreachable Redis ever reaches the
publisher: a push that has committed must not turn into an error because a hint was lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("galley.pubsub")

Handler = Callable[[str, bytes], None]


class PubSub(Protocol):
    def publish(self, channel: str, message: bytes) -> None:
        """Send ``message`` to every subscriber of ``channel`` (best effort, never raises)."""
        ...

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(channel, message)`` for every message; returns an unsubscribe."""
        ...

    def close(self) -> None: ...


def _deliver(handlers: list[Handler], channel: str, message: bytes) -> None:
    for handler in handlers:
        try:
            handler(channel, message)
        except Exception:
            # One broken subscriber must not starve the others (nor fail the publisher).
            log.exception("pub/sub handler for %s failed", channel)


class _Handlers:
    """Handlers by channel, shared by both implementations."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_channel: dict[str, list[Handler]] = defaultdict(list)

    def snapshot(self, channel: str) -> list[Handler]:
        with self.lock:
            return list(self.by_channel.get(channel, ()))

    def remove(self, channel: str, handler: Handler) -> bool:
        """Drop ``handler``; True when ``channel`` has no handler left (caller holds the lock)."""
        current = self.by_channel.get(channel)
        if current is not None and handler in current:
            current.remove(handler)
        if current is not None and not current:
            del self.by_channel[channel]
            return True
        return False


class LocalPubSub:
    """Fan-out inside one process; handlers run in the publisher's thread."""

    def __init__(self) -> None:
        self._handlers = _Handlers()

    def publish(self, channel: str, message: bytes) -> None:
        _deliver(self._handlers.snapshot(channel), channel, message)

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        with self._handlers.lock:
            self._handlers.by_channel[channel].append(handler)

        def unsubscribe() -> None:
            with self._handlers.lock:
                self._handlers.remove(channel, handler)

        return unsubscribe

    def close(self) -> None:
        with self._handlers.lock:
            self._handlers.by_channel.clear()


class RedisPubSub:
    """Fan-out across processes through Redis PUBLISH/SUBSCRIBE.

    One Redis subscription connection per process, read by one background thread that calls the
    handlers. A channel is unsubscribed from Redis when its last handler goes.
    """

    #: Pause after a listener error (Redis restarting) so the thread does not spin.
    RECONNECT_DELAY = 1.0
    #: Seconds during which publishes are dropped after one failed.
    PUBLISH_BACKOFF = 5.0

    def __init__(self, client: Any) -> None:
        self._client = client
        self._handlers = _Handlers()
        self._pubsub: Any = None
        self._thread: Any = None
        self._skip_until = 0.0

    def publish(self, channel: str, message: bytes) -> None:
        # After a failure, publishes are skipped for a while instead of each paying the connect
        # timeout: a push that already committed should not wait on a Redis that is down.
        if time.monotonic() < self._skip_until:
            return
        try:
            self._client.publish(channel, message)
        except Exception as exc:  # redis.RedisError, OSError: the hint is lost, nothing else
            self._skip_until = time.monotonic() + self.PUBLISH_BACKOFF
            log.warning(
                "could not publish to %s (skipping for %ss): %s", channel, self.PUBLISH_BACKOFF, exc
            )

    def _dispatch(self, raw: dict[str, Any]) -> None:
        channel = raw["channel"].decode() if isinstance(raw["channel"], bytes) else raw["channel"]
        _deliver(self._handlers.snapshot(channel), channel, raw["data"])

    def _on_listener_error(self, exc: BaseException, _pubsub: Any, _thread: Any) -> None:
        # redis-py reconnects and re-subscribes on the next read; wait a little before it.
        log.warning("pub/sub listener error (retrying): %s", exc)
        time.sleep(self.RECONNECT_DELAY)

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        with self._handlers.lock:
            first_for_channel = channel not in self._handlers.by_channel
            self._handlers.by_channel[channel].append(handler)
            if self._pubsub is None:
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(**{channel: self._dispatch})
                self._thread = self._pubsub.run_in_thread(
                    sleep_time=0.5, daemon=True, exception_handler=self._on_listener_error
                )
            elif first_for_channel:
                self._pubsub.subscribe(**{channel: self._dispatch})

        def unsubscribe() -> None:
            with self._handlers.lock:
                if self._handlers.remove(channel, handler) and self._pubsub is not None:
                    try:
                        self._pubsub.unsubscribe(channel)
                    except Exception as exc:
                        log.warning("could not unsubscribe from %s: %s", channel, exc)

        return unsubscribe

    def close(self) -> None:
        with self._handlers.lock:
            thread, self._thread = self._thread, None
            pubsub, self._pubsub = self._pubsub, None
            self._handlers.by_channel.clear()
        if thread is not None:
            thread.stop()
            thread.join(timeout=5)
        if pubsub is not None:
            pubsub.close()


def create_pubsub(redis_client: Any | None) -> PubSub:
    """Redis pub/sub when a client is given, the in-process fan-out otherwise."""
    return RedisPubSub(redis_client) if redis_client is not None else LocalPubSub()
