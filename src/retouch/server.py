"""`retouch serve`: the embedded default on one machine.

One process serves the API (no torch in it) and supervises a worker child
process that loads the model and runs edits, so polls stay fast while the
model computes and a crash of the engine never takes the API down.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import multiprocessing
import os
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import IO

import uvicorn
from sqlalchemy import make_url

from retouch.api.admin import AdminService
from retouch.api.app import create_app
from retouch.api.service import TaskService
from retouch.callbacks import CallbackDispatcher, CallbackPolicy
from retouch.clock import SystemClock
from retouch.janitor import Janitor
from retouch.models import ModelsFileError, ModelSpec
from retouch.netguard import AddressGuard, UrlRules
from retouch.prompts import PromptTokenCounter
from retouch.settings import Settings
from retouch.store import Store, open_store
from retouch.uploads import Uploads
from retouch.worker import new_worker_id
from retouch.worker_process import result_storage, worker_main

log = logging.getLogger(__name__)

_READY_TIMEOUT_SECONDS = 3600.0
_STOP_GRACE_SECONDS = 15.0
# How long open connections (event streams, say) may delay a shutdown.
_HTTP_SHUTDOWN_SECONDS = 5
_RESTART_DELAY_SECONDS = 2.0
# A worker that cannot be restarted is tried again after doubling waits, up to this.
_MAX_RESTART_DELAY_SECONDS = 60.0


class StartupError(Exception):
    """The server cannot start; the message is one sentence for the operator."""


def serve(settings: Settings) -> None:
    try:
        specs = settings.model_specs()
    except ModelsFileError as exc:
        raise StartupError(str(exc)) from None
    with _exclusive(settings.data_dir), _listening(settings.host, settings.port) as listener:
        if settings.port == 0:
            settings = settings.model_copy(update={"port": listener.getsockname()[1]})
        store = open_store(settings)
        clock = SystemClock()
        storage = result_storage(settings, clock)
        uploads = Uploads(
            storage, settings.signing_key(), clock, max_bytes=settings.max_image_bytes
        )
        if store.engine.dialect.name == "sqlite":
            # One box: this process holds the data directory and its database, so
            # no other worker can own a lease. (A shared database may have some.)
            taken_over = store.reap_expired_leases(settings.max_attempts, all_leases=True)
            if taken_over:
                log.warning("%d task(s) were running when the server last stopped", taken_over)
        supervisor = WorkerSupervisor(settings, store) if settings.worker else None
        if supervisor is not None:
            supervisor.start()
        janitor = Janitor(
            store,
            storage,
            max_attempts=settings.max_attempts,
            interval_seconds=settings.janitor_interval_seconds,
            upload_ttl_seconds=settings.result_ttl_seconds,
            lease_seconds=settings.lease_seconds,
        )
        janitor.start()
        server_url = _server_url(settings)
        service = TaskService(
            store,
            storage,
            clock,
            specs,
            public_url=settings.public_url,
            tokens=PromptTokenCounter(settings.models_dir),
            image_rules=UrlRules.for_images(
                settings.allowed_fetch_ports,
                refuse_private_literals=not settings.allow_private_networks,
            ),
            callback_rules=UrlRules.for_callbacks(
                settings.allowed_callback_ports,
                refuse_private_literals=not settings.allow_private_networks,
            ),
            limits=settings.limits,
            uploads=uploads,
        )
        dispatcher = CallbackDispatcher(
            store,
            lambda task: service.render_callback(task, server_url),
            settings.signing_key(),
            clock,
            CallbackPolicy(
                timeout_seconds=settings.callback_timeout_seconds,
                retry_delays=settings.callback_retry_schedule,
                allowed_ports=settings.allowed_callback_ports,
            ),
            guard=AddressGuard(allow_private_networks=settings.allow_private_networks),
        )
        dispatcher.start()
        app = create_app(
            service,
            max_request_bytes=settings.max_request_bytes,
            admin=AdminService(
                store,
                settings.admin_token,
                default_credits=settings.default_credits,
                limits=settings.limits,
                models=[spec.name for spec in specs],
                signing_key=settings.signing_key(),
            ),
        )
        _print_hint(settings, store, specs)
        try:
            # uvicorn's loggers go through ours (JSON lines when not on a terminal).
            # Open event streams would hold a shutdown forever: they get a few seconds.
            config = uvicorn.Config(
                app,
                log_level="info",
                log_config=None,
                timeout_graceful_shutdown=_HTTP_SHUTDOWN_SECONDS,
            )
            server = _Server(config, supervisor.drain if supervisor else lambda: None)
            with _sigterm_stops_gracefully():
                server.run(sockets=[listener])
        finally:
            dispatcher.stop()
            janitor.stop()
            if supervisor is not None:
                supervisor.stop()
            store.close()


class _Server(uvicorn.Server):
    """uvicorn's server, whose stop signal (SIGTERM, Ctrl-C) also starts the worker's
    drain at once, while open connections are given their last seconds."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._on_stop()


@contextmanager
def _sigterm_stops_gracefully() -> Iterator[None]:
    """uvicorn stops serving on SIGTERM, then raises the signal again for the handler
    it found: the default one would end the process there, before the worker drains.
    This handler lets `serve` go on to stop its worker (the running task finishes,
    up to --shutdown-grace-seconds) and exit 0; a second SIGTERM exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = threading.Event()

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            log.warning("second SIGTERM: stopping now")
            os._exit(128 + signal.SIGTERM)
        stopping.set()
        log.info("SIGTERM: stopping (the worker finishes its running task first)")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if not stopping.is_set():
            signal.signal(signal.SIGTERM, previous)


class WorkerSupervisor:
    """Runs the worker in a child process, waits until its model is loaded, and
    restarts it if it dies, handing the tasks it held straight back to the queue
    (a dead process renews no lease: waiting for its leases to expire is waste)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.worker_id = new_worker_id()
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._stopping = threading.Event()
        self._drained: BaseProcess | None = None  # told to drain already
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker and return once its model is loaded (or raise)."""
        self._process = self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)
        self._monitor.start()

    def drain(self) -> None:
        """Start stopping (from a signal handler: quick, no logging): the worker claims
        nothing more and finishes its running task; `stop` waits for it."""
        self._stopping.set()
        process = self._process
        if process is not None and process.is_alive() and process is not self._drained:
            self._drained = process
            process.terminate()

    def stop(self) -> None:
        self._stopping.set()
        self._stop_process(self._process)
        # A restart under way as the server stops stops what it started (`_restart`):
        # wait a while for that, not for a whole model load (a daemon dies with us).
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(_STOP_GRACE_SECONDS)

    def _stop_process(self, process: BaseProcess | None) -> None:
        if process is None or not process.is_alive():
            return
        if process is not self._drained:
            process.terminate()  # SIGTERM: finish the running task, within the grace period
        process.join(self.settings.shutdown_grace_seconds + _STOP_GRACE_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()

    def _spawn(self) -> BaseProcess:
        receiver, sender = self._context.Pipe(duplex=False)
        self.worker_id = new_worker_id()
        process = self._context.Process(
            target=worker_main,
            args=(self.settings, sender, os.getpid(), self.worker_id),
            name="retouch-worker",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            receiver.close()
            raise
        finally:
            sender.close()
        try:
            self._await_ready(process, receiver)
        except BaseException:
            if process.is_alive():  # still loading when it ran out of time
                process.kill()
                process.join()
            raise
        return process

    def _await_ready(self, process: BaseProcess, receiver: Connection) -> None:
        print("Loading the model(s) …", file=sys.stderr, flush=True)
        try:
            if not receiver.poll(_READY_TIMEOUT_SECONDS):
                raise StartupError("The worker did not finish loading the model in time.")
            kind, message = receiver.recv()
        except EOFError:
            process.join()
            raise StartupError(
                f"The worker process exited (code {process.exitcode}) while loading the model."
            ) from None
        finally:
            receiver.close()
        if kind != "ready":
            process.join()
            raise StartupError(message)
        log.info("worker ready: %s", message)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            process.join(0.5)
            if process.is_alive() or self._stopping.is_set():
                continue
            log.error("the worker process died (exit code %s); restarting it", process.exitcode)
            self._take_back(self.worker_id)
            self._restart()

    def _restart(self) -> None:
        """Start a new worker, trying again after doubling waits until one starts or
        the server stops: whatever goes wrong (the model no longer loads, no
        process can be started), the monitor lives on."""
        delay = _RESTART_DELAY_SECONDS
        while not self._stopping.wait(delay):
            delay = min(delay * 2, _MAX_RESTART_DELAY_SECONDS)
            try:
                self._process = self._spawn()
            except StartupError as exc:
                log.error("could not restart the worker (next try in %.0f s): %s", delay, exc)
                continue
            except Exception:
                log.exception("could not restart the worker (next try in %.0f s)", delay)
                continue
            if self._stopping.is_set():  # the server stopped while this one started
                self._stop_process(self._process)
            return

    def _take_back(self, worker_id: str) -> None:
        try:
            taken = self.store.reap_expired_leases(self.settings.max_attempts, owner=worker_id)
        except Exception:
            # The janitor takes them back once their leases have expired.
            log.exception("could not take back the tasks of worker %s", worker_id)
            return
        if taken:
            log.warning("%d task(s) of the dead worker went back to the queue or failed", taken)


@contextmanager
def _listening(host: str, port: int) -> Iterator[socket.socket]:
    """The server's socket, bound before anything slow starts (the models load in
    the meantime), so that a port already taken stops start-up at once."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        message = f"Cannot listen on {host}:{port}: {exc.strerror}; check --host."
        raise StartupError(message) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = (
            "another server is using it; stop that one or choose another --port"
            if exc.errno == errno.EADDRINUSE
            else "check --host and --port"
        )
        raise StartupError(f"Cannot listen on {host}:{port}: {exc.strerror}; {hint}.") from None
    try:
        yield sock
    finally:
        sock.close()


@contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = (data_dir / "serve.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartupError(
            f"Another `retouch serve` is already using {data_dir}; stop it or pass --data-dir."
        ) from None
    try:
        yield
    finally:
        handle.close()


def _server_url(settings: Settings) -> str:
    """Where this server listens, as a URL (an IPv6 address goes in brackets)."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def _print_hint(settings: Settings, store: Store, specs: list[ModelSpec]) -> None:
    # The flags that reach this server's database: its URL (password hidden) when
    # one was given, else its data directory when not the default.
    where = ""
    hidden = False
    if settings.database_url:
        url = make_url(settings.database_url)
        hidden = url.password is not None
        where = f" --database-url {shlex.quote(url.render_as_string(hide_password=True))}"
    elif settings.data_dir != Path("retouch-data"):
        where = f" --data-dir {shlex.quote(str(settings.data_dir))}"
    served = ", ".join(f"{spec.name!r} ({spec.checkpoint})" for spec in specs)
    lines = [f"Retouch is serving {served} on {_server_url(settings)}"]
    if not store.list_keys():
        lines.append("No API key exists yet. Create one (and its account) with:")
        lines.append(f"    retouch keys create --name alice{where}")
    else:
        lines.append("Create another API key (and account) with:")
        lines.append(f"    retouch keys create --name NAME{where}")
    if hidden:
        lines.append("(with the database password in place of ***)")
    print("\n".join(lines), file=sys.stderr, flush=True)
