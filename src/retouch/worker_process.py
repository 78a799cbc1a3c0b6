"""A worker process: the child that `retouch serve` supervises, or `retouch worker`
on a GPU host (one process per GPU), both built the same way."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any

from retouch.clock import SystemClock
from retouch.errors import ModelLoadError
from retouch.logs import configure_logging
from retouch.metrics import readiness_problems
from retouch.models import ModelsFileError
from retouch.settings import Settings
from retouch.storage import open_storage
from retouch.store import DatabaseOpenError, Store, open_store
from retouch.store.notify import Wakeups
from retouch.uploads import Uploads
from retouch.worker import LoadedModel, Worker, WorkerConfig

log = logging.getLogger(__name__)

# With notifications an idle worker looks at the table only this often.
NOTIFIED_IDLE_SECONDS = 5.0


class WorkerStartupError(Exception):
    """The worker cannot start; the message is one sentence for the operator."""


def build_worker(settings: Settings, store: Store, worker_id: str | None = None) -> Worker:
    """Load the models (the slow part) and assemble a worker around them."""
    from retouch.engine.loader import engine_options, load_engines
    from retouch.fetch import ImageFetcher

    try:
        specs = settings.model_specs()
        engines = load_engines(specs, engine_options(settings))
    except (ModelLoadError, ModelsFileError) as exc:
        raise WorkerStartupError(str(exc)) from None
    models = {spec.name: LoadedModel(spec, engines[spec.name]) for spec in specs}
    clock = SystemClock()
    wakeups = Wakeups.for_engine(store.engine)
    storage = result_storage(settings, clock)
    return Worker(
        store,
        storage,
        models,
        ImageFetcher(
            allow_private_networks=settings.allow_private_networks,
            allowed_ports=settings.allowed_fetch_ports,
            max_bytes=settings.max_image_bytes,
            timeout_seconds=settings.fetch_timeout_seconds,
        ),
        WorkerConfig(
            lease_seconds=settings.lease_seconds,
            result_ttl_seconds=settings.result_ttl_seconds,
            poll_interval_seconds=settings.poll_interval_seconds,
            idle_wait_seconds=NOTIFIED_IDLE_SECONDS if wakeups else settings.poll_interval_seconds,
        ),
        worker_id=worker_id,
        clock=clock,
        wakeups=wakeups,
        uploads=Uploads(storage, settings.signing_key(), clock, max_bytes=settings.max_image_bytes),
    )


def result_storage(settings: Settings, clock: SystemClock) -> Any:
    return open_storage(
        settings.storage,
        settings.results_dir,
        settings.signing_key(),
        clock,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )


def worker_main(settings: Settings, ready: Connection, parent_pid: int, worker_id: str) -> None:
    """Entry point of the worker child process of `retouch serve`; `worker_id` is
    chosen by the parent, which takes its tasks back at once should it die."""
    _die_with_parent(parent_pid)
    configure_logging()
    store = Store.from_url(settings.resolved_database_url, pool_size=settings.db_pool_size)
    try:
        worker = build_worker(settings, store, worker_id)
    except WorkerStartupError as exc:
        ready.send(("error", str(exc)))
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: worker.drain(settings.shutdown_grace_seconds))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    ready.send(("ready", f"{', '.join(worker.models)} as {worker.worker_id}"))
    ready.close()
    worker.run()


def run_worker(settings: Settings) -> None:
    """`retouch worker`: serve tasks from the shared database until SIGTERM, then
    finish the running task (for up to the grace period) and exit 0."""
    configure_logging()
    # Bound first: a port already taken stops start-up before the models load, and
    # /healthz answers (and /readyz says why not ready) while they do.
    health = _HealthServer(settings) if settings.worker_port is not None else None
    try:
        worker, store = _start_worker(settings)
    except BaseException:
        if health is not None:
            health.close()
        raise

    def drain(signum: int, _frame: object) -> None:
        if worker.draining.is_set():
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            worker.stopping.set()
            return
        worker.drain(settings.shutdown_grace_seconds)

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    if health is not None:
        health.worker = worker
    try:
        worker.run()
    finally:
        if health is not None:
            health.close()
        if worker.wakeups is not None:
            worker.wakeups.close()
        store.close()
    log.info("worker %s exited cleanly", worker.worker_id)


def _start_worker(settings: Settings) -> tuple[Worker, Store]:
    try:
        store = open_store(settings)
    except DatabaseOpenError as exc:
        raise WorkerStartupError(str(exc)) from None
    log.info("loading %s", ", ".join(spec.name for spec in settings.model_specs()))
    try:
        return build_worker(settings, store), store
    except BaseException:
        store.close()
        raise


class _HealthServer:
    """`/healthz`, `/readyz` and `/metrics` of a worker process, on its own port;
    not ready until `worker` is set (its models loaded)."""

    def __init__(self, settings: Settings) -> None:
        from retouch.metrics import render_latest

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, content_type = outer.answer(self.path, render_latest)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.worker: Worker | None = None
        address = (settings.host, settings.worker_port or 0)
        try:
            self.server = ThreadingHTTPServer(address, Handler)
        except OSError as exc:
            raise WorkerStartupError(
                f"Cannot serve health and metrics on {settings.host}:{settings.worker_port}: "
                f"{exc.strerror}; choose another --worker-port."
            ) from None
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        log.info("worker health and metrics on http://%s:%d", settings.host, self.port)

    def answer(self, path: str, render: Any) -> tuple[int, bytes, str]:
        route = path.split("?", 1)[0]
        if route == "/metrics":
            body, content_type = render()
            return 200, body, content_type
        status = 200
        document: dict[str, Any] = {"status": "ok"}
        if route == "/readyz":
            worker = self.worker
            if worker is None:
                problems = ["starting: loading the models"]
            else:
                problems = readiness_problems(worker.store, worker.storage)
                if worker.draining.is_set():
                    problems.append("draining: claims no new tasks")
            status = 503 if problems else 200
            document = {"status": "unavailable" if problems else "ready", "problems": problems}
        elif route != "/healthz":
            status, document = 404, {"status": "no such endpoint"}
        return status, json.dumps(document).encode(), "application/json"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this child if the server dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        log.debug("prctl unavailable; the worker will not follow the server's death")
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent is already gone
