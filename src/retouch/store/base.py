"""The store's foundation: engines tuned per backend and connection handling."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    exists,
    select,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import ConnectionPoolEntry

from retouch.clock import Clock, SystemClock

# The threads of one process that may run a query at once: the API's thread pool
# (40) and the server's own (worker stages, lease keepers, janitor, callbacks).
# On PostgreSQL it sizes the pool's overflow; on SQLite it is no limit (see below).
QUERY_THREADS = 48
DEFAULT_POOL_SIZE = 10
# How long a SQLite write waits for the write lock before the database counts as
# unavailable (the API answers 503, the worker retries).
SQLITE_BUSY_SECONDS = 30


def create_db_engine(url: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> Engine:
    """An engine tuned for the backend: SQLite gets WAL, a busy timeout and
    `BEGIN IMMEDIATE` for writes, so concurrent writers queue instead of failing.

    On PostgreSQL `pool_size` connections stay open and up to `QUERY_THREADS` more
    are opened when every thread queries at once, so no request waits for a
    connection (or times out) at a busy moment; each is a server process, so the
    number kept open is the operator's to choose."""
    if not url.startswith("sqlite"):
        return create_engine(
            url, pool_pre_ping=True, pool_size=pool_size, max_overflow=QUERY_THREADS
        )
    # Each thread keeps a reader and a writer for as long as it lives (StoreBase), so
    # a cap on connections would be a cap on threads, and the thread past it would
    # wait for the pool's timeout and fail. How many threads query is the process's
    # business (the event loop, the API's pool, the callback senders...): no cap.
    # SQLite connections cost nothing to keep, so those of the usual threads stay.
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_SECONDS},
        pool_size=2 * QUERY_THREADS,
        max_overflow=-1,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun below
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            f"busy_timeout={SQLITE_BUSY_SECONDS * 1000}",
            "foreign_keys=ON",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # Reads run in autocommit (each statement sees one snapshot); writes take
        # the write lock up front so that two writers never deadlock on upgrade.
        if not connection.get_execution_options().get("retouch_readonly", False):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def database_unavailable(exc: BaseException) -> bool:
    """A database that cannot answer now (restarting, unreachable, a SQLite file
    locked past the busy timeout, every pooled connection busy past the pool's
    timeout), as opposed to a bug such as a missing table."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    return exc.connection_invalidated or not str(exc.orig).lower().startswith("no such ")


class PoolExhausted(OperationalError):
    """No pooled connection came free within the pool's timeout. Raised in place of
    SQLAlchemy's `TimeoutError`, which is no `OperationalError`, so that whoever
    handles a database that cannot answer now (the API's 503, the worker's retries)
    handles this one too."""

    def __init__(self, cause: PoolTimeoutError) -> None:
        super().__init__(None, None, cause)


class WriterBusy(OperationalError):
    """Another thread of this process held SQLite's write lock past the busy timeout:
    the same answer as SQLite's own "database is locked"."""

    def __init__(self) -> None:
        cause = f"database is locked (by this process for {SQLITE_BUSY_SECONDS} s)"
        super().__init__(None, None, Exception(cause))


class StoreBase:
    def __init__(self, engine: Engine, clock: Clock | None = None) -> None:
        self.engine = engine
        self.clock = clock or SystemClock()
        # On SQLite each thread keeps its own connections (reads in autocommit):
        # checking one out of the pool costs three times the query itself.
        self._reuse_connections = engine.dialect.name == "sqlite"
        self._local = threading.local()
        # Each connection with its thread (weakly): closed once that thread has ended.
        self._connections: list[tuple[weakref.ref[threading.Thread], Connection]] = []
        self._lock = threading.Lock()
        self._writer = threading.RLock()  # re-entered, `begin` refuses at once

    @property
    def reads_never_wait(self) -> bool:
        """SQLite in WAL mode: a read never waits for a writer and takes microseconds,
        less than handing it to a worker thread."""
        return self._reuse_connections

    @classmethod
    def from_url(
        cls, url: str, clock: Clock | None = None, *, pool_size: int = DEFAULT_POOL_SIZE
    ) -> Self:
        return cls(create_db_engine(url, pool_size=pool_size), clock)

    def close(self) -> None:
        with self._lock:
            for _thread, conn in self._connections:
                conn.close()
            self._connections.clear()
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        if not self._reuse_connections:
            with self._checkout() as pooled, pooled.begin():
                yield pooled
            return
        conn = self._thread_connection("writer")
        # This process's writers queue on a lock: each is woken as the one before
        # commits. SQLite's busy handler instead polls, sleeping up to 100 ms a
        # time, so under load some writes waited half a second behind a 2 ms one.
        if not self._writer.acquire(timeout=SQLITE_BUSY_SECONDS):
            raise WriterBusy
        try:
            with conn.begin():  # BEGIN IMMEDIATE; COMMIT, or ROLLBACK on an exception
                yield conn
        finally:
            self._writer.release()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        if not self._reuse_connections:
            with self._checkout() as pooled, pooled.begin():
                yield pooled
            return
        conn = self._thread_connection("reader")
        try:
            yield conn
        finally:
            conn.rollback()  # ends SQLAlchemy's transaction; nothing is open in SQLite

    def _checkout(self) -> Connection:
        try:
            return self.engine.connect()
        except PoolTimeoutError as exc:
            raise PoolExhausted(exc) from exc

    def _thread_connection(self, role: str) -> Connection:
        """This thread's own SQLite connection for reads (autocommit) or writes."""
        conn: Connection | None = getattr(self._local, role, None)
        if conn is None or conn.closed:
            self._close_ended_threads()  # their connections go back to the pool first
            conn = self._checkout()
            if role == "reader":
                conn.execution_options(retouch_readonly=True)
            setattr(self._local, role, conn)
            with self._lock:
                self._connections.append((weakref.ref(threading.current_thread()), conn))
        return conn

    def _close_ended_threads(self) -> None:
        """Close the connections of threads that have ended (the API's idle threads
        end after a while and new ones start)."""
        with self._lock:
            alive = []
            for thread_ref, known in self._connections:
                thread = thread_ref()
                if thread is not None and thread.is_alive():
                    alive.append((thread_ref, known))
                else:
                    known.close()
            self._connections = alive

    def _any(self, condition: Any) -> bool:
        """Whether a row matches: a cheap read before a claim that would take a write lock."""
        with self._read() as conn:
            return bool(conn.execute(select(exists().where(condition))).scalar())
