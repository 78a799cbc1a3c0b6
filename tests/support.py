"""Real components for tests: an image host, a live API server, images, processes."""

from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import uvicorn
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import create_engine, text

from retouch.keys import ApiKey
from retouch.tasks import EditParams, Task, TaskStatus, new_task_id

REPO = Path(__file__).resolve().parent.parent


def png_bytes(
    size: tuple[int, int] = (512, 512), color: tuple[int, int, int] = (200, 80, 40)
) -> bytes:
    return image_bytes(Image.new("RGB", size, color), "PNG")


def image_bytes(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Streamed without a Content-Length, one chunk every `drip_seconds`.
    chunks: Callable[[], Iterator[bytes]] | None = None
    drip_seconds: float = 0.0


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up early are part of the tests, not errors."""


class ImageHost:
    """A real HTTP server on loopback that serves whatever a test puts in it."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests.append(self.path)
                route = host.routes.get(self.path, Route(404, b"not found"))
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.chunks is None:
                    self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(route.body)
                    return
                self.end_headers()
                try:
                    for chunk in route.chunks():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        time.sleep(route.drip_seconds)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up, as it should

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = _QuietServer((address, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, path: str, body: bytes, status: int = 200, **headers: str) -> str:
        self.routes[path] = Route(status, body, headers)
        return self.url(path)

    def stream(
        self, path: str, chunks: Callable[[], Iterator[bytes]], drip_seconds: float = 0.0
    ) -> str:
        self.routes[path] = Route(chunks=chunks, drip_seconds=drip_seconds)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://{self.address}:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class LiveServer:
    """A FastAPI app served by uvicorn on a loopback port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        sockets = self._server.servers[0].sockets
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def wait_for(
    check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        time.sleep(interval)


def demo_serve_args(steps: int) -> tuple[str, ...]:
    """`retouch serve` flags for the demo model, fetching from loopback test hosts."""
    return (
        "--model", "demo", "--allow-private-networks", "--fetch-ports", "any",
        "--steps", str(steps), "--shutdown-grace-seconds", "5",
    )  # fmt: skip


class ServeProcess:
    """A real `retouch serve` process. Every data directory whose database one has
    served is listed in `served_data_dirs` (the acceptance suite checks their ledgers)."""

    served_data_dirs: ClassVar[set[Path]] = set()
    command = "serve"
    port_flag = "--port"

    def __init__(
        self, data_dir: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, **(env or {})}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{self.command}-{self.port}-{time.monotonic_ns()}.log"
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> ServeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if "--database-url" not in self.args:
            ServeProcess.served_data_dirs.add(self.data_dir)
        command = [
            sys.executable, "-m", "retouch", self.command,
            "--data-dir", str(self.data_dir), self.port_flag, str(self.port), *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        wait_for(self._healthy, timeout=timeout, interval=0.2, what=f"{self.command} on {self.url}")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"retouch {self.command} exited early:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        os.kill(self.process.pid, sig)
        return self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM: a running edit finishes first (up to --shutdown-grace-seconds)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)


class WorkerProcess(ServeProcess):
    """A real `retouch worker` process; healthy once its model is loaded."""

    command = "worker"
    port_flag = "--worker-port"


def retouch_cli(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m retouch ARGS`, its output captured; nothing on its stdin."""
    return subprocess.run(
        [sys.executable, "-m", "retouch", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@contextmanager
def running(server: ServeProcess) -> Iterator[ServeProcess]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema of its own; the URL points `search_path` at it."""
    schema = f"test_{secrets.token_hex(6)}"
    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def pending_task(
    key: ApiKey,
    now: datetime,
    params: EditParams,
    credits: float,
    *,
    model: str = "qwen-image-edit",
    priority_at: datetime | None = None,
) -> Task:
    """A new pending task of `key`, as the API builds one before handing it to the store."""
    return Task(
        id=new_task_id(int(now.timestamp())),
        key_id=key.id,
        account_id=key.account_id,
        model=model,
        status=TaskStatus.PENDING,
        progress=0,
        params=params,
        created_at=now,
        priority_at=priority_at,
        user_group=key.user_group,
        credits_reserved=credits,
    )


# Signed-link queries that are malformed rather than forged, and the parameter
# each refusal names.
MALFORMED_LINK_QUERIES = [
    ("expires=1767225600&signature=%C3%A9", "signature"),  # compare_digest refuses non-ASCII
    ("expires=1767225600&signature=" + "A" * 64, "signature"),
    ("expires=%C2%B2&signature=" + "0" * 64, "expires"),  # "²": a digit int() refuses
    ("expires=%D9%A3&signature=" + "0" * 64, "expires"),  # "٣": a digit int() takes
    ("expires=" + "9" * 5000 + "&signature=" + "0" * 64, "expires"),  # past int()'s limit
    ("expires=-1&signature=" + "0" * 64, "expires"),
]
