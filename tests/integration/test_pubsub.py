"""One contract for both pub/sub implementations: the in-process fan-out and Redis (real Redis).

A notification is a hint ("scope X reached version N"), so the contract is about delivery to the
right subscribers, and about never hurting the publisher.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from sync_server.pubsub import LocalPubSub, PubSub, RedisPubSub

Received = queue.Queue[tuple[str, bytes]]


@dataclass
class Backend:
    """Builds pub/sub instances of one kind and knows when a subscription is live."""

    name: str
    make: Callable[[], PubSub]
    subscribers: Callable[[str], int] | None = None
    built: list[PubSub] = field(default_factory=list)

    def new(self) -> PubSub:
        instance = self.make()
        self.built.append(instance)
        return instance

    def wait_subscribed(self, channel: str, count: int) -> None:
        """Redis confirms SUBSCRIBE asynchronously: wait until the server counts ``count``."""
        if self.subscribers is None:
            return
        deadline = time.monotonic() + 5
        while self.subscribers(channel) != count:
            assert time.monotonic() < deadline, f"{channel} never reached {count} subscribers"
            time.sleep(0.01)


def _redis_backend(url: str) -> Iterator[Backend]:
    import redis

    clients: list[Any] = []

    def make() -> PubSub:
        client = redis.Redis.from_url(url)
        clients.append(client)
        return RedisPubSub(client)

    probe = redis.Redis.from_url(url)

    def subscribers(channel: str) -> int:
        return int(dict(probe.pubsub_numsub(channel)).get(channel.encode(), 0))

    backend = Backend("redis", make, subscribers)
    yield backend
    for instance in backend.built:
        instance.close()
    for client in [*clients, probe]:
        client.close()


@pytest.fixture
def redis_backend(redis_client: Any, redis_url: str) -> Iterator[Backend]:
    """RedisPubSub instances on the test Redis (each with its own client, like separate server
    processes)."""
    yield from _redis_backend(redis_url)


@pytest.fixture
def ch() -> Callable[[str], str]:
    """Channel names unique to the test: Redis pub/sub is server-wide (not per database), and
    other test processes may be publishing at the same time."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    return lambda name: prefix + name


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "redis":
        yield request.getfixturevalue("redis_backend")  # skips/fails when not configured
        return
    local = Backend("local", LocalPubSub)
    yield local
    for instance in local.built:
        instance.close()


def _collector() -> tuple[Received, Callable[[str, bytes], None]]:
    received: Received = queue.Queue()
    return received, lambda channel, message: received.put((channel, message))


def test_a_subscriber_receives_what_is_published_on_its_channel(
    backend: Backend, ch: Callable[[str], str]
) -> None:
    org = ch("galley:scope:org")
    other = ch("galley:scope:other")
    bus = backend.new()
    received, handler = _collector()
    bus.subscribe(org, handler)
    backend.wait_subscribed(org, 1)

    bus.publish(other, b"1")
    bus.publish(org, b"42")

    assert received.get(timeout=5) == (org, b"42")
    assert received.empty(), "nothing from the other channel"


def test_every_subscriber_of_a_channel_receives_each_message(
    backend: Backend, ch: Callable[[str], str]
) -> None:
    c = ch("c")
    bus = backend.new()
    first, first_handler = _collector()
    second, second_handler = _collector()
    bus.subscribe(c, first_handler)
    bus.subscribe(c, second_handler)
    backend.wait_subscribed(c, 1)

    bus.publish(c, b"v1")
    bus.publish(c, b"v2")

    assert [first.get(timeout=5), first.get(timeout=5)] == [(c, b"v1"), (c, b"v2")]
    assert [second.get(timeout=5), second.get(timeout=5)] == [(c, b"v1"), (c, b"v2")]


def test_unsubscribing_stops_delivery_to_that_handler_only(
    backend: Backend, ch: Callable[[str], str]
) -> None:
    c = ch("c")
    bus = backend.new()
    gone, gone_handler = _collector()
    stays, stays_handler = _collector()
    unsubscribe = bus.subscribe(c, gone_handler)
    bus.subscribe(c, stays_handler)
    backend.wait_subscribed(c, 1)

    unsubscribe()
    bus.publish(c, b"after")

    # Both handlers of a message are called together: once the remaining one has it, the
    # unsubscribed one would have had it too.
    assert stays.get(timeout=5) == (c, b"after")
    assert gone.empty()


def test_the_last_unsubscribe_releases_the_channel(
    backend: Backend, ch: Callable[[str], str]
) -> None:
    c = ch("c")
    bus = backend.new()
    received, handler = _collector()
    unsubscribe = bus.subscribe(c, handler)
    backend.wait_subscribed(c, 1)

    unsubscribe()
    unsubscribe()  # idempotent
    backend.wait_subscribed(c, 0)

    # And the channel can be subscribed again.
    bus.subscribe(c, handler)
    backend.wait_subscribed(c, 1)
    bus.publish(c, b"again")
    assert received.get(timeout=5) == (c, b"again")


def test_a_failing_handler_neither_reaches_the_publisher_nor_starves_the_others(
    backend: Backend, ch: Callable[[str], str]
) -> None:
    c = ch("c")
    bus = backend.new()
    received, handler = _collector()

    def broken(channel: str, message: bytes) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe(c, broken)
    bus.subscribe(c, handler)
    backend.wait_subscribed(c, 1)

    bus.publish(c, b"1")  # does not raise
    bus.publish(c, b"2")

    assert [received.get(timeout=5), received.get(timeout=5)] == [(c, b"1"), (c, b"2")]


def test_closing_stops_delivery(backend: Backend, ch: Callable[[str], str]) -> None:
    c = ch("c")
    bus = backend.new()
    other = backend.new() if backend.name == "redis" else bus
    received, handler = _collector()
    bus.subscribe(c, handler)
    backend.wait_subscribed(c, 1)

    bus.close()
    backend.wait_subscribed(c, 0)
    other.publish(c, b"late")

    time.sleep(0.2)
    assert received.empty()


@pytest.mark.integration
def test_two_processes_on_redis_both_hear_a_publish_from_either(
    redis_backend: Backend, ch: Callable[[str], str]
) -> None:
    branch_x = ch("galley:scope:branch:x")
    backend = redis_backend
    web_1, web_2 = backend.new(), backend.new()
    heard_1, handler_1 = _collector()
    heard_2, handler_2 = _collector()
    web_1.subscribe(branch_x, handler_1)
    web_2.subscribe(branch_x, handler_2)
    backend.wait_subscribed(branch_x, 2)

    web_1.publish(branch_x, b"7")

    assert heard_1.get(timeout=5) == (branch_x, b"7")
    assert heard_2.get(timeout=5) == (branch_x, b"7")

    web_2.publish(branch_x, b"8")

    assert heard_1.get(timeout=5) == (branch_x, b"8")
    assert heard_2.get(timeout=5) == (branch_x, b"8")


def test_publishing_while_redis_is_unreachable_loses_the_hint_but_does_not_raise() -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    bus = RedisPubSub(client)
    try:
        bus.publish("galley:scope:org", b"1")  # fails inside, logged
        started = time.monotonic()
        for version in range(2, 50):
            bus.publish("galley:scope:org", str(version).encode())
        # The next publishes do not each wait for a connection that just failed.
        assert time.monotonic() - started < 0.5
    finally:
        bus.close()
        client.close()
