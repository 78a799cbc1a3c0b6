"""A deadline, and an optional stop check, for one HTTP exchange made of blocking
reads. httpx's timeouts bound each read, not the exchange: a server that sends a
byte of its headers every second never trips them. The watchdog does, by shutting
down every connection the exchange opened (seen through httpcore's `trace`
extension), which wakes a blocked TLS handshake, send or read at once."""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Trip(enum.Enum):
    DEADLINE = "deadline"
    STOP = "stop"


class Watchdog:
    """One exchange's deadline and stop check, kept by a thread of its own: when
    either trips, every connection the exchange opened is shut down. Pass `trace`
    as the request's `trace` extension, inside `with`."""

    # How often `should_stop` is asked, when there is one.
    STOP_POLL_SECONDS = 0.1

    def __init__(self, seconds: float, should_stop: Callable[[], bool] | None = None) -> None:
        self._deadline = time.monotonic() + seconds
        self._should_stop = should_stop
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._tripped: Trip | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.forget_connections()

    def forget_connections(self) -> None:
        """Close the duplicates kept of finished connections (theirs stay open until then)."""
        with self._lock:
            for watched in self._sockets:
                watched.close()
            self._sockets.clear()

    def left(self) -> float:
        return self._deadline - time.monotonic()

    def tripped(self) -> Trip | None:
        """Why the fetch must end now, if it must."""
        if self._tripped is not None:
            return self._tripped
        if self.left() <= 0:
            return Trip.DEADLINE
        if self._should_stop is not None and self._should_stop():
            return Trip.STOP
        return None

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's `trace` extension: watch each connection as soon as it is open."""
        if event != "connection.connect_tcp.complete":
            return
        # A duplicate descriptor of the same socket: shutting it down ends the
        # connection whatever wraps the original (TLS), and until it is closed here
        # its number cannot be handed to another socket.
        sock = info["return_value"].get_extra_info("socket")
        if sock is None:
            return
        watched = sock.dup()
        with self._lock:
            self._sockets.append(watched)
            if self._tripped is not None:
                shut_down(watched)

    def _watch(self) -> None:
        while not self._done.wait(self._next_wait()):
            try:
                trip = self.tripped()
            except Exception:
                # A broken check is dropped (and logged): the deadline still holds.
                log.exception("should_stop failed; the fetch goes on to its deadline")
                self._should_stop = None
                continue
            if trip is not None:
                with self._lock:
                    self._tripped = trip
                    for watched in self._sockets:
                        shut_down(watched)
                return

    def _next_wait(self) -> float:
        left = max(0.0, self.left())
        return left if self._should_stop is None else min(left, self.STOP_POLL_SECONDS)


def shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer or by httpcore
        sock.shutdown(socket.SHUT_RDWR)
