"""Publish/subscribe of small notifications ("scope X reached version N").

Redis pub/sub when Redis is configured, so that every server process hears every commit; an
in-process fan-out otherwise (the embedded single-process default). Notifications are hints that
make devices pull sooner; correctness never depends on them (a device that misses one pulls on
its own schedule).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

Handler = Callable[[str, bytes], None]


class PubSub(Protocol):
    def publish(self, channel: str, message: bytes) -> None: ...

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(channel, message)`` for every message; returns an unsubscribe."""
        ...

    def close(self) -> None: ...


class LocalPubSub:
    """Fan-out inside one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: dict[str, list[Handler]] = defaultdict(list)

    def publish(self, channel: str, message: bytes) -> None:
        with self._lock:
            handlers = list(self._handlers.get(channel, ()))
        for handler in handlers:
            handler(channel, message)

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        with self._lock:
            self._handlers[channel].append(handler)

        def unsubscribe() -> None:
            with self._lock:
                if handler in self._handlers.get(channel, []):
                    self._handlers[channel].remove(handler)

        return unsubscribe

    def close(self) -> None:
        with self._lock:
            self._handlers.clear()


class RedisPubSub:
    """Fan-out across processes through Redis PUBLISH/SUBSCRIBE."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._pubsub: Any = None
        self._thread: Any = None
        self._handlers: dict[str, list[Handler]] = defaultdict(list)

    def publish(self, channel: str, message: bytes) -> None:
        self._client.publish(channel, message)

    def _dispatch(self, raw: dict[str, Any]) -> None:
        channel = raw["channel"].decode() if isinstance(raw["channel"], bytes) else raw["channel"]
        with self._lock:
            handlers = list(self._handlers.get(channel, ()))
        for handler in handlers:
            handler(channel, raw["data"])

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        with self._lock:
            self._handlers[channel].append(handler)
            if self._pubsub is None:
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(**{channel: self._dispatch})
                self._thread = self._pubsub.run_in_thread(sleep_time=0.5, daemon=True)
            else:
                self._pubsub.subscribe(**{channel: self._dispatch})

        def unsubscribe() -> None:
            with self._lock:
                if handler in self._handlers.get(channel, []):
                    self._handlers[channel].remove(handler)

        return unsubscribe

    def close(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._thread.stop()
                self._thread = None
            if self._pubsub is not None:
                self._pubsub.close()
                self._pubsub = None


def create_pubsub(redis_client: Any | None) -> PubSub:
    return RedisPubSub(redis_client) if redis_client is not None else LocalPubSub()
