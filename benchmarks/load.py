"""Load: many concurrent clients against Retouch, next to the bare FastAPI baseline.

N clients (default 64) for T seconds against one `retouch serve` (`--topology single`,
SQLite and local results) or against two `retouch serve --no-worker` and three
`retouch worker` processes sharing a fresh PostgreSQL schema and one results directory
(`--topology scale-out`). The model is the fixture engine (`--model fixture`: the GPU
stage is four sleeps of 20 ms) or the tiny random-weight diffusers pipeline
(`--model demo`, 2 steps at 512x512 unless `--steps` says otherwise).

One client in eight follows task event streams (`GET /v1/tasks/{id}/events`, until the
task ends or for at most 5 s); the others loop over a mix of creates (image_urls on a
loopback image host), polls, cancels and bad requests (no prompt, four image_urls, a
wrong key, an unknown task), each on one keep-alive connection of the same raw
HTTP/1.1 client as `api_overhead.py`. The account may have a bounded number of
unfinished tasks (`--max-unfinished`), so creates past it answer 429: expected, and
counted apart from 200. The bare FastAPI baseline of `api_overhead.py` is measured in
the same run with the same client and connection count, and the ratios are printed.

    python benchmarks/load.py [--clients 64] [--duration 30] [--model fixture|demo]
                              [--steps N] [--topology single|scale-out]
                              [--database-url URL] [--max-unfinished N]
                              [--quick] [--json PATH]

It prints throughput, p50/p99 latency per endpoint, answers by status (expected and
unexpected), the servers' memory, the baseline ratios and `retouch ledger check`. The
exit status is 1 when any of these fails: an unexpected 5xx answer (or a socket error);
a created task missing from the database or not finished (completed, failed or
cancelled) within the drain time after the load stops; a failed task (every input is
valid); the ledger check; a server
process (or its worker child) that exits, or whose resident memory (VmRSS) at the end
of the run, after the drain, exceeds 1.2 x its highest during the warm-up (which lasts
until a first task finished, so a worker's working set is in it). Unexpected 4xx answers
are reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from api_overhead import (
    HOST,
    JSON_TYPE,
    LoadGeneratorFailure,
    Result,
    Scenario,
    Server,
    StartupFailure,
    baseline_command,
    baseline_scenarios,
    child_environment,
    free_port,
    interrupt_on_sigterm,
    measure_with_asyncio,
    package_version,
    percentile_ms,
    ratio,
    read_response_body,
    retouch_cli,
    run_event_loop,
    running,
    stop_process,
    wait_until_healthy,
)
from dispatch import ImageServer, postgres_problem, postgres_schema

DEFAULT_CLIENTS = 64
DEFAULT_SECONDS = 30.0
DEFAULT_WARMUP_SECONDS = 5.0
DEFAULT_BASELINE_SECONDS = 5.0
BASELINE_WARMUP_SECONDS = 1.0
QUICK_CLIENTS = 8
QUICK_SECONDS = 2.0
QUICK_WARMUP_SECONDS = 0.5
QUICK_BASELINE_SECONDS = 0.5
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MODEL_NAME = "qwen-image-edit"
OUTPUT_SIZE = "512x512"
DEMO_STEPS = 2
# Unfinished tasks the account may have (creates past it answer 429), and how long the
# queue may take to empty once the load stops.
MAX_UNFINISHED = {"fixture": 32, "demo": 4}
DRAIN_SECONDS = {"fixture": 60.0, "demo": 600.0}
API_PROCESSES = 2
WORKER_PROCESSES = 3
WATCHER_SHARE = 8  # one client in eight follows event streams
WATCH_SECONDS = 5.0  # a watcher leaves a stream after this long
WARMUP_LIMIT_SECONDS = 300.0  # the warm-up also waits for a first finished task
REQUEST_TIMEOUT_SECONDS = 30.0
STARTUP_TIMEOUT_SECONDS = 300.0  # a worker loads its model before it is healthy
MEMORY_GROWTH_LIMIT = 1.2
MEMORY_SAMPLE_SECONDS = 0.5
TERMINAL = frozenset({"completed", "failed", "cancelled"})

CREATE = "POST /v1/images/generations"
POLL = "GET /v1/tasks/{id}"
CANCEL = "POST /v1/tasks/{id}/cancel"
EVENTS = "GET /v1/tasks/{id}/events"
NO_PROMPT = "bad: no prompt"
FOUR_IMAGES = "bad: 4 image_urls"
WRONG_KEY = "bad: wrong key"
UNKNOWN_TASK = "bad: unknown task"
# What each endpoint may answer under this load; anything else is unexpected.
EXPECTED: dict[str, frozenset[int]] = {
    CREATE: frozenset({200, 429}),  # 429: the account's unfinished-task limit
    POLL: frozenset({200}),
    CANCEL: frozenset({200, 409}),  # 409: the task finished before the cancel
    EVENTS: frozenset({200}),
    NO_PROMPT: frozenset({400}),
    FOUR_IMAGES: frozenset({400}),
    WRONG_KEY: frozenset({401}),
    UNKNOWN_TASK: frozenset({404}),
}
# Weights of what a request client does next.
CANCELLED_SHARE = 0.25  # of the tasks created, those a client then cancels
MIX = {CREATE: 20, POLL: 60, CANCEL: 5, NO_PROMPT: 4, FOUR_IMAGES: 4, WRONG_KEY: 4,
       UNKNOWN_TASK: 3}  # fmt: skip


class CheckFailure(Exception):
    """The run could not be completed (its figures would mean nothing)."""


@dataclass(frozen=True)
class Config:
    topology: str
    model: str
    steps: int | None
    clients: int
    seconds: float
    warmup_seconds: float
    baseline_seconds: float
    baseline_warmup_seconds: float
    max_unfinished: int
    drain_seconds: float
    database_url: str | None
    seed: int
    json_path: Path | None

    @property
    def watchers(self) -> int:
        return max(1, self.clients // WATCHER_SHARE) if self.clients > 1 else 0


# --------------------------------------------------------------------------- tallies


@dataclass
class EndpointTally:
    """One endpoint's answers: statuses over the whole run, latencies of the measured
    window."""

    expected: frozenset[int]
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    def unexpected(self) -> Counter[str]:
        found = Counter(
            {f"HTTP {s}": n for s, n in self.statuses.items() if s not in self.expected}
        )
        return found + self.failures

    def unexpected_5xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


@dataclass(frozen=True)
class EndpointRow:
    endpoint: str
    requests: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    expected: dict[str, int]
    unexpected: dict[str, int]


@dataclass
class Streams:
    """What the event-stream watchers saw."""

    opened: int = 0
    saw_the_end: int = 0
    left_early: int = 0
    events: int = 0


# --------------------------------------------------------------------------- processes


def vm_rss_kib(pid: int) -> int | None:
    """VmRSS of a live process, in KiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (the worker child of `retouch serve`, and its helpers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


def process_label(server: Server, pid: int) -> str:
    if pid == server.process.pid:
        return server.name
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        command = ""
    kinds = {"spawn_main": "worker", "resource_tracker": "resource tracker"}
    kind = next((k for marker, k in kinds.items() if marker in command), f"pid {pid}")
    return f"{server.name}: {kind}"


@dataclass
class Memory:
    """Resident memory of every server process, sampled every MEMORY_SAMPLE_SECONDS: the
    highest during the warm-up (which includes a whole task, so a worker's working set),
    the highest while measuring, and once more after the drain (the end of the run)."""

    labels: dict[int, str] = field(default_factory=dict)
    warm: dict[int, int] = field(default_factory=dict)
    peak: dict[int, int] = field(default_factory=dict)
    end: dict[int, int | None] = field(default_factory=dict)

    def sample(self, servers: Sequence[Server]) -> dict[int, int]:
        found = {}
        for server in servers:
            for pid in process_tree(server.process.pid):
                rss = vm_rss_kib(pid)
                if rss is not None:
                    found[pid] = rss
                    self.labels.setdefault(pid, process_label(server, pid))
        return found

    def record(self, servers: Sequence[Server], highest: dict[int, int]) -> None:
        for pid, rss in self.sample(servers).items():
            highest[pid] = max(highest.get(pid, 0), rss)

    def finish(self, servers: Sequence[Server]) -> None:
        """The sample at the end; a process gone since the warm-up ends at None."""
        found = self.sample(servers)
        self.end = {pid: found.get(pid) for pid in {*self.warm, *found}}

    def problems(self) -> list[str]:
        found = []
        for pid, warm in self.warm.items():
            end = self.end.get(pid)
            if end is None:
                found.append(f"{self.labels[pid]} exited during the run")
            elif end > MEMORY_GROWTH_LIMIT * warm:
                found.append(
                    f"{self.labels[pid]}: resident memory grew from {warm / 1024:.1f} MiB "
                    f"in the warm-up to {end / 1024:.1f} MiB at the end "
                    f"(limit {MEMORY_GROWTH_LIMIT:g}x)"
                )
        return found

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for pid, warm in self.warm.items():
            end = self.end.get(pid)
            rows.append(
                {
                    "process": self.labels[pid],
                    "warm_mib": round(warm / 1024, 1),
                    "peak_mib": round(self.peak.get(pid, warm) / 1024, 1),
                    "end_mib": None if end is None else round(end / 1024, 1),
                    "end_over_warm": math.nan if end is None else end / warm,
                }
            )
        return rows


def spawn(
    name: str, command: list[str], port: int, workdir: Path, stack: ExitStack, secret: str
) -> Server:
    """Start a process (stopped with the stack); it is not waited for here. Every process
    signs result links with the same `secret`."""
    log_path = workdir / f"{name}.log"
    env = {**child_environment(), "RETOUCH_SECRET_KEY": secret}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    stack.callback(stop_process, process)
    return Server(name, port, process, log_path)


def error_lines(server: Server) -> int:
    """Records at level error or above in a process's log (JSON lines)."""
    count = 0
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and ('"level": "error"' in line or '"level": "critical"' in line):
            count += 1
    return count


# --------------------------------------------------------------------------- deployment


@dataclass
class Deployment:
    apis: list[Server]
    workers: list[Server]
    database_url: str
    store_args: list[str]  # how `retouch ledger check` finds the database
    key: str

    @property
    def servers(self) -> list[Server]:
        return [*self.apis, *self.workers]


def model_args(config: Config, workdir: Path) -> list[str]:
    steps = config.steps or (DEMO_STEPS if config.model == "demo" else None)
    model = config.model
    if model == "demo" and config.topology == "scale-out":
        # Built once and shared, rather than once in each worker's data directory.
        model = str(workdir / "demo-checkpoint")
        retouch_cli("demo-model", model, timeout=STARTUP_TIMEOUT_SECONDS)
    return ["--model", model, *(["--steps", str(steps)] if steps else [])]


def fetch_args() -> list[str]:
    return ["--allow-private-networks", "--fetch-ports", "any"]


def create_key(config: Config, store_args: list[str]) -> str:
    """A key whose account has credits for the whole run, no rate limit to speak of and
    room for `max_unfinished` unfinished tasks."""
    secret = retouch_cli("keys", "create", "--name", "load", "--credits", "1000000000",
                         *store_args, timeout=STARTUP_TIMEOUT_SECONDS).split()[0]  # fmt: skip
    retouch_cli("accounts", "update", "load", "--rate", "1000000",
                "--concurrency", str(config.max_unfinished), *store_args,
                timeout=STARTUP_TIMEOUT_SECONDS)  # fmt: skip
    return secret


def single_commands(
    config: Config, workdir: Path, database_url: str | None, model: list[str]
) -> list[tuple[str, list[str], int]]:
    port = free_port()
    serve = [sys.executable, "-m", "retouch", "serve", *model, *fetch_args()]
    serve += ["--data-dir", str(workdir / "serve"), "--port", str(port)]
    serve += ["--database-url", database_url] if database_url else []
    return [("serve", serve, port)]


def scale_out_commands(
    workdir: Path, database_url: str, model: list[str]
) -> list[tuple[str, list[str], int]]:
    shared = ["--database-url", database_url, "--storage", str(workdir / "results")]
    shared += [*model, *fetch_args()]
    commands = []
    for index in range(API_PROCESSES):
        port = free_port()
        api = [sys.executable, "-m", "retouch", "serve", "--no-worker", *shared]
        api += ["--data-dir", str(workdir / f"api{index}"), "--port", str(port)]
        commands.append((f"api{index}", api, port))
    for index in range(WORKER_PROCESSES):
        port = free_port()
        worker = [sys.executable, "-m", "retouch", "worker", *shared]
        worker += ["--data-dir", str(workdir / f"worker{index}"), "--worker-port", str(port)]
        commands.append((f"worker{index}", worker, port))
    return commands


def start_deployment(config: Config, workdir: Path, stack: ExitStack) -> Deployment:
    """The database, an API key, then every process (started together, awaited in turn)."""
    pg_url = None
    if config.database_url is not None:
        pg_url = stack.enter_context(postgres_schema(config.database_url))
    if config.topology == "single":
        data_dir = workdir / "serve"
        database_url = pg_url or f"sqlite:///{data_dir / 'retouch.db'}"
    else:
        assert pg_url is not None, "scale-out needs PostgreSQL"
        data_dir, database_url = workdir / "cli", pg_url
    store_args = ["--data-dir", str(data_dir), *(["--database-url", pg_url] if pg_url else [])]
    key = create_key(config, store_args)
    model = model_args(config, workdir)
    if config.topology == "single":
        commands = single_commands(config, workdir, pg_url, model)
    else:
        commands = scale_out_commands(workdir, database_url, model)
    secret = secrets.token_urlsafe(32)
    servers = [spawn(*command, workdir, stack, secret) for command in commands]
    for server in servers:
        wait_until_healthy(server, "/healthz", STARTUP_TIMEOUT_SECONDS)
    apis = [server for server in servers if not server.name.startswith("worker")]
    workers = [server for server in servers if server.name.startswith("worker")]
    return Deployment(apis, workers, database_url, store_args, key)


# --------------------------------------------------------------------------- the database


class Tasks:
    """Reads the tasks table directly (the benchmark's own view, not the API's)."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url)

    def states(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT id, status FROM tasks")).all()
        return {str(task_id): str(status) for task_id, status in rows}

    def finished(self) -> int:
        with self.engine.connect() as conn:
            query = text("SELECT count(*) FROM tasks WHERE status IN ('completed', 'failed')")
            return int(conn.execute(query).scalar_one())

    def failures(self) -> Counter[str]:
        with self.engine.connect() as conn:
            query = text("SELECT error_message FROM tasks WHERE status = 'failed'")
            return Counter(str(message) for (message,) in conn.execute(query))

    def close(self) -> None:
        self.engine.dispose()


# --------------------------------------------------------------------------- the load


class Connection:
    """One keep-alive HTTP/1.1 connection to one API (reconnects after an error)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(HOST, self.port)
        reader, writer = self.streams
        writer.write(Scenario("", self.port, method, path, headers, body).raw_request())
        status, keep_alive, data = await read_response_body(reader)
        if not keep_alive:
            self.close()
        return status, data

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


REQUEST_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                  TimeoutError)  # fmt: skip


class Load:
    """The clients, the tasks they created and what they were answered."""

    def __init__(
        self, config: Config, deployment: Deployment, image_url: str, tasks: Tasks
    ) -> None:
        self.config = config
        self.deployment = deployment
        self.tasks = tasks
        self.tallies = {
            endpoint: EndpointTally(expected) for endpoint, expected in EXPECTED.items()
        }
        self.streams = Streams()
        self.memory = Memory()
        self.created: list[str] = []
        self.unfinished: dict[str, None] = {}  # insertion-ordered sets
        self.to_cancel: dict[str, None] = {}  # the unfinished tasks a client will cancel
        self.measure_from = math.inf
        self.deadline = math.inf
        self.measured_seconds = 0.0
        self.rng = random.Random(config.seed)
        self.auth = {"Authorization": f"Bearer {deployment.key}"}
        body = {"model": MODEL_NAME, "prompt": "make it blue", "image_urls": [image_url],
                "size": OUTPUT_SIZE}  # fmt: skip
        self.create_body = json.dumps(body).encode()
        self.no_prompt = json.dumps({**body, "prompt": None}).encode()
        self.four_images = json.dumps({**body, "image_urls": [image_url] * 4}).encode()

    # ---- the run

    async def run(self) -> None:
        apis = self.deployment.apis
        watchers = self.config.watchers
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS) as client:
            loops = [
                self.watch_loop(client, apis[i % len(apis)]) if i < watchers
                else self.request_loop(Connection(apis[i % len(apis)].port), i)
                for i in range(self.config.clients)
            ]  # fmt: skip
            clients = [asyncio.create_task(loop) for loop in loops]
            try:
                await self.phases()
                await asyncio.gather(*clients)
            finally:
                for task in clients:
                    task.cancel()
                await asyncio.gather(*clients, return_exceptions=True)

    async def phases(self) -> None:
        """The warm-up (WARMUP seconds and a first task finished), then the measured window."""
        servers, memory = self.deployment.servers, self.memory
        started = time.perf_counter()
        while not await self.warmed_up(started):
            memory.record(servers, memory.warm)
            await asyncio.sleep(MEMORY_SAMPLE_SECONDS)
        memory.record(servers, memory.warm)
        self.measure_from = time.perf_counter()
        self.deadline = self.measure_from + self.config.seconds
        while (left := self.deadline - time.perf_counter()) > 0:
            memory.record(servers, memory.peak)
            await asyncio.sleep(min(MEMORY_SAMPLE_SECONDS, left))
        self.measured_seconds = time.perf_counter() - self.measure_from

    async def warmed_up(self, started: float) -> bool:
        elapsed = time.perf_counter() - started
        if elapsed < self.config.warmup_seconds:
            return False
        if await asyncio.to_thread(self.tasks.finished):
            return True
        if elapsed > WARMUP_LIMIT_SECONDS:
            raise CheckFailure(f"no task finished in {WARMUP_LIMIT_SECONDS:.0f} s of warm-up")
        return False

    def running(self) -> bool:
        return time.perf_counter() < self.deadline

    # ---- request clients

    async def request_loop(self, connection: Connection, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        actions: dict[str, Callable[[Connection], Any]] = {
            CREATE: self.create, POLL: self.poll, CANCEL: self.cancel,
            NO_PROMPT: self.bad_no_prompt, FOUR_IMAGES: self.bad_four_images,
            WRONG_KEY: self.bad_wrong_key, UNKNOWN_TASK: self.bad_unknown_task,
        }  # fmt: skip
        names, weights = list(MIX), list(MIX.values())
        try:
            while self.running():
                await actions[rng.choices(names, weights)[0]](connection)
        finally:
            connection.close()

    async def timed(
        self, endpoint: str, connection: Connection, method: str, path: str,
        headers: dict[str, str], body: bytes = b"",
    ) -> tuple[int, bytes] | None:  # fmt: skip
        """One request; its status and latency go to the endpoint's tally."""
        tally = self.tallies[endpoint]
        start = time.perf_counter()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                status, data = await connection.request(method, path, headers, body)
        except REQUEST_ERRORS as exc:
            connection.close()
            tally.failures[type(exc).__name__] += 1
            await asyncio.sleep(0.01)
            return None
        tally.statuses[status] += 1
        if self.measure_from <= start < self.deadline:
            tally.latencies.append(time.perf_counter() - start)
        return status, data

    async def create(self, connection: Connection) -> None:
        headers = {**JSON_TYPE, **self.auth}
        answer = await self.timed(CREATE, connection, "POST", "/v1/images/generations",
                                  headers, self.create_body)  # fmt: skip
        if answer is not None and answer[0] == 200:
            task_id = str(json.loads(answer[1])["id"])
            self.created.append(task_id)
            self.unfinished[task_id] = None
            if self.rng.random() < CANCELLED_SHARE:
                self.to_cancel[task_id] = None
        elif answer is not None and answer[0] == 429:
            await asyncio.sleep(0.05)  # as a client honouring Retry-After would, briefly

    async def poll(self, connection: Connection) -> None:
        task_id = self.pick()
        if task_id is None:
            return await self.create(connection)
        answer = await self.timed(POLL, connection, "GET", f"/v1/tasks/{task_id}", self.auth)
        self.note_status(task_id, answer)

    async def cancel(self, connection: Connection) -> None:
        if not self.to_cancel:
            return await self.poll(connection)
        task_id = self.rng.choice(tuple(self.to_cancel))
        path = f"/v1/tasks/{task_id}/cancel"
        self.note_status(task_id, await self.timed(CANCEL, connection, "POST", path, self.auth))

    async def bad_no_prompt(self, connection: Connection) -> None:
        headers = {**JSON_TYPE, **self.auth}
        await self.timed(NO_PROMPT, connection, "POST", "/v1/images/generations", headers,
                         self.no_prompt)  # fmt: skip

    async def bad_four_images(self, connection: Connection) -> None:
        headers = {**JSON_TYPE, **self.auth}
        await self.timed(FOUR_IMAGES, connection, "POST", "/v1/images/generations", headers,
                         self.four_images)  # fmt: skip

    async def bad_wrong_key(self, connection: Connection) -> None:
        task_id = self.pick() or "task-unknown"
        headers = {"Authorization": "Bearer sk-not-a-key"}
        await self.timed(WRONG_KEY, connection, "GET", f"/v1/tasks/{task_id}", headers)

    async def bad_unknown_task(self, connection: Connection) -> None:
        path = f"/v1/tasks/task-unified-{self.rng.getrandbits(64):016x}"
        await self.timed(UNKNOWN_TASK, connection, "GET", path, self.auth)

    def pick(self) -> str | None:
        """Mostly a task not yet seen finished; sometimes any task created so far."""
        if self.unfinished and self.rng.random() < 0.8:
            return self.rng.choice(tuple(self.unfinished))
        return self.rng.choice(self.created) if self.created else None

    def note_status(self, task_id: str, answer: tuple[int, bytes] | None) -> None:
        if answer is not None and answer[0] == 200:
            if json.loads(answer[1])["status"] in TERMINAL:
                self.finished(task_id)

    def finished(self, task_id: str) -> None:
        self.unfinished.pop(task_id, None)
        self.to_cancel.pop(task_id, None)

    # ---- event-stream watchers

    async def watch_loop(self, client: httpx.AsyncClient, api: Server) -> None:
        rng = random.Random(self.config.seed * 7919)
        while self.running():
            task_id = rng.choice(tuple(self.unfinished)) if self.unfinished else None
            if task_id is None:
                await asyncio.sleep(0.05)
                continue
            await self.watch(client, f"{api.base_url}/v1/tasks/{task_id}/events", task_id)

    async def watch(self, client: httpx.AsyncClient, url: str, task_id: str) -> None:
        """Follow one stream until the task ends or WATCH_SECONDS pass, then hang up."""
        tally = self.tallies[EVENTS]
        start = time.perf_counter()
        leave_at = min(start + WATCH_SECONDS, self.deadline)
        first = True
        try:
            async with asyncio.timeout(max(0.0, leave_at - start)):
                async with client.stream("GET", url, headers=self.auth) as response:
                    tally.statuses[response.status_code] += 1
                    if response.status_code != 200:
                        return
                    self.streams.opened += 1
                    async for line in response.aiter_lines():
                        if line.startswith("event: task"):
                            self.streams.events += 1
                            if first and self.measure_from <= start < self.deadline:
                                tally.latencies.append(time.perf_counter() - start)
                            first = False
                        elif line.startswith("data:"):
                            if json.loads(line[5:])["status"] in TERMINAL:
                                self.streams.saw_the_end += 1
                                self.finished(task_id)
                                return
        except TimeoutError:
            self.streams.left_early += 1
        except httpx.HTTPError as exc:
            tally.failures[type(exc).__name__] += 1
            await asyncio.sleep(0.01)

    # ---- results

    def rows(self) -> list[EndpointRow]:
        seconds = self.measured_seconds or math.nan
        rows = []
        for endpoint, tally in self.tallies.items():
            latencies = sorted(tally.latencies)
            expected = {str(s): n for s, n in sorted(tally.statuses.items()) if s in tally.expected}
            rows.append(
                EndpointRow(
                    endpoint=endpoint,
                    requests=len(latencies),
                    requests_per_second=len(latencies) / seconds,
                    p50_ms=percentile_ms(latencies, 0.50),
                    p99_ms=percentile_ms(latencies, 0.99),
                    expected=expected,
                    unexpected=dict(tally.unexpected()),
                )
            )
        return rows


# --------------------------------------------------------------------------- after the load


@dataclass
class Outcome:
    tasks: dict[str, Any] = field(default_factory=dict)
    ledger: str = ""
    problems: list[str] = field(default_factory=list)


def drain(load: Load, tasks: Tasks, limit: float, outcome: Outcome) -> None:
    """Wait until every task in the database is finished; then nothing created may be
    missing from it."""
    started = time.monotonic()
    while True:
        states = tasks.states()
        open_tasks = {task_id: s for task_id, s in states.items() if s not in TERMINAL}
        if not open_tasks or time.monotonic() - started > limit:
            break
        time.sleep(0.2)
    counts = Counter(states.values())
    lost = [task_id for task_id in load.created if task_id not in states]
    failures = dict(tasks.failures().most_common(3))
    outcome.tasks = {
        "created": len(load.created),
        "in_database": len(states),
        "by_status": dict(sorted(counts.items())),
        "lost": len(lost),
        "stuck": len(open_tasks),
        "drain_seconds": round(time.monotonic() - started, 2),
        "failure_messages": failures,
    }
    if counts["failed"]:
        # Every input is a valid image on a reliable host: a failed task is a bug.
        outcome.problems.append(f"{counts['failed']} task(s) failed: {failures}")
    if lost:
        outcome.problems.append(f"{len(lost)} created task(s) are not in the database: {lost[:3]}")
    if open_tasks:
        shown = list(open_tasks.items())[:3]
        outcome.problems.append(
            f"{len(open_tasks)} task(s) still unfinished {limit:.0f} s after the load: {shown}"
        )


def check_ledger(deployment: Deployment, outcome: Outcome) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "retouch", "ledger", "check", *deployment.store_args],
        capture_output=True,
        text=True,
        check=False,
        timeout=STARTUP_TIMEOUT_SECONDS,
        env=child_environment(),
    )
    report = (completed.stdout + completed.stderr).strip()
    outcome.ledger = report.splitlines()[-1] if report else f"exit {completed.returncode}"
    if completed.returncode != 0:
        outcome.problems.append(f"`retouch ledger check` failed:\n{report}")


def answer_problems(load: Load) -> list[str]:
    found = []
    for endpoint, tally in load.tallies.items():
        if tally.unexpected_5xx() or tally.failures:
            unexpected = ", ".join(f"{kind} x{n}" for kind, n in tally.unexpected().items())
            found.append(f"{endpoint}: unexpected answers ({unexpected})")
    return found


# --------------------------------------------------------------------------- the baseline


def measure_baseline(config: Config, workdir: Path) -> list[Result]:
    """`api_overhead.py`'s bare FastAPI app, with the same client and connection count."""
    port = free_port()
    command = baseline_command(port, workdir / "baseline.db")
    results = []
    with running("baseline", command, port, "/ping", workdir):
        for scenario in baseline_scenarios(port):
            if config.baseline_warmup_seconds > 0:
                measure_with_asyncio(scenario, config.baseline_warmup_seconds, config.clients)
            results.append(measure_with_asyncio(scenario, config.baseline_seconds, config.clients))
    return results


def baseline_ratios(rows: list[EndpointRow], baseline: list[Result]) -> dict[str, float]:
    by = {row.endpoint: row for row in rows}
    ping, create = baseline
    total = sum(row.requests_per_second for row in rows if row.endpoint != EVENTS)
    return {
        "mixed_rps_over_ping_rps": ratio(total, ping.requests_per_second),
        "mixed_rps_over_create_rps": ratio(total, create.requests_per_second),
        "poll_p50_over_ping_p50": ratio(by[POLL].p50_ms, ping.p50_ms),
        "poll_p99_over_ping_p99": ratio(by[POLL].p99_ms, ping.p99_ms),
        "create_p50_over_create_p50": ratio(by[CREATE].p50_ms, create.p50_ms),
        "create_p99_over_create_p99": ratio(by[CREATE].p99_ms, create.p99_ms),
        "cancel_p50_over_create_p50": ratio(by[CANCEL].p50_ms, create.p50_ms),
    }


# --------------------------------------------------------------------------- output


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def environment(config: Config) -> dict[str, Any]:
    processes = (
        "one `retouch serve` (API + worker child)" if config.topology == "single"
        else f"{API_PROCESSES} `retouch serve --no-worker` + {WORKER_PROCESSES} `retouch worker`"
    )  # fmt: skip
    database = "PostgreSQL (fresh schema)" if config.database_url else "SQLite"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu_model()}), {platform.platform()}",
        "python": platform.python_version(),
        "versions": ", ".join(f"{n} {package_version(n)}" for n in ("fastapi", "uvicorn")),
        "topology": f"{config.topology}: {processes}, {database}",
        "model": config.model,
        "clients": config.clients,
        "watchers": config.watchers,
        "seconds": config.seconds,
        "warmup_seconds": config.warmup_seconds,
        "max_unfinished": config.max_unfinished,
    }


def print_header(env: dict[str, Any]) -> None:
    print(f"date:      {env['date']}")
    print(f"machine:   {env['machine']}, Python {env['python']}, {env['versions']}")
    print(f"topology:  {env['topology']}, model {env['model']}")
    print(
        f"load:      {env['clients']} clients ({env['watchers']} following event streams) for "
        f"{env['seconds']:g} s after a warm-up of {env['warmup_seconds']:g} s or more; the "
        f"account may have {env['max_unfinished']} unfinished tasks"
    )
    print(flush=True)


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items()) or "-"


def print_rows(rows: list[EndpointRow], streams: Streams) -> None:
    print(f"{'endpoint':<30} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  "
          "expected answers / unexpected")  # fmt: skip
    for row in rows:
        print(
            f"{row.endpoint:<30} {row.requests:>8} {row.requests_per_second:>8.1f} "
            f"{row.p50_ms:>8.1f} {row.p99_ms:>8.1f}  {format_counts(row.expected)} / "
            f"{format_counts(row.unexpected)}"
        )
    total = sum(row.requests_per_second for row in rows if row.endpoint != EVENTS)
    print(f"all requests but event streams: {total:.1f} req/s (statuses include the warm-up; "
          f"event streams: p50/p99 to the first event)")  # fmt: skip
    print(
        f"event streams: {streams.opened} opened, {streams.saw_the_end} followed to the end, "
        f"{streams.left_early} left before the task ended (after {WATCH_SECONDS:g} s or at "
        f"the end of the load), {streams.events} events"
    )


def print_outcome(outcome: Outcome, memory: Memory, errors: dict[str, int]) -> None:
    tasks = outcome.tasks
    print(
        f"tasks:     {tasks['created']} created, {format_counts(tasks['by_status'])}; "
        f"{tasks['lost']} lost, {tasks['stuck']} unfinished after a drain of "
        f"{tasks['drain_seconds']:g} s"
    )
    if tasks["failure_messages"]:
        print(f"           failures: {tasks['failure_messages']}")
    print(f"{'memory, VmRSS MiB':<36} {'warm-up':>8} {'load':>8} {'end':>8}  end/warm-up")
    for row in memory.rows():
        print(f"  {row['process']:<34} {row['warm_mib']:>8.1f} {row['peak_mib']:>8.1f} "
              f"{row['end_mib'] or math.nan:>8.1f} {row['end_over_warm']:>6.2f}x")  # fmt: skip
    print(f"errors logged by the servers: {format_counts(errors)}")


def print_baseline(baseline: list[Result], ratios: dict[str, float]) -> None:
    print()
    print(f"{'baseline (bare FastAPI)':<30} {'requests':>8} {'req/s':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8}  errors")  # fmt: skip
    for result in baseline:
        print(
            f"{result.scenario:<30} {result.requests:>8} {result.requests_per_second:>8.1f} "
            f"{result.p50_ms:>8.1f} {result.p99_ms:>8.1f}  {result.errors}"
        )
    print("retouch / baseline:")
    print(
        f"  all requests req/s over GET /ping {ratios['mixed_rps_over_ping_rps']:.2f}x, over "
        f"POST /create {ratios['mixed_rps_over_create_rps']:.2f}x"
    )
    print(
        f"  poll over GET /ping: p50 {ratios['poll_p50_over_ping_p50']:.2f}x, p99 "
        f"{ratios['poll_p99_over_ping_p99']:.2f}x"
    )
    print(
        f"  create over POST /create: p50 {ratios['create_p50_over_create_p50']:.2f}x, p99 "
        f"{ratios['create_p99_over_create_p99']:.2f}x; cancel p50 "
        f"{ratios['cancel_p50_over_create_p50']:.2f}x"
    )


def print_verdict(outcome: Outcome) -> None:
    print()
    print(f"ledger:    {outcome.ledger}")
    if not outcome.problems:
        print("checks:    passed (no unexpected 5xx, nothing lost or stuck, ledger clean, "
              "memory flat)")  # fmt: skip
        return
    print(f"checks:    FAILED ({len(outcome.problems)})")
    for problem in outcome.problems:
        print(f"  - {problem}")


# --------------------------------------------------------------------------- the run


def run_load(config: Config, workdir: Path, image_url: str, outcome: Outcome) -> dict[str, Any]:
    """Start the deployment, load it, drain it, check it; the figures as a dict."""
    with ExitStack() as stack:
        deployment = start_deployment(config, workdir, stack)
        tasks = Tasks(deployment.database_url)
        stack.callback(tasks.close)
        load = Load(config, deployment, image_url, tasks)
        try:
            run_event_loop(load.run())
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        drain(load, tasks, config.drain_seconds, outcome)
        load.memory.finish(deployment.servers)
        check_ledger(deployment, outcome)
        outcome.problems[:0] = answer_problems(load) + load.memory.problems()
        dead = [s.name for s in deployment.servers if s.process.poll() is not None]
        if dead:
            outcome.problems.append(f"process(es) exited during the run: {', '.join(dead)}")
        errors = {server.name: error_lines(server) for server in deployment.servers}
        rows = load.rows()
        print_rows(rows, load.streams)
        print_outcome(outcome, load.memory, {k: v for k, v in errors.items() if v})
        return {
            "endpoints": [asdict(row) for row in rows],
            "streams": asdict(load.streams),
            "memory": load.memory.rows(),
            "errors_logged": errors,
            "unexpected_5xx": sum(t.unexpected_5xx() for t in load.tallies.values()),
            "unexpected": sum(sum(t.unexpected().values()) for t in load.tallies.values()),
        }


def run(config: Config) -> int:
    env = environment(config)
    print_header(env)
    outcome = Outcome()
    image_server = ImageServer()
    try:
        with tempfile.TemporaryDirectory(prefix="retouch-load-") as tmp:
            workdir = Path(tmp)
            baseline = measure_baseline(config, workdir)
            figures = run_load(config, workdir, image_server.url, outcome)
    finally:
        image_server.close()
    rows = [EndpointRow(**row) for row in figures["endpoints"]]
    ratios = baseline_ratios(rows, baseline)
    print_baseline(baseline, ratios)
    print_verdict(outcome)
    if config.json_path is not None:
        baseline_rows = [
            {**asdict(result), "requests_per_second": result.requests_per_second}
            for result in baseline
        ]
        summary = {
            "environment": env,
            **figures,
            "tasks": outcome.tasks,
            "baseline": baseline_rows,
            "ratios": ratios,
            "ledger": outcome.ledger,
            "problems": outcome.problems,
            "passed": not outcome.problems,
        }
        config.json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 1 if outcome.problems else 0


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, help=f"concurrent clients [{DEFAULT_CLIENTS}]")
    parser.add_argument("--duration", type=float, help=f"measured seconds [{DEFAULT_SECONDS:g}]")
    parser.add_argument(
        "--warmup",
        type=float,
        help=f"seconds before measuring [{DEFAULT_WARMUP_SECONDS:g}, and until a task finished]",
    )
    parser.add_argument(
        "--baseline-duration",
        type=float,
        help=f"seconds per baseline scenario [{DEFAULT_BASELINE_SECONDS:g}]",
    )
    parser.add_argument("--model", choices=["fixture", "demo"], default="fixture")
    parser.add_argument("--steps", type=int, help=f"denoising steps [demo: {DEMO_STEPS}]")
    parser.add_argument("--topology", choices=["single", "scale-out"], default="single")
    parser.add_argument(
        "--database-url",
        help="PostgreSQL to run on, in a fresh schema dropped afterwards (scale-out default: "
        f"$RETOUCH_TEST_DATABASE_URL, else {DEFAULT_DATABASE_URL}); single: SQLite without it",
    )
    parser.add_argument(
        "--max-unfinished",
        type=int,
        help="unfinished tasks the account may have [fixture 32, demo 4]",
    )
    parser.add_argument(
        "--drain-seconds", type=float, help="time the queue has to empty [fixture 60, demo 600]"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_CLIENTS} "
                        f"clients, {QUICK_SECONDS:g} s, short warm-up and baseline")  # fmt: skip
    parser.add_argument("--json", type=Path, dest="json_path", help="also write figures here")
    args = parser.parse_args(argv)
    for name in ("clients", "duration", "max_unfinished", "drain_seconds", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    database_url = args.database_url
    if args.topology == "scale-out" and database_url is None:
        database_url = os.environ.get("RETOUCH_TEST_DATABASE_URL") or DEFAULT_DATABASE_URL
    quick = args.quick

    def pick(value: Any, quick_value: Any, default: Any) -> Any:
        return value if value is not None else (quick_value if quick else default)

    return Config(
        topology=args.topology,
        model=args.model,
        steps=args.steps,
        clients=pick(args.clients, QUICK_CLIENTS, DEFAULT_CLIENTS),
        seconds=pick(args.duration, QUICK_SECONDS, DEFAULT_SECONDS),
        warmup_seconds=pick(args.warmup, QUICK_WARMUP_SECONDS, DEFAULT_WARMUP_SECONDS),
        baseline_seconds=pick(
            args.baseline_duration, QUICK_BASELINE_SECONDS, DEFAULT_BASELINE_SECONDS
        ),
        baseline_warmup_seconds=0.0 if quick else BASELINE_WARMUP_SECONDS,
        max_unfinished=args.max_unfinished or MAX_UNFINISHED[args.model],
        drain_seconds=args.drain_seconds or DRAIN_SECONDS[args.model],
        database_url=database_url,
        seed=args.seed,
        json_path=args.json_path,
    )


@contextmanager
def reported_failures() -> Iterator[None]:
    """Failures of the run itself (not of its checks) as one line on stderr."""
    try:
        yield
    except (StartupFailure, LoadGeneratorFailure, CheckFailure) as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    if config.database_url is not None:
        problem = postgres_problem(config.database_url)
        if problem is not None:
            print(f"error: PostgreSQL unreachable ({problem})", file=sys.stderr)
            return 1
    try:
        with reported_failures():
            return run(config)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
