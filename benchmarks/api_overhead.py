"""API overhead: Retouch's create-task and get-task endpoints next to a bare FastAPI baseline.

Starts a real `retouch serve` (fixture model, no worker, so tasks stay pending) and a
bare FastAPI app served by uvicorn with the same settings (one process, default access
log), each in its own process. Both are driven by the same load generator in the same
run; the script prints requests/s, p50/p99 latency and the retouch/baseline ratios.

    python benchmarks/api_overhead.py [--duration SECONDS] [--concurrency N] [--quick]

The load generator is `wrk` when it is on PATH (one thread, N connections, durations
rounded to whole seconds), otherwise a lean asyncio client in this process: raw
HTTP/1.1 keep-alive, N connections, one request in flight on each. The exit status is
non-zero when a server fails to start or any request gets a non-2xx answer (or a
socket error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, Field

HOST = "127.0.0.1"
DEFAULT_SECONDS = 5.0
DEFAULT_CONCURRENCY = 16
DEFAULT_WARMUP_SECONDS = 1.0
QUICK_SECONDS = 1.0
QUICK_CONCURRENCY = 4
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
LOG_TAIL_LINES = 20
ACCESS_LINE = re.compile(r'" (\d{3})\b')
JSON_TYPE = {"Content-Type": "application/json"}
CREATE_BODY: dict[str, Any] = {
    "model": "qwen-image-edit",
    "prompt": "replace the background",
    "image_urls": ["https://example.com/cat.png"],
}

T = TypeVar("T")


class StartupFailure(Exception):
    """A server (or the key or task set up before the run) could not be brought up."""


class LoadGeneratorFailure(Exception):
    """The load generator itself failed (not the server under test)."""


# --------------------------------------------------------------------------- baseline app


class BaselineItem(BaseModel):
    model: str = Field(min_length=1, max_length=64)
    prompt: str = Field(min_length=1, max_length=4000)
    image_urls: list[str] = Field(min_length=1, max_length=3)


class BaselineDatabase:
    """One SQLite connection per server thread, in WAL mode with synchronous=NORMAL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
        return connection

    def create_schema(self) -> None:
        connection = self.connection()
        connection.execute(
            "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, model TEXT NOT NULL, "
            "prompt TEXT NOT NULL, image_urls TEXT NOT NULL, created_at REAL NOT NULL)"
        )
        connection.commit()

    def insert(self, item: BaselineItem) -> int:
        connection = self.connection()
        cursor = connection.execute(
            "INSERT INTO items (model, prompt, image_urls, created_at) VALUES (?, ?, ?, ?)",
            (item.model, item.prompt, json.dumps(item.image_urls), time.time()),
        )
        connection.commit()
        return cursor.lastrowid or 0


def build_baseline_app(database: BaselineDatabase) -> FastAPI:
    """`GET /ping`: the framework's floor; `POST /create`: the minimal create."""
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/create")
    def create(item: BaselineItem) -> dict[str, int | str]:
        return {"id": database.insert(item), "status": "pending"}

    return app


def serve_baseline(port: int, database_path: Path) -> None:
    """Serve the baseline the way `retouch serve` runs uvicorn."""
    import uvicorn

    database = BaselineDatabase(database_path)
    database.create_schema()
    uvicorn.run(build_baseline_app(database), host=HOST, port=port, log_level="info")


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_environment() -> dict[str, str]:
    """This environment without `RETOUCH_*` settings, so the run is the defaults."""
    return {name: value for name, value in os.environ.items() if not name.startswith("RETOUCH_")}


def log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


def log_problems(path: Path) -> str:
    """Non-2xx answers counted from a server's access log, then its other last lines."""
    lines = path.read_text(errors="replace").splitlines()
    statuses = Counter(match[1] for line in lines if (match := ACCESS_LINE.search(line)))
    counts = ", ".join(f"HTTP {status} x{n}" for status, n in statuses.items() if status[0] != "2")
    others = [line for line in lines if not ACCESS_LINE.search(line)]
    return "\n".join([f"non-2xx answers: {counts or 'none'}", *others[-LOG_TAIL_LINES:]])


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_healthy(
    server: Server, health_path: str, timeout: float = STARTUP_TIMEOUT_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise StartupFailure(
                f"the {server.name} server exited with code {code}:\n{log_tail(server.log_path)}"
            )
        try:
            if httpx.get(server.base_url + health_path, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise StartupFailure(
        f"the {server.name} server did not answer {health_path} within "
        f"{timeout:.0f} s:\n{log_tail(server.log_path)}"
    )


@contextmanager
def running(
    name: str, command: list[str], port: int, health_path: str, workdir: Path
) -> Iterator[Server]:
    """Start a server, wait for its health check, and always stop it afterwards."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=child_environment()
        )
        try:
            server = Server(name, port, process, log_path)
            wait_until_healthy(server, health_path)
            yield server
        finally:
            stop_process(process)


def baseline_command(port: int, database_path: Path) -> list[str]:
    script = str(Path(__file__).resolve())
    return [
        sys.executable,
        script,
        "--serve-baseline",
        "--port",
        str(port),
        "--db",
        str(database_path),
    ]


def retouch_command(port: int, data_dir: Path) -> list[str]:
    serve = [sys.executable, "-m", "retouch", "serve", "--model", "fixture", "--no-worker"]
    # Limits out of the way: the run measures the cost of admission, not its refusals.
    unlimited = [
        "--requests-per-minute", "100000000", "--max-concurrent-tasks", "100000000",
        "--max-queued-tasks", "100000000",
    ]  # fmt: skip
    return [*serve, *unlimited, "--data-dir", str(data_dir), "--port", str(port)]


def retouch_cli(*args: str, timeout: float = STARTUP_TIMEOUT_SECONDS) -> str:
    """Run `python -m retouch ARGS`; its stdout, or a StartupFailure."""
    completed = subprocess.run(
        [sys.executable, "-m", "retouch", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=child_environment(),
    )
    if completed.returncode != 0:
        raise StartupFailure(f"`retouch {' '.join(args[:2])}` failed:\n{completed.stderr.strip()}")
    return completed.stdout


def create_api_key(data_dir: Path) -> str:
    created = retouch_cli(
        "keys", "create", "--name", "bench", "--credits", "1000000000", "--data-dir", str(data_dir)
    )
    if not created.split():
        raise StartupFailure("`retouch keys create` printed no key")
    return created.split()[0]


def create_task(server: Server, key: str) -> str:
    response = httpx.post(
        server.base_url + "/v1/images/generations",
        json=CREATE_BODY,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10.0,
    )
    if response.status_code != 200:
        raise StartupFailure(
            f"creating the task to poll answered {response.status_code}: {response.text}\n"
            f"{log_tail(server.log_path)}"
        )
    return str(response.json()["id"])


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    port: int
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.path}"

    def raw_request(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if self.body or self.method == "POST":
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def baseline_scenarios(port: int) -> tuple[Scenario, Scenario]:
    """The framework's floor (`GET /ping`) and the minimal create (`POST /create`)."""
    body = json.dumps(CREATE_BODY).encode()
    return (
        Scenario("baseline GET /ping", port, "GET", "/ping"),
        Scenario("baseline POST /create", port, "POST", "/create", JSON_TYPE, body),
    )


def build_scenarios(
    baseline_port: int, retouch_port: int, key: str, task_id: str
) -> list[Scenario]:
    auth = {"Authorization": f"Bearer {key}"}
    body = json.dumps(CREATE_BODY).encode()
    baseline_get, baseline_create = baseline_scenarios(baseline_port)
    return [
        baseline_get,
        Scenario("retouch GET /v1/tasks/{id}", retouch_port, "GET", f"/v1/tasks/{task_id}", auth),
        baseline_create,
        Scenario(
            "retouch POST /v1/images/generations",
            retouch_port,
            "POST",
            "/v1/images/generations",
            {**JSON_TYPE, **auth},
            body,
        ),
    ]


@dataclass(frozen=True)
class Result:
    scenario: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_kinds: str = ""

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- asyncio load


class ProtocolError(ValueError):
    """A response this client does not read (no Content-Length)."""


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return its status and whether the connection stays open."""
    status, keep_alive, _body = await read_response_body(reader)
    return status, keep_alive


async def read_response_body(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """Read one response; return its status, whether the connection stays open and
    its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head[:-4].split(b"\r\n")
    length: int | None = None
    keep_alive = True
    for line in header_lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
    if length is None:
        raise ProtocolError("response without Content-Length")
    body = await reader.readexactly(length)
    return int(status_line.split(b" ", 2)[1]), keep_alive, body


class Client:
    """One keep-alive connection with one request in flight; reconnects after errors."""

    def __init__(self, scenario: Scenario, tally: Tally) -> None:
        self.port = scenario.port
        self.request = scenario.raw_request()
        self.tally = tally
        self.connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def run_until(self, deadline: float) -> None:
        try:
            while time.perf_counter() < deadline:
                await self.send_one()
        finally:
            self.close()

    async def send_one(self) -> None:
        try:
            reader, writer = await self.connect()
            start = time.perf_counter()
            writer.write(self.request)
            status, keep_alive = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.tally.errors[type(exc).__name__] += 1
            self.close()
            await asyncio.sleep(0.01)
            return
        self.tally.latencies.append(time.perf_counter() - start)
        if not 200 <= status < 300:
            self.tally.errors[f"HTTP {status}"] += 1
        if not keep_alive:
            self.close()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.connection is None:
            self.connection = await asyncio.open_connection(HOST, self.port)
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection[1].close()
            self.connection = None


@contextmanager
def cancelled_on_sigterm() -> Iterator[None]:
    """While the event loop runs, SIGTERM cancels the current task instead of raising
    inside a transport callback."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    previous = signal.getsignal(signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


async def drive(scenario: Scenario, seconds: float, concurrency: int) -> tuple[Tally, float]:
    tally = Tally()
    clients = [Client(scenario, tally) for _ in range(concurrency)]
    start = time.perf_counter()
    with cancelled_on_sigterm():
        await asyncio.gather(*(client.run_until(start + seconds) for client in clients))
    return tally, time.perf_counter() - start


def run_event_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def percentile_ms(sorted_seconds: list[float], fraction: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_seconds:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_seconds)))
    return sorted_seconds[rank - 1] * 1000


def measure_with_asyncio(scenario: Scenario, seconds: float, concurrency: int) -> Result:
    try:
        tally, elapsed = run_event_loop(drive(scenario, seconds, concurrency))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    latencies = sorted(tally.latencies)
    kinds = ", ".join(f"{kind} x{count}" for kind, count in tally.errors.most_common())
    return Result(
        scenario=scenario.name,
        requests=len(latencies),
        seconds=elapsed,
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        errors=sum(tally.errors.values()),
        error_kinds=kinds,
    )


# --------------------------------------------------------------------------- wrk load

WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %f %f %f %f %f %f %f %f %f\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"""
WRK_ERROR_KINDS = ("HTTP 4xx/5xx", "connect", "read", "write", "timeout")
WRK_TIMEOUT = "30s"


def wrk_script(scenario: Scenario) -> str:
    lines = [f'wrk.method = "{scenario.method}"']
    if scenario.body:
        lines.append(f"wrk.body = [==[{scenario.body.decode()}]==]")
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in scenario.headers.items()]
    return "\n".join(lines) + "\n" + WRK_REPORT


def measure_with_wrk(
    wrk: str, scenario: Scenario, seconds: float, concurrency: int, workdir: Path
) -> Result:
    script = workdir / "scenario.lua"
    script.write_text(wrk_script(scenario))
    whole_seconds = max(1, round(seconds))
    command = [wrk, "-t1", f"-c{concurrency}", f"-d{whole_seconds}s", "--timeout", WRK_TIMEOUT]
    completed = subprocess.run(
        [*command, "-s", str(script), scenario.url],
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 60,
    )
    report = [line for line in completed.stdout.splitlines() if line.startswith("BENCH ")]
    if completed.returncode != 0 or not report:
        raise LoadGeneratorFailure(f"wrk failed:\n{completed.stdout}\n{completed.stderr}")
    requests, duration_us, p50_us, p99_us, *errors = (float(v) for v in report[-1].split()[1:])
    kinds = zip(WRK_ERROR_KINDS, errors, strict=True)
    return Result(
        scenario=scenario.name,
        requests=int(requests),
        seconds=duration_us / 1e6,
        p50_ms=p50_us / 1000,
        p99_ms=p99_us / 1000,
        errors=int(sum(errors)),
        error_kinds=", ".join(f"{kind} x{count:.0f}" for kind, count in kinds if count),
    )


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Config:
    seconds: float
    concurrency: int
    warmup_seconds: float
    wrk: str | None

    @property
    def generator(self) -> str:
        if self.wrk:
            return f"wrk -t1 -c{self.concurrency} ({self.wrk})"
        return f"python asyncio raw HTTP/1.1 keep-alive, {self.concurrency} connections"


def measure(scenario: Scenario, config: Config, workdir: Path) -> Result:
    if config.wrk:
        if config.warmup_seconds > 0:
            measure_with_wrk(
                config.wrk, scenario, config.warmup_seconds, config.concurrency, workdir
            )
        return measure_with_wrk(config.wrk, scenario, config.seconds, config.concurrency, workdir)
    if config.warmup_seconds > 0:
        measure_with_asyncio(scenario, config.warmup_seconds, config.concurrency)
    return measure_with_asyncio(scenario, config.seconds, config.concurrency)


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def print_header(config: Config) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"date:        {now}")
    print(f"machine:     {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"python:      {platform.python_version()} ({platform.python_implementation()})")
    versions = ", ".join(f"{name} {package_version(name)}" for name in ("fastapi", "uvicorn"))
    print(f"servers:     {versions}; one uvicorn process each, access log on")
    print(f"load:        {config.generator}")
    print(f"per run:     {config.seconds:g} s measured after {config.warmup_seconds:g} s warm-up")
    print()
    print(f"{'scenario':<38} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")


def print_row(result: Result) -> None:
    print(
        f"{result.scenario:<38} {result.requests_per_second:>9,.0f} {result.p50_ms:>8.2f} "
        f"{result.p99_ms:>8.2f} {result.errors:>7}",
        flush=True,
    )


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def print_ratio(label: str, retouch: Result, baseline: Result) -> None:
    throughput = ratio(retouch.requests_per_second, baseline.requests_per_second)
    p50 = ratio(retouch.p50_ms, baseline.p50_ms)
    p99 = ratio(retouch.p99_ms, baseline.p99_ms)
    print(f"  {label:<7} req/s {throughput:5.2f}x   p50 {p50:5.2f}x   p99 {p99:5.2f}x")


def print_ratios(results: list[Result]) -> None:
    baseline_get, retouch_get, baseline_create, retouch_create = results
    print()
    print("retouch / baseline:")
    print_ratio("GET", retouch_get, baseline_get)
    print_ratio("create", retouch_create, baseline_create)


def report_errors(results: list[Result], servers: list[Server]) -> bool:
    """Print the failed scenarios and what their server logs say; True if any failed."""
    failed = [result for result in results if result.errors]
    if not failed:
        return False
    sys.stdout.flush()
    for result in failed:
        print(
            f"error: {result.scenario}: {result.errors} failed ({result.error_kinds})",
            file=sys.stderr,
        )
    for server in servers:
        if any(result.scenario.startswith(server.name) for result in failed):
            print(f"--- {server.name} log:\n{log_problems(server.log_path)}", file=sys.stderr)
    return True


def start_servers(stack: ExitStack, workdir: Path) -> tuple[Server, Server, str]:
    """Start the baseline and Retouch (with a fresh API key); both stop with the stack."""
    baseline_port, retouch_port = free_port(), free_port()
    command = baseline_command(baseline_port, workdir / "baseline.db")
    baseline = stack.enter_context(running("baseline", command, baseline_port, "/ping", workdir))
    data_dir = workdir / "retouch-data"
    key = create_api_key(data_dir)
    command = retouch_command(retouch_port, data_dir)
    retouch = stack.enter_context(running("retouch", command, retouch_port, "/healthz", workdir))
    return baseline, retouch, key


def run_benchmark(config: Config) -> int:
    with tempfile.TemporaryDirectory(prefix="retouch-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        baseline, retouch, key = start_servers(stack, workdir)
        scenarios = build_scenarios(baseline.port, retouch.port, key, create_task(retouch, key))
        print_header(config)
        results: list[Result] = []
        for scenario in scenarios:
            results.append(measure(scenario, config, workdir))
            print_row(results[-1])
        print_ratios(results)
        failed = report_errors(results, [baseline, retouch])
    return 1 if failed else 0


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, help=f"seconds per scenario [{DEFAULT_SECONDS:g}]"
    )
    parser.add_argument("--concurrency", type=int, help=f"connections [{DEFAULT_CONCURRENCY}]")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_SECONDS:g} s per scenario, {QUICK_CONCURRENCY} connections, "
        "no warm-up",
    )
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def config_from(args: argparse.Namespace) -> Config:
    seconds = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    concurrency = QUICK_CONCURRENCY if args.quick else DEFAULT_CONCURRENCY
    return Config(
        seconds=args.duration if args.duration is not None else seconds,
        concurrency=args.concurrency if args.concurrency is not None else concurrency,
        warmup_seconds=0.0 if args.quick else DEFAULT_WARMUP_SECONDS,
        wrk=shutil.which("wrk"),
    )


def interrupt_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM stops the run as Ctrl-C does, so the servers are stopped on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_baseline:
        assert args.port is not None and args.db is not None, "--port and --db are required"
        serve_baseline(args.port, args.db)
        return 0
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    try:
        return run_benchmark(config_from(args))
    except (StartupFailure, LoadGeneratorFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
