"""``make bench``: initial sync, push and idle pull through the real HTTP app on MariaDB,
each printed next to the floor raw pymysql reaches on the same database in the same run.

    python -m tests.bench.run [--rows 100000] [--push-seconds 20] …

Environment: ``BENCH_MYSQL_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/galley_bench``;
the database is dropped and re-created), ``BENCH_REDIS_URL`` (default unset: in-process pub/sub).
Targets (issue #3): initial sync (at the largest page size, as the reference client makes it)
>= 50 % of the select+encode floor; push change-sets/s >= 25 % of the raw locked-counter
transactions/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass

from sqlalchemy import func, select

from domain.registry import branch_scope
from sync_protocol import messages as m
from sync_server.tables import sync_change_sets

from .anatomy import push_and_pull_anatomy
from .dataset import Member, World, build_world, create_floor_tables, seed_inventory, token_for
from .floor import Throughput, idle_pull_floor, initial_sync_floor, locked_counter_floor
from .workload import (
    InitialSync,
    PushRun,
    ServerProcess,
    database_server_pid,
    idle_pulls,
    initial_sync,
    process_cpu_seconds,
    push_run,
)

DEFAULT_URL = "mysql+pymysql://root@127.0.0.1:3306/galley_bench"
INITIAL_SYNC_TARGET = 0.50
PUSH_TARGET = 0.25
#: Push layouts: name -> (branches, devices per branch, change-sets per request); 16 devices in
#: each. One change-set per request is the worst case (a device syncing after every action);
#: a device back online sends its backlog in batches.
LAYOUTS = {"4x4": (4, 4, 1), "1x16": (1, 16, 1), "4x4-batch10": (4, 4, 10)}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="initial-sync replica size")
    parser.add_argument(
        "--rows-per-version",
        type=int,
        default=100,
        help="seeded rows per version (as if created by change-sets of this many creates)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="initial syncs per page limit")
    parser.add_argument("--idle-requests", type=int, default=1_000)
    parser.add_argument("--push-seconds", type=float, default=20.0)
    parser.add_argument("--floor-seconds", type=float, default=10.0)
    parser.add_argument("--ops-per-change-set", type=int, default=5)
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help=f"push layouts to run, of {list(LAYOUTS)}"
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=1,
        help="uvicorn worker processes (default 1, as `galley serve`)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run the server under py-spy: a flame graph (.svg) or collapsed stacks (other)",
    )
    return parser.parse_args(argv)


class _CpuMeter:
    """CPU seconds spent from now on by the benchmark process itself (the devices, or the
    floor's client threads), the database server and, when given, Galley's server: what a unit
    of work costs the whole machine, which the throughputs of a shared VM hide."""

    def __init__(self, db_pid: int | None, server: ServerProcess | None = None) -> None:
        self.db_pid = db_pid
        self.server = server
        self.start = self._now()

    def _now(self) -> dict[str, float | None]:
        return {
            "server": self.server.cpu_seconds() if self.server is not None else None,
            "client": time.process_time(),
            "database": process_cpu_seconds(self.db_pid) if self.db_pid is not None else None,
        }

    def per(self, count: int) -> dict[str, float]:
        """Milliseconds of CPU per unit of work, per process (those that could be measured)."""
        end = self._now()
        out: dict[str, float] = {}
        for part, before in self.start.items():
            after = end[part]
            if before is not None and after is not None and count:
                out[part] = (after - before) / count * 1000
        return out


def _cost(parts: dict[str, float]) -> str:
    return " + ".join(f"{part} {ms:.2f}" for part, ms in parts.items()) + (
        f" = {sum(parts.values()):.2f}" if len(parts) > 1 else ""
    )


@dataclass
class Line:
    label: str
    value: str
    floor: str = ""
    ratio: str = ""
    target: str = ""


def _verdict(ratio: float, target: float) -> str:
    return f">= {target:.0%}: {'met' if ratio >= target else 'MISSED'}"


def _print(lines: list[Line]) -> None:
    widths = [max(len(getattr(line, f)) for line in lines) for f in ("label", "value", "floor")]
    header = Line("measure", "Galley", "floor", "ratio", "target")
    for line in [header, *lines]:
        print(
            f"{line.label:<{widths[0]}}  {line.value:>{widths[1]}}  {line.floor:>{widths[2]}}"
            f"  {line.ratio:>6}  {line.target}"
        )


def _check_recorded(world: World, device_ids: list[str], run: PushRun) -> None:
    """Every change-set the devices were told about is recorded, once, as applied."""
    with world.engine.connect() as conn:
        recorded = conn.execute(
            select(sync_change_sets.c.status, func.count())
            .where(sync_change_sets.c.device_id.in_(device_ids))
            .group_by(sync_change_sets.c.status)
        ).all()
        conn.rollback()
    if dict(recorded) != {"applied": run.change_sets.count}:
        raise AssertionError(f"recorded {dict(recorded)}, acknowledged {run.change_sets.count}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    database_url = os.environ.get("BENCH_MYSQL_URL", DEFAULT_URL)
    redis_url = os.environ.get("BENCH_REDIS_URL") or None
    layouts = {name: LAYOUTS[name] for name in args.layouts.split(",") if name}
    began = time.perf_counter()
    # Other work on the machine skews every figure (the floors too): the report says how busy
    # it was.
    load_before = os.getloadavg()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {message}", file=sys.stderr, flush=True)

    say(f"creating and migrating {database_url.rsplit('/', 1)[-1]}")
    world = build_world(
        database_url, redis_url, {name: (b, d) for name, (b, d, _) in layouts.items()}
    )
    say(f"seeding {args.rows:,} inventory rows")
    seeded = seed_inventory(database_url, world.big_branch, args.rows, args.rows_per_version)
    scope = branch_scope(world.big_branch)

    say("floor: select + encode the replica")
    sync_floor = initial_sync_floor(database_url, scope)
    reader: Member = world.reader
    reader_token = token_for(world.resources, reader)
    lines: list[Line] = [
        Line("raw insert of the replica (rows/s)", f"{seeded.rows / seeded.seconds:,.0f}"),
    ]
    syncs: dict[int, InitialSync] = {}
    #: Server CPU seconds per measured phase (what a core of the server process costs).
    server_cpu: dict[str, float] = {}
    #: Machine CPU (ms) per change-set of each push layout, and per transaction of its floor.
    costs: dict[str, dict[str, float]] = {}
    db_pid = database_server_pid()
    with ServerProcess(database_url, redis_url, args.profile, args.server_workers) as server:
        for limit in (m.MAX_PULL_LIMIT, m.DEFAULT_PULL_LIMIT):
            for _ in range(args.repeats):
                say(f"initial sync, limit {limit}")
                cpu_before = server.cpu_seconds()
                run = initial_sync(server.base_url, reader_token, reader.device_ids[0], limit)
                cpu_after = server.cpu_seconds()
                if cpu_before is not None and cpu_after is not None:
                    run.server_cpu = cpu_after - cpu_before
                if run.rows < args.rows:
                    raise AssertionError(f"initial sync returned {run.rows} rows")
                if limit not in syncs or run.rate > syncs[limit].rate:
                    syncs[limit] = run
        cursors = syncs[m.MAX_PULL_LIMIT].cursors
        say(f"{args.idle_requests} pulls with nothing new")
        idle = idle_pulls(
            server.base_url, reader_token, reader.device_ids[0], cursors, args.idle_requests
        )
        idle_floor = idle_pull_floor(
            database_url,
            user_id=reader.user_id,
            device_id=reader.device_ids[0],
            cursors=cursors,
            requests=args.idle_requests,
        )
        pushes: dict[str, tuple[PushRun, Throughput]] = {}
        for counters, (name, (branch_count, _per_branch, batch)) in enumerate(layouts.items()):
            say(f"floor: locked-counter transactions, 16 threads on {branch_count} counter(s)")
            create_floor_tables(database_url, branch_count, suffix=str(counters))
            floor_cpu = _CpuMeter(db_pid)
            floor = locked_counter_floor(
                database_url, 16, branch_count, args.floor_seconds, suffix=str(counters)
            )
            costs[f"floor:{name}"] = floor_cpu.per(floor.count)
            devices = [
                (device_id, token_for(world.resources, member), member.branch_id)
                for member in world.pushers[name]
                for device_id in member.device_ids
            ]
            say(f"push: {len(devices)} devices on {branch_count} branch(es), {name}")
            push_cpu = _CpuMeter(db_pid, server)
            cpu_before = server.cpu_seconds()
            pushes[name] = (
                push_run(
                    server.base_url,
                    devices,
                    change_sets_per_request=batch,
                    ops_per_change_set=args.ops_per_change_set,
                    seconds=args.push_seconds,
                ),
                floor,
            )
            cpu_after = server.cpu_seconds()
            if cpu_before is not None and cpu_after is not None:
                server_cpu[name] = cpu_after - cpu_before
            costs[name] = push_cpu.per(pushes[name][0].change_sets.count)
            _check_recorded(world, [d for d, _, _ in devices], pushes[name][0])

    say("statement counts of one push and one pull (in-process)")
    push_anatomy, pull_anatomy = push_and_pull_anatomy(
        world.resources,
        token_for(world.resources, world.inspector),
        world.inspector.device_ids[0],
        args.ops_per_change_set,
    )

    for limit, run in syncs.items():
        ratio = run.rate / sync_floor.rate
        lines.append(
            Line(
                f"initial sync, limit {limit} (rows/s, {run.pages} pages;"
                f" CPU busy: client {run.client_cpu / run.seconds:.0%}"
                + (
                    f", server {run.server_cpu / run.seconds:.0%})"
                    if run.server_cpu is not None
                    else ")"
                ),
                f"{run.rate:,.0f}",
                f"{sync_floor.rate:,.0f}",
                f"{ratio:.0%}",
                # The target is for an initial sync as clients make it: the reference client
                # asks for the largest pages from version 0 (sync_protocol.client).
                _verdict(ratio, INITIAL_SYNC_TARGET) if limit == m.MAX_PULL_LIMIT else "",
            )
        )
    for point, value in idle.items():
        lines.append(
            Line(
                f"pull with nothing new, {point} (ms)",
                f"{value:.2f}",
                f"{idle_floor[point]:.2f}",
                f"{idle_floor[point] / value:.0%}",
            )
        )
    for name, (push, floor) in pushes.items():
        branches, per_branch, batch = layouts[name]
        where = f"{branches} branch{'es' if branches > 1 else ''} x {per_branch} devices"
        if batch > 1:
            where += f", {batch} change-sets/request"
        ratio = push.change_sets.rate / floor.rate
        lines.append(
            Line(
                f"push change-sets/s ({where})",
                f"{push.change_sets.rate:,.0f}",
                f"{floor.rate:,.0f}",
                f"{ratio:.0%}",
                _verdict(ratio, PUSH_TARGET),
            )
        )
        lines.append(Line(f"push ops/s ({where})", f"{push.ops.rate:,.0f}"))
        if name in server_cpu and push.change_sets.count:
            cpu = server_cpu[name]
            lines.append(
                Line(
                    f"push CPU per change-set ms, server busy %, client busy % ({where})",
                    f"{cpu / push.change_sets.count * 1000:.1f}, "
                    f"{cpu / push.change_sets.seconds:.0%}, "
                    f"{push.client_cpu / push.change_sets.seconds:.0%}",
                )
            )
        # Only with the server's own CPU measured (one worker process, no profiler): without
        # it the sum would leave out the largest part.
        if "server" in costs.get(name, {}) and costs.get(f"floor:{name}"):
            mine, theirs = costs[name], costs[f"floor:{name}"]
            lines.append(
                Line(
                    f"push machine CPU ms per change-set ({where}): {_cost(mine)};"
                    f" floor per transaction: {_cost(theirs)}",
                    f"{sum(mine.values()):.2f}",
                    f"{sum(theirs.values()):.2f}",
                    f"{sum(theirs.values()) / sum(mine.values()):.0%}",
                )
            )
        lines.append(
            Line(
                f"push request p50/p95/p99 ms ({where})",
                "/".join(f"{v:.0f}" for v in push.latency_ms.values()),
            )
        )
        if set(push.statuses) != {"applied"}:
            raise AssertionError(f"unexpected push outcomes: {dict(push.statuses)}")

    print()
    print(
        f"Galley sync benchmark — {platform.node()}, {os.cpu_count()} CPUs (load average at the "
        f"start {load_before[0]:.1f}, at the end {os.getloadavg()[0]:.1f}), Python "
        f"{platform.python_version()}, {database_url.rsplit('@', 1)[-1]}"
    )
    print(
        f"server: uvicorn, {args.server_workers} worker process(es); "
        f"replica: {args.rows:,} inventory rows, {args.rows_per_version} per version; push: "
        f"change-sets of {args.ops_per_change_set} ops (1 create + renames of the device's "
        f"items); floors measured in this run (see tests/bench/floor.py)"
    )
    print(f"initial sync: {syncs[m.MAX_PULL_LIMIT].verified}")
    if pushes:
        print("push: every acknowledged change-set recorded once, as applied (checked in the db)")
    print(
        f"one push of 1 change-set x {args.ops_per_change_set} ops: "
        f"{push_anatomy.statements} statements ({push_anatomy.under_scope_lock} under the scope "
        f"lock; the floor: 4), {push_anatomy.round_trips} database round trips, "
        f"{push_anatomy.checkouts} pool checkouts; one up-to-date pull: "
        f"{pull_anatomy.statements} statements, {pull_anatomy.round_trips} round trips, "
        f"{pull_anatomy.checkouts} checkouts"
    )
    print()
    _print(lines)
    say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
