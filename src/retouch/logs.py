"""Logging: readable lines on a terminal, JSON lines elsewhere (for collectors).

Every record made while a worker handles a task carries `task_id` and
`worker_id` (bound with `context`), whatever the message says.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from retouch.errors import first_line

_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)
_worker_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("worker_id", default=None)


@contextmanager
def context(*, task_id: str | None = None, worker_id: str | None = None) -> Iterator[None]:
    """Attach a task and/or worker id to every record logged inside (this thread)."""
    tokens = []
    if task_id is not None:
        tokens.append((_task_id, _task_id.set(task_id)))
    if worker_id is not None:
        tokens.append((_worker_id, _worker_id.set(worker_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.task_id = _task_id.get()
        record.worker_id = _worker_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for name in ("task_id", "worker_id"):
            value = getattr(record, name, None)
            if value:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{name}={value}"
            for name in ("worker_id", "task_id")
            if (value := getattr(record, name, None))
        ]
        return f"{text} [{' '.join(ids)}]" if ids else text


def configure_logging(json_lines: bool | None = None) -> None:
    """JSON lines when stderr is not a terminal (or when asked), else text."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler()
    handler.addFilter(_Context())
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else _TextFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class RepeatedFailure:
    """How a retrying loop reports a failure that lasts (a database restarting,
    say) without a traceback every few hundred milliseconds: the first failure
    with its traceback, then one line at most every `every` seconds saying how
    many there were, and one line once the loop works again.

    One per loop; not for sharing between threads."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._every = every
        self._clock = clock
        self._since: float | None = None
        self._reported = 0.0
        self._count = 0

    def failed(self, exc: BaseException) -> None:
        """Call from the `except` block of each failed try."""
        now = self._clock()
        self._count += 1
        if self._since is None:
            self._since = self._reported = now
            self._log.error("%s failed; retrying", self._what, exc_info=exc)
        elif now - self._reported >= self._every:
            self._reported = now
            self._log.warning(
                "%s still failing: %d failures in %.0f s, the last: %s: %s",
                self._what,
                self._count,
                now - self._since,
                type(exc).__name__,
                first_line(exc, 200),
            )

    def succeeded(self) -> None:
        """Call after each try that worked."""
        if self._since is not None:
            self._log.warning(
                "%s works again after %d failures in %.0f s",
                self._what,
                self._count,
                self._clock() - self._since,
            )
            self._since = None
            self._count = 0
