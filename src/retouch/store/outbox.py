"""The callback outbox: rows written beside the task's final state, in the same
transaction, so a delivery is never lost and never sent before billing is final."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, insert

from retouch.store.schema import callback_deliveries

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


@dataclass(frozen=True)
class Delivery:
    id: str
    task_id: str
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime


def new_message_id() -> str:
    """`msg_` + the time in nanoseconds + randomness: ids sort by creation."""
    return f"msg_{time.time_ns():016x}{secrets.token_hex(6)}"


def enqueue(conn: Connection, task_id: str, params: dict[str, Any], now: datetime) -> None:
    """Queue a delivery for a task that just became terminal, if it asked for one."""
    url = params.get("callback_url")
    if not url:
        return
    conn.execute(
        insert(callback_deliveries).values(
            id=new_message_id(),
            task_id=task_id,
            url=url,
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def delivery_from_row(row: Row[Any]) -> Delivery:
    return Delivery(
        id=row.id,
        task_id=row.task_id,
        url=row.url,
        status=row.status,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        created_at=row.created_at,
    )
