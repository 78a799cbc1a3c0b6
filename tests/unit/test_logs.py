"""Log lines: JSON for collectors, text for terminals, task and worker ids attached
to every record made inside `context(...)` (and only there)."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from retouch.logs import JsonFormatter, RepeatedFailure, configure_logging, context

BASE_KEYS = {"time", "level", "logger", "process", "message"}


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@contextmanager
def configured(monkeypatch: pytest.MonkeyPatch, json_lines: bool | None) -> Iterator[io.StringIO]:
    """Configure logging onto a fresh stderr (a terminal when `json_lines` is None)
    and yield what it writes; then put back the root logger's handlers and levels,
    which `configure_logging` replaces, within the same test phase."""
    root = logging.getLogger()
    alembic = logging.getLogger("alembic")
    handlers, level, alembic_level = root.handlers[:], root.level, alembic.level
    stream: io.StringIO = Terminal() if json_lines is None else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        configure_logging(json_lines)
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        alembic.setLevel(alembic_level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_json_lines_carry_ids_only_inside_a_context(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("retouch.tests.logs")
    with configured(monkeypatch, json_lines=True) as stream:
        before = datetime.now(UTC)
        log.info("outside %s", "any task")
        with context(worker_id="gpu0-ab12"):
            log.warning("worker only")
            with context(task_id="task-unified-1-abcdefgh"):
                log.info("both: %d%%", 50)
            log.info("worker again")
        log.info("outside again")
        log.debug("below the level")
        after = datetime.now(UTC)

    records = json_lines(stream)
    assert [(r["level"], r["message"]) for r in records] == [
        ("info", "outside any task"),
        ("warning", "worker only"),
        ("info", "both: 50%"),
        ("info", "worker again"),
        ("info", "outside again"),
    ]
    ids = [{k: v for k, v in r.items() if k not in BASE_KEYS} for r in records]
    assert ids == [
        {},
        {"worker_id": "gpu0-ab12"},
        {"worker_id": "gpu0-ab12", "task_id": "task-unified-1-abcdefgh"},
        {"worker_id": "gpu0-ab12"},
        {},
    ]
    for record in records:
        assert BASE_KEYS <= set(record)
        assert record["logger"] == "retouch.tests.logs"
        assert record["process"] == "MainProcess"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"])
        at = datetime.fromisoformat(record["time"])
        assert before - timedelta(milliseconds=1) <= at <= after


def test_json_lines_include_the_exception_and_keep_non_ascii(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = logging.getLogger("retouch.tests.logs")
    with configured(monkeypatch, json_lines=True) as stream, context(task_id="t-1"):
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("task t-1: the engine failed — café")
    [record] = json_lines(stream)
    assert record["level"] == "error"
    assert record["message"] == "task t-1: the engine failed — café"
    assert record["task_id"] == "t-1" and "worker_id" not in record
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert record["exception"].endswith("ValueError: boom\nsecond line")
    assert "café" in stream.getvalue(), "written as UTF-8 text, not \\u escapes"
    assert len(stream.getvalue().splitlines()) == 1, "one line per record, even a traceback"


def test_a_context_belongs_to_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("retouch.tests.logs")
    with (
        configured(monkeypatch, json_lines=True) as stream,
        context(task_id="t-1", worker_id="w-1"),
    ):
        other = threading.Thread(target=log.info, args=("from another thread",))
        other.start()
        other.join()
        log.info("from this thread")
    records = {r["message"]: r for r in json_lines(stream)}
    assert set(records["from another thread"]) == BASE_KEYS
    mine = records["from this thread"]
    assert (mine["task_id"], mine["worker_id"]) == ("t-1", "w-1")


def test_text_lines_append_the_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("retouch.tests.logs")
    with configured(monkeypatch, json_lines=False) as stream:
        log.info("plain")
        with context(task_id="t-1"):
            log.info("task only")
            with context(worker_id="w-1"):
                log.info("both")
    lines = stream.getvalue().splitlines()
    prefix = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO MainProcess retouch\.tests\.logs: "
    assert len(lines) == 3
    assert re.fullmatch(prefix + r"plain", lines[0])
    assert re.fullmatch(prefix + r"task only \[task_id=t-1\]", lines[1])
    assert re.fullmatch(prefix + r"both \[worker_id=w-1 task_id=t-1\]", lines[2])


def test_the_format_follows_whether_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("retouch.tests.logs")
    with configured(monkeypatch, json_lines=None) as terminal:
        log.info("to a terminal")
        assert terminal.getvalue().rstrip("\n").endswith("retouch.tests.logs: to a terminal")

        piped = io.StringIO()
        monkeypatch.setattr(sys, "stderr", piped)
        configure_logging()
        log.info("to a pipe")
        root = logging.getLogger()
        assert len(root.handlers) == 1, "configuring again replaces the handler, never adds one"
        assert root.level == logging.INFO
        assert logging.getLogger("alembic").level == logging.WARNING
    assert [r["message"] for r in json_lines(piped)] == ["to a pipe"]
    assert "to a pipe" not in terminal.getvalue()


def test_json_formatter_without_the_context_filter() -> None:
    """A record that never passed the filter has no ids: the formatter copes."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    line = json.loads(JsonFormatter().format(record))
    assert set(line) == BASE_KEYS
    assert (line["logger"], line["level"], line["message"]) == ("x", "info", "hello you")


def test_a_lasting_failure_is_one_traceback_then_a_line_a_minute_then_a_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    logger = logging.getLogger("retouch.test.repeated")
    failures = RepeatedFailure(logger, "claiming a task", clock=lambda: now[0])

    def fail(message: str) -> None:
        try:
            raise ConnectionError(message)
        except ConnectionError as exc:
            failures.failed(exc)

    with caplog.at_level(logging.INFO, logger="retouch.test.repeated"):
        failures.succeeded()  # nothing to report yet
        fail("connection refused")
        for _ in range(50):  # every 0.2 s for 10 s: silent
            now[0] += 0.2
            fail("connection refused")
        now[0] += 50.0
        fail("still refused")  # 60 s after the first: one line
        now[0] += 1.0
        fail("still refused")
        failures.succeeded()
        failures.succeeded()
        fail("refused again")  # a new outage starts over, with its traceback

    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert records == [
        ("ERROR", "claiming a task failed; retrying", True),
        ("WARNING", "claiming a task still failing: 52 failures in 60 s, the last: "
                    "ConnectionError: still refused", False),
        ("WARNING", "claiming a task works again after 53 failures in 61 s", False),
        ("ERROR", "claiming a task failed; retrying", True),
    ]  # fmt: skip
