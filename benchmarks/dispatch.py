"""Dispatch latency: how fast a new task reaches an idle worker, PostgreSQL next to SQLite.

For each backend and each worker count N, the script starts N `retouch.worker.Worker`s,
each in a process of its own as `retouch worker` runs them, with the fixture engine
(one step of no time, so the GPU stage is ~0) fetching a small PNG from a loopback
HTTP server. On PostgreSQL the workers wait for the store's LISTEN/NOTIFY wake-ups
with the settings of `retouch.worker_process.build_worker` (look at the table every
`NOTIFIED_IDLE_SECONDS`, wait in steps of the poll interval); on SQLite they poll
every `--poll-interval` seconds (0.2, the product default). Three figures per row:

- dispatch latency: from the commit that creates a task to the commit that claims it
  (status `processing`), tasks created one at a time with a random gap so that the
  workers are idle when each arrives; p50/p95/p99 in ms;
- claim throughput: M pending tasks created first, then the N workers started;
  tasks claimed and completed per second until the queue is empty;
- idle cost: what the idle workers cost per second while the queue stays empty,
  counted with SQLAlchemy event listeners in each worker: statements (SQL statements
  plus the pool's pre-ping `SELECT 1`), transactions begun (on SQLite a read runs in
  autocommit: one statement, no BEGIN on the wire) and database connections opened;
  and the CPU the worker processes used, in % of one CPU.

Before the PostgreSQL rows it checks that a LISTENing `Wakeups` hears an announced task,
and after each row it notes the warnings the workers logged (each distinct one is
shown once on stderr, with its traceback; repeats are only counted).

    python benchmarks/dispatch.py [--workers 1,4] [--tasks 200] [--queue 500]
                                  [--database-url URL] [--backends sqlite,postgresql]
                                  [--quick] [--json]

PostgreSQL runs in a fresh schema (dropped at the end), SQLite in a temporary file.
When PostgreSQL cannot be reached the script says so and measures SQLite only. The
exit status is non-zero when a task fails, a worker dies, a phase times out or the
ledger check finds a problem afterwards; missing the latency target is reported,
not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import multiprocessing
import os
import platform
import random
import secrets
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from queue import Empty
from typing import Any

from PIL import Image
from sqlalchemy import Engine, create_engine, event, make_url, text

from retouch.clock import SystemClock
from retouch.engine.fixture import FixtureEngine
from retouch.fetch import ImageFetcher
from retouch.keys import ApiKey
from retouch.models import ModelSpec
from retouch.storage import LocalResultStorage
from retouch.store import Store, create_db_engine, migrate
from retouch.store.notify import Wakeups, announce_task
from retouch.tasks import EditParams, Task, TaskError, TaskStatus, new_task_id
from retouch.worker import LoadedModel, Worker, WorkerConfig
from retouch.worker_process import NOTIFIED_IDLE_SECONDS

HOST = "127.0.0.1"
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MODEL = "qwen-image-edit"
SPEC = ModelSpec(name=MODEL, checkpoint="fixture", steps=1, negative_prompt=None, price=1.0)
SIGNING_KEY = b"dispatch-benchmark"
ACCOUNTS = 8  # tasks round-robin over several accounts, as a shared server sees them
INPUT_SIDE = 384  # the smallest side an input image may have
LATENCY_TARGET_MS = 100.0  # the spec's target for PostgreSQL's p50
STARTUP_TIMEOUT_SECONDS = 90.0
PHASE_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 30.0


class BenchmarkFailure(Exception):
    """Something went wrong that makes the figures meaningless."""


@dataclass(frozen=True)
class Config:
    backends: tuple[str, ...]
    database_url: str
    workers: tuple[int, ...]
    tasks: int
    queue: int
    gap_ms: tuple[float, float]
    idle_seconds: float
    settle_seconds: float
    poll_interval: float
    seed: int
    json: bool


@dataclass(frozen=True)
class Row:
    backend: str
    workers: int
    tasks: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    queue: int
    throughput_tasks_per_s: float
    idle_seconds: float
    idle_statements_per_s: float
    idle_transactions_per_s: float
    idle_connections_per_s: float
    idle_cpu_percent: float
    worker_warnings: int
    first_warning: str | None


# --------------------------------------------------------------------------- the worker side


class _TimedStore(Store):
    """The store, telling the benchmark the moment each claim and finish committed."""

    events: Any = None
    index: int = -1

    def claim_next(
        self, worker_id: str, lease_seconds: float, models: Sequence[str] | None = None
    ) -> Task | None:
        task = super().claim_next(worker_id, lease_seconds, models)
        if task is not None:
            self.events.put(("claimed", task.id, time.time(), self.index))
        return task

    def complete(
        self, task_id: str, worker_id: str, result_keys: Sequence[str], expires_at: datetime
    ) -> bool:
        done = super().complete(task_id, worker_id, result_keys, expires_at)
        self.events.put(("completed" if done else "lost", task_id, time.time(), self.index))
        return done

    def fail(self, task_id: str, worker_id: str, error: TaskError) -> bool:
        failed = super().fail(task_id, worker_id, error)
        self.events.put(("failed", task_id, time.time(), error.message))
        return failed


COUNTERS = 3  # per worker: statements, transactions, connections opened


def _count_statements(engine: Engine, counters: Any, index: int) -> None:
    """Count what this worker sends: statements (and pre-pings), transactions begun and
    database connections opened."""
    base = COUNTERS * index

    def bump(slot: int) -> None:
        with counters.get_lock():
            counters[base + slot] += 1

    event.listen(engine, "before_cursor_execute", lambda *_args, **_kw: bump(0))
    event.listen(engine, "begin", lambda *_args: bump(1))
    event.listen(engine, "connect", lambda *_args: bump(2))
    ping = engine.dialect.do_ping

    def counted_ping(dbapi_connection: Any) -> bool:
        bump(0)
        return ping(dbapi_connection)

    engine.dialect.do_ping = counted_ping  # type: ignore[method-assign]


class _LogOnce(logging.Filter):
    """Each distinct warning is shown once (with its traceback); repeats are counted."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._counts: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        with self._lock:
            self._counts[message] += 1
            if message in self._seen:
                return False
            self._seen.add(message)
            return True

    def take_counts(self) -> dict[str, int]:
        """The counts since the last call."""
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts


def quiet_logging(prefix: str) -> _LogOnce:
    """Warnings and errors to stderr, each distinct one once."""
    once = _LogOnce()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(once)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    return once


def _child_main(
    index: int, url: str, poll_interval: float, results_dir: str, control: Pipe, events: Any,
    counters: Any,
) -> None:  # fmt: skip
    """One worker process: built once, then started and stopped on the parent's word."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    logged = quiet_logging(f"[worker {index}] ")
    clock = SystemClock()
    store = _TimedStore.from_url(url, clock)
    store.events, store.index = events, index
    _count_statements(store.engine, counters, index)
    storage = LocalResultStorage(Path(results_dir) / f"worker-{index}", SIGNING_KEY, clock)
    fetcher = ImageFetcher(allow_private_networks=True, allowed_ports=None, timeout_seconds=10)
    models = {MODEL: LoadedModel(SPEC, FixtureEngine(step_seconds=0, steps=1))}
    wakeups = Wakeups.for_engine(store.engine)
    # Exactly what build_worker gives a worker process.
    config = WorkerConfig(
        poll_interval_seconds=poll_interval,
        idle_wait_seconds=NOTIFIED_IDLE_SECONDS if wakeups else poll_interval,
    )
    worker: Worker | None = None
    thread: threading.Thread | None = None
    control.send(("ready", os.getpid()))
    try:
        while True:
            try:
                command = control.recv()
            except EOFError:
                break  # the parent is gone
            if command == "start":
                logged.take_counts()
                if wakeups is not None:
                    wakeups.wait(0)  # LISTEN before the first task can be announced
                worker = Worker(
                    store, storage, models, fetcher, config,
                    worker_id=f"bench-{index}-{secrets.token_hex(3)}", clock=clock,
                    wakeups=wakeups,
                )  # fmt: skip
                thread = threading.Thread(target=worker.run, name="worker", daemon=True)
                thread.start()
                control.send(("started", None))
            elif command == "cpu":
                control.send(("cpu", time.process_time()))
            elif command == "stop":
                if worker is not None and thread is not None:
                    worker.stopping.set()
                    thread.join(STOP_TIMEOUT_SECONDS)
                alive = thread is not None and thread.is_alive()
                control.send(("stopped", (alive, logged.take_counts())))
                worker = thread = None
            elif command == "exit":
                break
    finally:
        if worker is not None:
            worker.stopping.set()
        if wakeups is not None:
            wakeups.close()
        fetcher.close()
        store.close()


# --------------------------------------------------------------------------- the parent side


class WorkerPool:
    """Worker processes for one database, and what they report."""

    def __init__(self, url: str, count: int, poll_interval: float, results_dir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.events: Any = context.Queue()
        self.counters: Any = context.Array("q", COUNTERS * count)
        self.claimed: dict[str, tuple[float, int]] = {}
        self.completed: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self._changed = threading.Condition()
        self._collecting = True
        self._collector = threading.Thread(target=self._collect, name="collector", daemon=True)
        self._collector.start()
        self.processes: list[tuple[multiprocessing.process.BaseProcess, Pipe]] = []
        for index in range(count):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_child_main,
                args=(index, url, poll_interval, str(results_dir), child_end, self.events,
                      self.counters),
                name=f"dispatch-worker-{index}",
                daemon=True,
            )  # fmt: skip
            process.start()
            child_end.close()
            self.processes.append((process, parent_end))
        try:
            for index in range(count):
                self._expect(index, "ready", STARTUP_TIMEOUT_SECONDS)
        except BaseException:
            self.close()
            raise

    def _collect(self) -> None:
        while self._collecting:
            try:
                kind, task_id, at, detail = self.events.get(timeout=0.1)
            except Empty:
                continue
            with self._changed:
                if kind == "claimed":
                    self.claimed.setdefault(task_id, (at, detail))
                elif kind == "completed":
                    self.completed[task_id] = at
                else:
                    self.failed[task_id] = f"{kind}: {detail}"
                self._changed.notify_all()

    def _expect(self, index: int, answer: str, timeout: float) -> Any:
        process, pipe = self.processes[index]
        deadline = time.monotonic() + timeout
        while not pipe.poll(0.1):
            if not process.is_alive():
                raise BenchmarkFailure(f"worker process {index} exited ({process.exitcode})")
            if time.monotonic() > deadline:
                raise BenchmarkFailure(f"worker process {index}: no {answer!r} in {timeout} s")
        kind, detail = pipe.recv()
        if kind != answer:
            raise BenchmarkFailure(f"worker process {index} answered {kind!r}, not {answer!r}")
        return detail

    def start(self, count: int) -> None:
        for _process, pipe in self.processes[:count]:
            pipe.send("start")
        for index in range(count):
            self._expect(index, "started", STOP_TIMEOUT_SECONDS)

    def stop(self, count: int) -> Counter[str]:
        """Stop the first `count` workers; the warnings they logged since they started."""
        for _process, pipe in self.processes[:count]:
            pipe.send("stop")
        warnings: Counter[str] = Counter()
        for index in range(count):
            alive, logged = self._expect(index, "stopped", STOP_TIMEOUT_SECONDS + 5)
            if alive:
                raise BenchmarkFailure(f"worker {index} did not stop in {STOP_TIMEOUT_SECONDS} s")
            warnings.update(logged)
        return warnings

    def counts(self) -> tuple[int, int, int]:
        """Statements, transactions and connections so far, all workers together."""
        with self.counters.get_lock():
            values = list(self.counters)
        return (
            sum(values[0::COUNTERS]),
            sum(values[1::COUNTERS]),
            sum(values[2::COUNTERS]),
        )

    def cpu_seconds(self, count: int) -> float:
        """CPU time the first `count` worker processes have used so far."""
        for _process, pipe in self.processes[:count]:
            pipe.send("cpu")
        return sum(
            float(self._expect(index, "cpu", STOP_TIMEOUT_SECONDS)) for index in range(count)
        )

    def wait_until_done(self, task_ids: Sequence[str], timeout: float) -> None:
        """Until every task completed; fails on a failed task or a dead worker."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                failed = [f"{t}: {self.failed[t]}" for t in task_ids if t in self.failed]
                if failed:
                    raise BenchmarkFailure(f"{len(failed)} task(s) failed: {failed[:3]}")
                missing = [t for t in task_ids if t not in self.completed]
                if not missing:
                    return
                dead = [p.name for p, _pipe in self.processes if not p.is_alive()]
                if dead:
                    raise BenchmarkFailure(f"worker process(es) died: {', '.join(dead)}")
                if time.monotonic() > deadline:
                    raise BenchmarkFailure(
                        f"{len(missing)} of {len(task_ids)} task(s) not completed "
                        f"after {timeout:.0f} s"
                    )
                self._changed.wait(0.2)

    def close(self) -> None:
        for process, pipe in self.processes:
            if process.is_alive():
                try:
                    pipe.send("exit")
                except OSError:
                    pass
        for process, pipe in self.processes:
            process.join(STOP_TIMEOUT_SECONDS)
            if process.is_alive():
                process.kill()
                process.join(5)
            pipe.close()
        self._collecting = False
        self._collector.join(5)
        self.events.close()
        self.events.join_thread()


class ImageServer:
    """One PNG on a loopback port (by default a small one): the input every task fetches."""

    def __init__(self, body: bytes | None = None) -> None:
        if body is None:
            buffer = io.BytesIO()
            Image.new("RGB", (INPUT_SIDE, INPUT_SIDE), (200, 80, 40)).save(buffer, format="PNG")
            body = buffer.getvalue()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{HOST}:{self._server.server_address[1]}/input.png"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Creator:
    """Creates tasks in the benchmark's own process, as the API would."""

    def __init__(self, store: Store, image_url: str) -> None:
        self.store = store
        self.image_url = image_url
        self.keys: list[ApiKey] = [
            store.create_key(f"dispatch-{index}", credits=1e9)[0] for index in range(ACCOUNTS)
        ]
        self._next = 0

    def create(self) -> str:
        key = self.keys[self._next % len(self.keys)]
        self._next += 1
        params = EditParams(prompt="invert it", image_urls=[self.image_url], seed=7)
        return create_task(self.store, key, params, SPEC.price)


def create_task(store: Store, key: ApiKey, params: EditParams, credits: float) -> str:
    """A pending task of `key` for the benchmark's model, created as the API would."""
    now = store.clock.now()
    task = Task(
        id=new_task_id(int(now.timestamp())),
        key_id=key.id,
        account_id=key.account_id,
        model=MODEL,
        status=TaskStatus.PENDING,
        progress=0,
        params=params,
        created_at=now,
        user_group=key.user_group,
        credits_reserved=credits,
    )
    return store.create_task(task)[0].id


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the nearest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(
    backend: str, workers: int, pool: WorkerPool, creator: Creator, config: Config,
    rng: random.Random,
) -> Row:  # fmt: skip
    """One row: throughput from a full queue, then idle cost, then dispatch latency."""
    # Claim throughput: the queue is filled before the workers start.
    backlog = [creator.create() for _ in range(config.queue)]
    started = time.time()
    pool.start(workers)
    try:
        pool.wait_until_done(backlog, PHASE_TIMEOUT_SECONDS + config.queue * 0.5)
        finished = max(pool.completed[task_id] for task_id in backlog)
        throughput = config.queue / max(finished - started, 1e-9)

        # Idle cost: the queue stays empty; wake-ups left over from the burst settle first.
        time.sleep(config.settle_seconds)
        before, cpu_before = pool.counts(), pool.cpu_seconds(workers)
        idle_from = time.monotonic()
        time.sleep(config.idle_seconds)
        idle_for = time.monotonic() - idle_from
        after, cpu_after = pool.counts(), pool.cpu_seconds(workers)

        # Dispatch latency: one task at a time, the workers idle when it arrives.
        committed: dict[str, float] = {}
        for _ in range(config.tasks):
            time.sleep(rng.uniform(*config.gap_ms) / 1000)
            task_id = creator.create()
            committed[task_id] = time.time()
        pool.wait_until_done(list(committed), PHASE_TIMEOUT_SECONDS)
    except BaseException:
        with contextlib.suppress(BenchmarkFailure):
            pool.stop(workers)
        raise
    warnings = pool.stop(workers)
    latencies = [(pool.claimed[task_id][0] - at) * 1000 for task_id, at in committed.items()]
    idle = [(end - start) / idle_for for start, end in zip(before, after, strict=True)]
    return Row(
        backend=backend,
        workers=workers,
        tasks=config.tasks,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        mean_ms=sum(latencies) / len(latencies),
        max_ms=max(latencies),
        queue=config.queue,
        throughput_tasks_per_s=throughput,
        idle_seconds=idle_for,
        idle_statements_per_s=idle[0],
        idle_transactions_per_s=idle[1],
        idle_connections_per_s=idle[2],
        idle_cpu_percent=100 * (cpu_after - cpu_before) / idle_for,
        worker_warnings=sum(warnings.values()),
        first_warning=warnings.most_common(1)[0][0] if warnings else None,
    )


def wakeup_problem(store: Store) -> str | None:
    """Whether a LISTENing connection hears a task announcement, as idle workers must."""
    wakeups = Wakeups.for_engine(store.engine)
    if wakeups is None:
        return None
    try:
        wakeups.wait(0)  # listening from here on
        started = time.monotonic()
        with store.engine.begin() as conn:
            announce_task(conn)
        if wakeups.wait(2.0):
            return None
        return (
            f"an announced task did not wake a listener in "
            f"{time.monotonic() - started:.1f} s (Wakeups.wait returned False): idle "
            f"workers will only find tasks on their {NOTIFIED_IDLE_SECONDS:g} s look"
        )
    finally:
        wakeups.close()


def check_store(store: Store) -> None:
    """Every task completed once and the ledger balances, or the figures are void."""
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) FROM tasks GROUP BY status")).all()
    counts: dict[str, int] = {str(status): int(count) for status, count in rows}
    if set(counts) - {TaskStatus.COMPLETED.value}:
        raise BenchmarkFailure(f"tasks left in other states than completed: {counts}")
    problems = store.check_ledger()
    if problems:
        raise BenchmarkFailure("ledger check failed: " + "; ".join(problems[:3]))


def run_backend(
    backend: str, url: str, config: Config, image_url: str, work: Path, notes: list[str]
) -> list[Row]:
    store = Store(create_db_engine(url))
    rows: list[Row] = []
    try:
        migrate(store.engine)
        problem = wakeup_problem(store)
        if problem is not None:
            notes.append(f"{backend}: {problem}")
        creator = Creator(store, image_url)
        pool = WorkerPool(url, max(config.workers), config.poll_interval, work / backend)
        try:
            rng = random.Random(config.seed)
            for workers in config.workers:
                row = measure(backend, workers, pool, creator, config, rng)
                rows.append(row)
                if not config.json:
                    print(format_row(row), flush=True)
                if row.worker_warnings:
                    notes.append(
                        f"{backend}, {workers} worker(s): the workers logged "
                        f"{row.worker_warnings} warning(s), most often {row.first_warning!r}"
                    )
        finally:
            pool.close()
        check_store(store)
    finally:
        store.close()
    return rows


# --------------------------------------------------------------------------- databases


def postgres_problem(url: str) -> str | None:
    """Why PostgreSQL at `url` cannot be used, or None."""
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 5})
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]
    finally:
        engine.dispose()
    return None


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A fresh schema of its own, dropped afterwards; the URL points `search_path` at it."""
    schema = f"bench_{secrets.token_hex(6)}"
    admin = create_engine(base_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        separator = "&" if "?" in base_url else "?"
        try:
            yield f"{base_url}{separator}options=-csearch_path%3D{schema}"
        finally:
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        admin.dispose()


def postgres_version(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar_one()).split()[0]
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- output

COLUMNS = (
    f"{'backend':<11} {'workers':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
    f"{'tasks/s':>8} {'idle stmts/s':>12} {'idle tx/s':>9} {'idle conns/s':>12} "
    f"{'idle CPU %':>10}"
)


def format_row(row: Row) -> str:
    return (
        f"{row.backend:<11} {row.workers:>7} {row.p50_ms:>8.1f} {row.p95_ms:>8.1f} "
        f"{row.p99_ms:>8.1f} {row.throughput_tasks_per_s:>8.1f} "
        f"{row.idle_statements_per_s:>12.2f} {row.idle_transactions_per_s:>9.2f} "
        f"{row.idle_connections_per_s:>12.2f} {row.idle_cpu_percent:>10.1f}"
    )


def ratios(rows: list[Row]) -> dict[int, float]:
    """PostgreSQL p50 / SQLite p50, per worker count measured on both."""
    by = {(row.backend, row.workers): row for row in rows}
    return {
        workers: by["postgresql", workers].p50_ms / by["sqlite", workers].p50_ms
        for backend, workers in by
        if backend == "sqlite" and ("postgresql", workers) in by
    }


def environment(config: Config, pg_version: str | None) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version,
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()}, {platform.system()}",
        "workers_are": "processes",
        "tasks": config.tasks,
        "queue": config.queue,
        "gap_ms": list(config.gap_ms),
        "idle_seconds": config.idle_seconds,
        "sqlite_poll_interval_s": config.poll_interval,
        "postgresql_idle_wait_s": NOTIFIED_IDLE_SECONDS,
    }


def print_header(env: dict[str, Any]) -> None:
    print(
        f"{env['date']}, {env['cpus']} CPUs ({env['machine']}), Python {env['python']}, "
        f"SQLite {env['sqlite']}, PostgreSQL {env['postgresql'] or 'not measured'}"
    )
    print(
        f"each worker a process; {env['tasks']} tasks {env['gap_ms'][0]:g}-"
        f"{env['gap_ms'][1]:g} ms apart for latency (creation commit -> claim commit), "
        f"{env['queue']} queued for throughput, {env['idle_seconds']:g} s idle; SQLite "
        f"polls every {env['sqlite_poll_interval_s']:g} s, PostgreSQL waits for NOTIFY "
        f"(table look every {env['postgresql_idle_wait_s']:g} s)"
    )
    print()
    print(COLUMNS)


def print_summary(rows: list[Row], notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}")
    found = ratios(rows)
    if found:
        parts = ", ".join(
            f"{ratio:.3f}x with {workers} worker{'s' if workers > 1 else ''}"
            for workers, ratio in sorted(found.items())
        )
        print(f"PostgreSQL / SQLite dispatch p50: {parts}")
    else:
        print("PostgreSQL / SQLite dispatch p50: n/a (both backends were not measured)")
    for row in rows:
        if row.backend == "postgresql":
            verdict = "met" if row.p50_ms < LATENCY_TARGET_MS else "NOT met"
            print(
                f"target PostgreSQL p50 < {LATENCY_TARGET_MS:g} ms with {row.workers} "
                f"worker(s): {verdict} ({row.p50_ms:.1f} ms)"
            )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("RETOUCH_TEST_DATABASE_URL") or DEFAULT_DATABASE_URL,
        help="PostgreSQL to measure, in a schema of its own "
        "(default: $RETOUCH_TEST_DATABASE_URL, else %(default)s)",
    )
    parser.add_argument("--workers", default="1,4", help="worker counts, comma-separated")
    parser.add_argument("--tasks", type=int, default=200, help="tasks timed for latency")
    parser.add_argument("--queue", type=int, default=500, help="tasks queued for throughput")
    parser.add_argument("--gap-ms", default="50,150", help="random gap between creations")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--poll-interval", type=float, default=0.2, help="SQLite's polls")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a short run (tests)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = parser.parse_args(argv)
    backends = tuple(name.strip() for name in args.backends.split(",") if name.strip())
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown or not backends:
        parser.error(f"--backends: sqlite and/or postgresql, not {args.backends!r}")
    gap = tuple(float(part) for part in args.gap_ms.split(","))
    if len(gap) != 2 or not 0 <= gap[0] <= gap[1]:
        parser.error("--gap-ms: LOW,HIGH in milliseconds")
    workers = tuple(int(part) for part in args.workers.split(","))
    if not workers or min(workers) < 1:
        parser.error("--workers: positive counts, comma-separated")
    if args.quick:
        workers, tasks, queue, idle, settle = (1, 2), 20, 50, 1.0, 0.3
    else:
        tasks, queue, idle, settle = args.tasks, args.queue, args.idle_seconds, 1.0
    if tasks < 1 or queue < 1 or idle <= 0:
        parser.error("--tasks, --queue and --idle-seconds must be positive")
    return Config(
        backends=backends,
        database_url=args.database_url,
        workers=workers,
        tasks=tasks,
        queue=queue,
        gap_ms=(gap[0], gap[1]),
        idle_seconds=idle,
        settle_seconds=settle,
        poll_interval=args.poll_interval,
        seed=args.seed,
        json=args.json,
    )


def run(config: Config) -> int:
    quiet_logging("")
    backends = list(config.backends)
    pg_version = None
    if "postgresql" in backends:
        shown = make_url(config.database_url).render_as_string(hide_password=True)
        problem = postgres_problem(config.database_url)
        if problem is not None:
            backends.remove("postgresql")
            if config.json:
                print(json.dumps({"skipped": "postgresql", "url": shown, "reason": problem}))
            else:
                print(f"PostgreSQL unreachable at {shown} ({problem}): measuring SQLite only")
        else:
            pg_version = postgres_version(config.database_url)
    if not backends:
        return 0
    env = environment(config, pg_version)
    if config.json:
        print(json.dumps({"environment": env}))
    else:
        print_header(env)
    rows: list[Row] = []
    notes: list[str] = []
    image_server = ImageServer()
    try:
        with tempfile.TemporaryDirectory(prefix="retouch-dispatch-") as work:
            for backend in backends:
                if backend == "sqlite":
                    url = f"sqlite:///{Path(work) / 'dispatch.db'}"
                    rows += run_backend(backend, url, config, image_server.url, Path(work), notes)
                    continue
                with postgres_schema(config.database_url) as url:
                    rows += run_backend(backend, url, config, image_server.url, Path(work), notes)
    finally:
        image_server.close()
    if config.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        for note in notes:
            print(json.dumps({"note": note}))
        print(json.dumps({"pg_sqlite_p50_ratio": {str(k): v for k, v in ratios(rows).items()}}))
    else:
        print()
        print_summary(rows, notes)
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        return run(config)
    except BenchmarkFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
