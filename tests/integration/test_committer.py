"""The push committer: pushes that wait at the same time share one transaction (group commit),
each still gets its own answer, and a group stuck on a lock does not hold up the others.

Against the real committer of ``Resources``, its threads and the real databases. A push's
``admit`` hook (the rate limit, in the app) runs on the committer's thread before its group is
applied: a test holds it on an event to make pushes queue behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from sync_server.committer import PushCommitter, principals
from sync_server.db import create_db_engine
from sync_server.directory import DeviceRefused
from sync_server.errors import ApiError
from sync_server.push import PushResult
from sync_server.push_group import PushUnit
from sync_server.resources import Resources, build_resources
from sync_server.tables import devices
from tests.conftest import make_settings
from tests.factories import Factory, User
from tests.syncing import REGISTRY, cheap_passwords, create, dish, item, to_change_sets

__all__ = ["cheap_passwords"]


def _unit(resources: Resources, factory: Factory, user: User, device: str, *sets: Any) -> PushUnit:
    claims = resources.tokens.verify(factory.token(user))
    return PushUnit(device, to_change_sets(*sets), claims)


def _cs(seq: int, *ops: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "seq": seq, "ops": list(ops)}


def _open() -> None:
    return None


@pytest.fixture
def commits(db: Engine) -> Iterator[list[int]]:
    """Every transaction committed on ``db`` while the test runs."""
    seen: list[int] = []

    def count(conn: Any) -> None:
        seen.append(1)

    event.listen(db, "commit", count)
    yield seen
    event.remove(db, "commit", count)


def _behind_a_held_push(
    committer: PushCommitter, first: PushUnit, rest: list[PushUnit]
) -> list[Any]:
    """Push ``first`` and hold its group on the committer's thread while ``rest`` queue behind
    it; then let everything go. Every answer, exceptions included, in order."""
    gate = threading.Event()

    def hold() -> None:
        gate.wait()

    async def scenario() -> list[Any]:
        held = asyncio.ensure_future(committer.push(first, admit=hold))
        await asyncio.sleep(0.1)  # its group is taken and waits in admit()
        queued = [asyncio.ensure_future(committer.push(u, admit=_open)) for u in rest]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(held, *queued, return_exceptions=True)

    return asyncio.run(scenario())


def test_pushes_that_wait_together_are_applied_in_one_transaction(
    resources: Resources, factory: Factory, cheap_passwords: None, commits: list[int]
) -> None:
    branch = factory.branch()
    users = [factory.user("manager", [branch]) for _ in range(5)]
    units = [
        _unit(resources, factory, u, factory.device(u), _cs(1, create("menu_items", **dish())))
        for u in users
    ]
    commits.clear()

    answers = _behind_a_held_push(resources.committer, units[0], units[1:])

    assert all(isinstance(a, PushResult) for a in answers), answers
    assert [a.outcomes[0].status for a in answers] == ["applied"] * 5
    assert len(commits) == 2  # the held push alone, then the four that queued behind it
    # One version each, in queue order: version order is still commit order.
    versions = [a.outcomes[0].versions["org"] for a in answers]
    assert versions == sorted(versions) and len(set(versions)) == 5


def test_a_refused_push_does_not_hold_back_the_others_of_its_group(
    resources: Resources, factory: Factory, cheap_passwords: None, commits: list[int]
) -> None:
    branch = factory.branch()
    good, stale, other = (factory.user("manager", [branch]) for _ in range(3))
    first = _unit(resources, factory, good, factory.device(good), _cs(1, item_op()))
    signed_off = PushUnit(
        factory.device(stale),
        to_change_sets(_cs(1, item_op())),
        replace(resources.tokens.verify(factory.token(stale)), epoch=99),
    )
    unregistered = _unit(resources, factory, other, str(uuid.uuid4()), _cs(1, item_op()))
    fine = _unit(resources, factory, other, factory.device(other), _cs(1, item_op()))
    commits.clear()

    answers = _behind_a_held_push(resources.committer, first, [signed_off, unregistered, fine])

    assert isinstance(answers[0], PushResult) and isinstance(answers[3], PushResult)
    assert answers[3].outcomes[0].status == "applied"
    assert isinstance(answers[1], ApiError) and answers[1].status == 401
    assert isinstance(answers[2], DeviceRefused) and answers[2].unregistered
    assert len(commits) == 2


def item_op() -> dict[str, Any]:
    return create("inventory_items", **item())


def test_a_push_too_large_for_a_group_is_applied_one_change_set_at_a_time(
    db: Engine, resources: Resources, factory: Factory, cheap_passwords: None, commits: list[int]
) -> None:
    committer = _committer(resources, group_limit=2)
    user = factory.user("manager")
    device = factory.device(user)
    backlog = _unit(resources, factory, user, device, *(_cs(s, item_op()) for s in (1, 2, 3)))
    commits.clear()

    (answer,) = _behind_a_held_push(committer, backlog, [])
    committer.close()

    assert isinstance(answer, PushResult)
    assert [o.seq for o in answer.outcomes] == [1, 2, 3]
    assert len(commits) == 3  # one transaction per change-set, as push() applies them


def test_with_grouping_off_every_push_is_applied_alone(
    resources: Resources, factory: Factory, cheap_passwords: None, commits: list[int]
) -> None:
    committer = _committer(resources, group_limit=0)
    branch = factory.branch()
    users = [factory.user("manager", [branch]) for _ in range(3)]
    units = [_unit(resources, factory, u, factory.device(u), _cs(1, item_op())) for u in users]
    commits.clear()

    answers = _behind_a_held_push(committer, units[0], units[1:])
    committer.close()

    assert [a.outcomes[0].status for a in answers] == ["applied"] * 3
    assert len(commits) == 3


def _gate() -> tuple[threading.Event, Any]:
    """An ``admit`` hook that holds its push's group on the committer's thread until set."""
    gate = threading.Event()

    def hold() -> None:
        gate.wait()

    return gate, hold


def test_a_group_waits_for_the_devices_just_answered_that_push_back_to_back(
    resources: Resources, factory: Factory, cheap_passwords: None, commits: list[int]
) -> None:
    # Without gathering, two devices pushing flat out fall into alternate groups of one each.
    committer = _committer(resources, gather_for=30.0)
    branch = factory.branch()
    prompt, other = factory.user("manager", [branch]), factory.user("manager", [branch])
    prompt_device, other_device = factory.device(prompt), factory.device(other)
    gate, hold = _gate()

    def again(seq: int) -> PushUnit:
        return _unit(resources, factory, prompt, prompt_device, _cs(seq, item_op()))

    async def scenario() -> tuple[Any, Any]:
        await committer.push(again(1), admit=_open)
        # Pushed again as soon as answered: this device is expected back after its next group.
        second = asyncio.ensure_future(committer.push(again(2), admit=hold))
        await asyncio.sleep(0.1)  # its group is taken and held
        queued = asyncio.ensure_future(
            committer.push(
                _unit(resources, factory, other, other_device, _cs(1, item_op())), admit=_open
            )
        )
        await asyncio.sleep(0.05)
        commits.clear()
        gate.set()
        await asyncio.wait_for(second, timeout=10)
        await asyncio.sleep(0.2)
        assert not queued.done()  # waiting for the prompt device, not applied alone
        third = await asyncio.wait_for(committer.push(again(3), admit=_open), timeout=10)
        return await asyncio.wait_for(queued, timeout=10), third

    waited, third = asyncio.run(scenario())
    committer.close()

    assert waited.outcomes[0].status == third.outcomes[0].status == "applied"
    assert len(commits) == 2  # the held push; then the queued one with the device's next


def test_nobody_waits_for_a_device_pushing_for_the_first_time_or_after_a_pause(
    resources: Resources, factory: Factory, cheap_passwords: None, commits: list[int]
) -> None:
    # (No group is taken for stuck within the test: only gathering could hold the second.)
    committer = _committer(resources, gather_for=30.0, stalled_after=60.0)
    branch = factory.branch()
    first, other = factory.user("manager", [branch]), factory.user("manager", [branch])
    units = [
        _unit(resources, factory, u, factory.device(u), _cs(1, item_op())) for u in (first, other)
    ]
    commits.clear()

    gate, hold = _gate()

    async def scenario() -> list[Any]:
        held = asyncio.ensure_future(committer.push(units[0], admit=hold))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(committer.push(units[1], admit=_open))
        await asyncio.sleep(0.05)
        gate.set()
        # Had the queued push waited for the held push's device, 30 s would pass.
        return await asyncio.wait_for(asyncio.gather(held, queued), timeout=10)

    answers = asyncio.run(scenario())
    committer.close()
    assert [a.outcomes[0].status for a in answers] == ["applied"] * 2
    assert len(commits) == 2


def test_a_prompt_device_that_does_not_come_back_holds_the_next_group_only_so_long(
    resources: Resources, factory: Factory, cheap_passwords: None
) -> None:
    committer = _committer(resources, gather_for=0.3, stalled_after=60.0)
    branch = factory.branch()
    prompt, other = factory.user("manager", [branch]), factory.user("manager", [branch])
    prompt_device = factory.device(prompt)
    gate, hold = _gate()

    async def scenario() -> Any:
        await committer.push(
            _unit(resources, factory, prompt, prompt_device, _cs(1, item_op())), admit=_open
        )
        second = asyncio.ensure_future(
            committer.push(
                _unit(resources, factory, prompt, prompt_device, _cs(2, item_op())), admit=hold
            )
        )
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(
            committer.push(
                _unit(resources, factory, other, factory.device(other), _cs(1, item_op())),
                admit=_open,
            )
        )
        await asyncio.sleep(0.05)
        gate.set()
        await second
        return await asyncio.wait_for(queued, timeout=10)  # the device never pushes again

    answer = asyncio.run(scenario())
    committer.close()
    assert answer.outcomes[0].status == "applied"


def _committer(resources: Resources, **overrides: Any) -> PushCommitter:
    options: dict[str, Any] = {
        "group_limit": 64,
        "max_running": resources.settings.db_workers,
        "published": resources.publish_versions,
    }
    options.update(overrides)
    return PushCommitter(resources.engine, resources.executor, REGISTRY, **options)


@pytest.fixture
def mysql_resources(mysql_engine: Engine) -> Iterator[Resources]:
    res = build_resources(
        make_settings(mysql_engine.url.render_as_string(hide_password=False)), engine=mysql_engine
    )
    yield res
    res.release()


def test_a_group_stuck_on_a_lock_does_not_hold_back_other_pushes(
    mysql_engine: Engine, mysql_resources: Resources, cheap_passwords: None
) -> None:
    factory = Factory(mysql_resources)
    one, two = factory.branch(), factory.branch()
    stuck_user, free_user = factory.user("manager", [one]), factory.user("manager", [two])
    stuck_device, free_device = factory.device(stuck_user), factory.device(free_user)
    stuck = _unit(mysql_resources, factory, stuck_user, stuck_device, _cs(1, item_op()))
    free = _unit(mysql_resources, factory, free_user, free_device, _cs(1, item_op()))
    committer = mysql_resources.committer

    async def scenario(locker: Any) -> tuple[Any, float, Any, Any]:
        held = asyncio.ensure_future(committer.push(stuck, admit=_open))
        await asyncio.sleep(0.2)  # its group waits on the device's row lock
        # The device retries (its request timed out) just before another device pushes: the
        # retry must not join (and stall) the group that gets the other push around the lock.
        retry = asyncio.ensure_future(committer.push(stuck, admit=_open))
        started = time.monotonic()
        answer = await asyncio.wait_for(committer.push(free, admit=_open), timeout=10)
        took = time.monotonic() - started
        assert not held.done() and not retry.done()  # still waiting on the lock
        locker.rollback()
        first, second = await asyncio.wait_for(asyncio.gather(held, retry), timeout=10)
        return answer, took, first, second

    with mysql_engine.connect() as locker:
        locker.begin()
        locker.execute(select(devices.c.id).where(devices.c.id == stuck_device).with_for_update())
        answer, took, first, second = asyncio.run(scenario(locker))

    assert isinstance(answer, PushResult) and answer.outcomes[0].status == "applied"
    assert took < 5  # a group of its own after 250 ms, not after the lock wait timeout
    assert isinstance(first, PushResult) and first.outcomes[0].status == "applied"
    assert isinstance(second, PushResult) and second.outcomes[0].replayed


def test_pushes_behind_two_stuck_groups_get_a_third(
    mysql_engine: Engine, mysql_resources: Resources, cheap_passwords: None
) -> None:
    # Grouping off: each push is a group of its own, so the second stuck push cannot take the
    # third with it, and the third must get a group when the second has been stuck long enough.
    factory = Factory(mysql_resources)
    committer = _committer(mysql_resources, group_limit=0)
    users = [factory.user("manager", [factory.branch()]) for _ in range(3)]
    device_ids = [factory.device(u) for u in users]
    units = [
        _unit(mysql_resources, factory, u, d, _cs(1, item_op()))
        for u, d in zip(users, device_ids, strict=True)
    ]

    async def scenario(locker: Any) -> tuple[Any, float, list[Any]]:
        stuck = [asyncio.ensure_future(committer.push(units[0], admit=_open))]
        await asyncio.sleep(0.1)
        stuck.append(asyncio.ensure_future(committer.push(units[1], admit=_open)))
        await asyncio.sleep(0.05)  # the third arrives before the second gets its group
        started = time.monotonic()
        answer = await asyncio.wait_for(committer.push(units[2], admit=_open), timeout=10)
        took = time.monotonic() - started
        assert not any(f.done() for f in stuck)
        locker.rollback()
        return answer, took, await asyncio.wait_for(asyncio.gather(*stuck), timeout=10)

    with mysql_engine.connect() as locker:
        locker.begin()
        for device_id in device_ids[:2]:
            locker.execute(select(devices.c.id).where(devices.c.id == device_id).with_for_update())
        answer, took, late = asyncio.run(scenario(locker))
    committer.close()

    assert isinstance(answer, PushResult) and answer.outcomes[0].status == "applied"
    assert took < 3
    assert all(isinstance(a, PushResult) and a.outcomes[0].status == "applied" for a in late)


def test_every_waiting_push_is_answered_when_no_connection_can_be_had(
    resources: Resources,
) -> None:
    unreachable = create_db_engine("mysql+pymysql://nobody@127.0.0.1:1/none")
    committer = PushCommitter(
        unreachable,
        resources.executor,
        REGISTRY,
        group_limit=64,
        max_running=2,
        published=resources.publish_versions,
    )
    unit = PushUnit(str(uuid.uuid4()), to_change_sets(_cs(1, item_op())), None)

    async def scenario() -> list[Any]:
        pushes = [committer.push(unit, admit=_open) for _ in range(3)]
        return await asyncio.wait_for(asyncio.gather(*pushes, return_exceptions=True), timeout=30)

    answers = asyncio.run(scenario())
    unreachable.dispose()
    assert all(isinstance(a, OperationalError) for a in answers), answers


def test_identities_of_a_group_come_from_the_database(
    resources: Resources, factory: Factory, cheap_passwords: None
) -> None:
    user = factory.user("staff")
    claims = resources.tokens.verify(factory.token(user))
    with resources.engine.connect() as conn:
        (who,) = principals(conn, [claims])
        conn.rollback()
    assert not isinstance(who, Exception)
    assert (who.user_id, who.role, who.branch_ids) == (user.id, "staff", frozenset(user.branch_ids))
