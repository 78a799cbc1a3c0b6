"""Waking idle workers: PostgreSQL's LISTEN/NOTIFY on one channel.

A transaction that makes a task claimable (a new task, one handed back to the
queue) sends a notification, delivered when it commits. An idle worker waits on
its own listening connection instead of polling the table, so it starts a new
task within milliseconds and costs the database nothing while idle. SQLite has
no such thing: there, workers poll (cheaply: a read, never a write lock).

A notification reaches every listener of the database, so it names the schema
its task is in, and a listener wakes only for its own: deployments that share
one database through schemas (staging beside production, say) do not wake each
other's workers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from retouch.logs import RepeatedFailure

log = logging.getLogger(__name__)

CHANNEL = "retouch_tasks"


def announce_task(conn: Connection) -> None:
    """Tell idle workers (at commit) that a task can be claimed."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(CHANNEL, func.current_schema())))


class Wakeups:
    """A connection of its own that LISTENs on the tasks channel."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Any = None
        self._schema: str | None = None
        self._failures = RepeatedFailure(log, "listening for new tasks")

    @classmethod
    def for_engine(cls, engine: Engine) -> Wakeups | None:
        return cls(engine) if engine.dialect.name == "postgresql" else None

    def start(self) -> None:
        """Listen from now on, so that no announcement before the first wait is missed."""
        try:
            self._listening()
        except Exception:
            log.warning("could not listen for new tasks yet; will retry", exc_info=True)
            self.close()

    def wait(self, timeout: float) -> bool:
        """True when a task was announced within `timeout` seconds."""
        try:
            conn = self._listening()
            self._failures.succeeded()
            for notice in conn.notifies(timeout=timeout):
                if notice.payload == self._schema:
                    # Several announcements may be queued: one wake-up is enough.
                    return True
            return False
        except Exception as exc:
            self._failures.failed(exc)
            self.close()
            # Wait out the timeout anyway: a database that is down is not hammered.
            time.sleep(timeout)
            return False

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing the listening connection failed", exc_info=True)
            self._conn = None

    def _listening(self) -> Any:
        if self._conn is None:
            raw = self._engine.raw_connection()
            conn: Any = raw.driver_connection  # (detached, the wrapper lets go of it)
            raw.detach()  # this connection is ours for good, not the pool's
            conn.autocommit = True
            conn.execute(f"LISTEN {CHANNEL}")
            self._schema = conn.execute("SELECT current_schema()").fetchone()[0]
            self._conn = conn
        return self._conn
