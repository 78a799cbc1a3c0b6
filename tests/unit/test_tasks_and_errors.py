from __future__ import annotations

import re
import sqlite3

import pytest
from sqlalchemy.exc import OperationalError, ProgrammingError

from retouch import errors
from retouch.store import database_unavailable
from retouch.tasks import TaskStatus, new_task_id


def test_task_id_has_the_seed_shape() -> None:
    ids = {new_task_id(1757156493) for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"task-unified-1757156493-[a-z0-9]{8}", i) for i in ids)


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (TaskStatus.PENDING, False),
        (TaskStatus.PROCESSING, False),
        (TaskStatus.COMPLETED, True),
        (TaskStatus.FAILED, True),
        (TaskStatus.CANCELLED, True),
    ],
)
def test_terminal_states(status: TaskStatus, terminal: bool) -> None:
    assert status.is_terminal is terminal


@pytest.mark.parametrize(
    ("error_class", "status", "type_"),
    [
        (errors.InvalidRequestError, 400, "invalid_request_error"),
        (errors.AuthenticationError, 401, "authentication_error"),
        (errors.InsufficientQuotaError, 402, "insufficient_quota_error"),
        (errors.PermissionDeniedError, 403, "permission_error"),
        (errors.NotFoundError, 404, "not_found_error"),
        (errors.RequestTooLargeError, 413, "request_too_large_error"),
        (errors.RateLimitError, 429, "rate_limit_error"),
        (errors.InternalError, 500, "internal_server_error"),
        (errors.UpstreamError, 502, "upstream_error"),
        (errors.ServiceUnavailableError, 503, "service_unavailable_error"),
    ],
)
def test_each_error_carries_the_seeds_status_and_type(
    error_class: type[errors.RetouchError], status: int, type_: str
) -> None:
    body = error_class("it went wrong", param="model")
    assert body.body() == {
        "error": {
            "code": status,
            "message": "it went wrong",
            "type": type_,
            "param": "model",
            **(
                {"fallback_suggestion": error_class.default_suggestion}
                if error_class.default_suggestion
                else {}
            ),
        }
    }


def test_error_body_omits_unknown_fields() -> None:
    assert errors.NotFoundError().body() == {
        "error": {"code": 404, "message": "Resource not found", "type": "not_found_error"}
    }


def test_first_line_is_one_short_line_or_nothing() -> None:
    from retouch.errors import first_line

    assert first_line(OSError()) == ""  # an empty message no longer breaks /readyz
    assert (
        first_line(ValueError("  bad input\n  Traceback (most recent call last):")) == "bad input"
    )
    assert first_line(RuntimeError("x" * 500), 200) == "x" * 200


def test_a_database_that_cannot_answer_is_told_apart_from_a_bug() -> None:
    """Unreachable or locked: 503, retry. A missing table or bad SQL: 500, a bug."""

    def operational(message: str, *, invalidated: bool = False) -> OperationalError:
        return OperationalError(
            "SELECT 1", {}, sqlite3.OperationalError(message), connection_invalidated=invalidated
        )

    assert database_unavailable(operational("database is locked"))
    assert database_unavailable(operational("connection failed: Connection refused"))
    assert database_unavailable(operational("server closed the connection", invalidated=True))
    assert not database_unavailable(operational("no such table: tasks"))
    assert not database_unavailable(operational("No such column: tasks.idx"))
    assert not database_unavailable(
        ProgrammingError("SELECT 1", {}, sqlite3.ProgrammingError("relation does not exist"))
    )
    assert not database_unavailable(RuntimeError("database is locked"))
