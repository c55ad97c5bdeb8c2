"""The measured side: a real uvicorn server process and devices talking MessagePack to it."""

from __future__ import annotations

import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import httpx
import msgspec

from sync_protocol import messages as m
from sync_protocol.checksums import MOD, row_checksum
from sync_protocol.codec import MSGPACK

from .dataset import SECRET
from .floor import Throughput
from .stats import percentiles

_encode = msgspec.msgpack.Encoder().encode
REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``uvicorn sync_server.asgi:app`` in a child process (one worker), configured by env.

    With ``profile_to`` set the server runs under ``py-spy record`` and writes its profile there
    when it stops (py-spy must be on PATH).
    """

    def __init__(
        self,
        database_url: str,
        redis_url: str | None,
        profile_to: str | None = None,
        workers: int = 1,
    ) -> None:
        self.database_url = database_url
        self.workers = workers
        self.redis_url = redis_url
        self.profile_to = profile_to
        #: Extra py-spy flags, e.g. ``--gil`` (only the thread holding the GIL: CPU hotspots).
        self.profile_flags = os.environ.get("BENCH_PYSPY_FLAGS", "").split()
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        env = {
            **os.environ,
            "GALLEY_ENV": "test",
            "DATABASE_URL": self.database_url,
            "GALLEY_SECRET_KEY": SECRET,
            "GALLEY_LOG_LEVEL": "WARNING",
            # Sixteen simulated devices of four users push far beyond a real user's pace: the
            # limit is raised, not switched off, so its check is part of what is measured.
            "GALLEY_SYNC_RATE_LIMIT": "10000000/minute",
        }
        env.pop("REDIS_URL", None)
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "sync_server.asgi:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--workers",
            str(self.workers),
        ]
        if self.profile_to:
            # A .svg gets a flame graph; any other name the collapsed stacks, for grep and sort.
            fmt = "flamegraph" if self.profile_to.endswith(".svg") else "raw"
            command = [
                "py-spy",
                "record",
                *self.profile_flags,
                "-f",
                fmt,
                "-o",
                self.profile_to,
                "--",
                *command,
            ]
        # From the checkout's root, as `make run` does: the editable install resolves our
        # top-level packages as namespace packages elsewhere (their __init__ would not run).
        # Every setting is in ``env`` (which wins over a .env file), the secret included, so
        # nothing is written under var/.
        self.process = subprocess.Popen(command, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start within 30 s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: uvicorn (and py-spy) shut down cleanly
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server process has used so far; None where /proc is
        not available, when py-spy stands between us and the server, or with several worker
        processes (their time is not the parent's)."""
        if self.process is None or self.profile_to or self.workers > 1:
            return None
        return process_cpu_seconds(self.process.pid)


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` has used so far; None without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the ")" of the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def database_server_pid() -> int | None:
    """The local MariaDB/MySQL server process, when it runs on this machine (its CPU time is
    part of what a push costs the machine); None otherwise."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() in ("mariadbd", "mysqld"):
                return int(entry.name)
        except OSError:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Reply:
    status_code: int
    content: bytes


class _Connection:
    """One device's keep-alive HTTP/1.1 connection (the standard library's ``http.client``).

    The load generator runs on the same 2 vCPUs as the server and MariaDB, so it is kept cheap:
    httpx spent ~2 ms of CPU per small request here, ``http.client`` well under half of that,
    and every millisecond the devices spend is one the server cannot.
    """

    def __init__(self, base_url: str, token: str) -> None:
        url = urlsplit(base_url)
        self._conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=120)
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": MSGPACK,
            "Accept": MSGPACK,
        }

    def post(self, path: str, content: bytes) -> _Reply:
        self._conn.request("POST", path, body=content, headers=self._headers)
        response = self._conn.getresponse()
        return _Reply(response.status, response.read())

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()


def _client(base_url: str, token: str) -> _Connection:
    return _Connection(base_url, token)


# --- initial sync ----------------------------------------------------------------------------


@dataclass
class InitialSync:
    rows: int
    seconds: float
    pages: int
    cursors: dict[str, int]
    verified: str
    #: Of ``seconds``, the time this client spent decoding pages (the rest: request to reply).
    decoding: float
    #: CPU seconds this client process spent (HTTP, decoding): it runs alone meanwhile.
    client_cpu: float = 0.0
    #: CPU seconds the server process spent meanwhile (None: not measured).
    server_cpu: float | None = None

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def initial_sync(base_url: str, token: str, device_id: str, limit: int) -> InitialSync:
    """Pull from version 0 until caught up; time it; then verify the replica's checksums."""
    decoder = msgspec.msgpack.Decoder(m.PullResponse)
    pages: list[m.PullResponse] = []
    cursors: dict[str, int] = {}
    decoding = 0.0
    with _client(base_url, token) as client:
        cpu_started = time.process_time()
        started = time.perf_counter()
        while True:
            request = m.PullRequest(m.PROTOCOL_VERSION, device_id, cursors, limit)
            response = client.post("/sync/v1/pull", content=_encode(request))
            if response.status_code != 200:
                raise RuntimeError(f"pull failed: {response.status_code} {response.content!r}")
            decode_started = time.perf_counter()
            page = decoder.decode(response.content)
            decoding += time.perf_counter() - decode_started
            pages.append(page)
            cursors = page.cursors
            if not page.has_more:
                break
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_started
    rows = sum(len(p.changes) for p in pages)
    return InitialSync(rows, elapsed, len(pages), cursors, _verify(pages), decoding, client_cpu)


def _verify(pages: list[m.PullResponse]) -> str:
    """Check every page checksum and each finished scope's count and checksum."""
    replica: dict[str, dict[tuple[str, str], int]] = {}
    for page in pages:
        page_sum = 0
        for change in page.changes:
            page_sum = (page_sum + row_checksum(change.entity, change.id, change.version)) % MOD
            rows = replica.setdefault(change.scope, {})
            if change.deleted:
                rows.pop((change.entity, change.id), None)
            else:
                rows[(change.entity, change.id)] = change.version
        if page_sum != page.page_checksum:
            raise AssertionError("page checksum mismatch")
        for state in page.scopes:
            rows = replica.get(state.scope, {})
            checksum = sum(row_checksum(e, i, v) for (e, i), v in rows.items()) % MOD
            if (len(rows), checksum) != (state.count, state.checksum):
                raise AssertionError(f"replica of {state.scope} does not match the server")
    return "page and scope checksums verified"


# --- pull with nothing new -------------------------------------------------------------------


def idle_pulls(
    base_url: str, token: str, device_id: str, cursors: dict[str, int], requests: int
) -> dict[str, float]:
    """Latency percentiles (ms) of pulls by an up-to-date device, one after another."""
    body = _encode(m.PullRequest(m.PROTOCOL_VERSION, device_id, cursors, m.DEFAULT_PULL_LIMIT))
    decoder = msgspec.msgpack.Decoder(m.PullResponse)
    samples: list[float] = []
    with _client(base_url, token) as client:
        for i in range(requests + 20):
            started = time.perf_counter()
            response = client.post("/sync/v1/pull", content=body)
            page = decoder.decode(response.content)
            elapsed = (time.perf_counter() - started) * 1000
            if page.changes or page.has_more:
                raise AssertionError("the device was expected to be up to date")
            if i >= 20:  # the first ones warm connections up
                samples.append(elapsed)
    return percentiles(samples)


# --- push ------------------------------------------------------------------------------------


@dataclass
class PushRun:
    change_sets: Throughput
    ops: Throughput
    requests: int
    statuses: Counter[str]
    latency_ms: dict[str, float]
    #: CPU seconds of this (client) process during the run, all pushing threads together.
    client_cpu: float


@dataclass
class _Device:
    device_id: str
    token: str
    branch_id: str
    seq: int = 0
    #: id -> version last seen, for the items whose creating change-set was acknowledged.
    items: dict[str, int] = field(default_factory=dict)


def _next_change_set(
    device: _Device, ops_per_change_set: int, rng: random.Random
) -> tuple[m.ChangeSet, list[str]]:
    device.seq += 1
    ops: list[m.Op] = []
    touched: list[str] = []
    known = list(device.items)
    patches = rng.sample(known, min(len(known), ops_per_change_set - 1))
    for _ in range(ops_per_change_set - len(patches)):
        item_id = str(uuid.uuid4())
        ops.append(
            m.Create(
                "inventory_items",
                item_id,
                {
                    "sku": f"PUSH-{item_id[:13]}",
                    "name": "Pushed ingredient",
                    "category": "Produce",
                    "unit": "kg",
                },
            )
        )
        touched.append(item_id)
    for item_id in patches:
        ops.append(
            m.Patch(
                "inventory_items",
                item_id,
                device.items[item_id],
                {"name": f"Renamed at seq {device.seq}"},
            )
        )
        touched.append(item_id)
    change_set = m.ChangeSet(
        str(uuid.uuid4()), device.seq, ops, time.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    return change_set, touched


def push_run(
    base_url: str,
    devices: list[tuple[str, str, str]],
    *,
    change_sets_per_request: int,
    ops_per_change_set: int,
    seconds: float,
) -> PushRun:
    """``devices`` (id, token, branch) push concurrently for ``seconds``, one thread each.

    Each change-set creates one item and renames up to ``ops_per_change_set - 1`` items the
    device created earlier (at the version its last outcome reported), so nothing conflicts and
    every change-set must come back ``applied``.
    """
    decoder = msgspec.msgpack.Decoder(m.PushResponse)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    totals = {"change_sets": 0, "ops": 0, "requests": 0}
    lock = threading.Lock()
    start = threading.Barrier(len(devices) + 1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def pusher(index: int, device: _Device) -> None:
        rng = random.Random(index)
        local: Counter[str] = Counter()
        local_latency: list[float] = []
        change_sets = ops = requests = 0
        try:
            with _client(base_url, device.token) as client:
                start.wait()
                while not stop.is_set():
                    batch = [
                        _next_change_set(device, ops_per_change_set, rng)
                        for _ in range(change_sets_per_request)
                    ]
                    request = m.PushRequest(
                        m.PROTOCOL_VERSION, device.device_id, [cs for cs, _ in batch]
                    )
                    began = time.perf_counter()
                    response = client.post("/sync/v1/push", content=_encode(request))
                    local_latency.append((time.perf_counter() - began) * 1000)
                    if response.status_code != 200:
                        raise RuntimeError(f"push: {response.status_code} {response.content!r}")
                    result = decoder.decode(response.content)
                    if result.error is not None or len(result.outcomes) != len(batch):
                        raise RuntimeError(f"push stopped early: {result.error}")
                    for (change_set, touched), outcome in zip(batch, result.outcomes, strict=True):
                        local[outcome.status] += 1
                        version = outcome.versions.get(f"branch:{device.branch_id}")
                        if version is not None:
                            for item_id in touched:
                                device.items[item_id] = version
                        ops += len(change_set.ops)
                    change_sets += len(batch)
                    requests += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            stop.set()
        finally:
            with lock:
                statuses.update(local)
                latencies.extend(local_latency)
                totals["change_sets"] += change_sets
                totals["ops"] += ops
                totals["requests"] += requests

    threads = [
        threading.Thread(target=pusher, args=(i, _Device(d, t, b)))
        for i, (d, t, b) in enumerate(devices)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    cpu_began = time.process_time()
    began = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return PushRun(
        Throughput(totals["change_sets"], elapsed),
        Throughput(totals["ops"], elapsed),
        totals["requests"],
        statuses,
        percentiles(latencies),
        time.process_time() - cpu_began,
    )
