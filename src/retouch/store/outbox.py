"""The callback outbox: rows written beside the task's final state, in the same
transaction, so a delivery is never lost and never sent before billing is final."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, and_, insert, or_, select, update

from retouch.errors import ConflictError, InvalidRequestError, NotFoundError
from retouch.store.base import StoreBase
from retouch.store.rows import task_from_row
from retouch.store.schema import callback_deliveries, tasks
from retouch.tasks import Task

log = logging.getLogger(__name__)

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
    # Set by a claim, cleared by its result: a claim's token (see `record_attempt`).
    locked_until: datetime | None = None


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
        locked_until=row.locked_until,
    )


class OutboxStore(StoreBase):
    """Claiming, recording and redelivering callback deliveries."""

    def claim_due_deliveries(self, limit: int, lock_seconds: float) -> list[Delivery]:
        """Deliveries whose next attempt is due, locked for `lock_seconds` so that
        no other dispatcher sends them meanwhile. A delivery is claimed again only
        once its lock has passed, so each claim of it sets a later `locked_until`:
        the claim's token."""
        now = self.clock.now()
        is_due = and_(
            callback_deliveries.c.status == PENDING,
            callback_deliveries.c.next_attempt_at <= now,
            or_(
                callback_deliveries.c.locked_until.is_(None),
                callback_deliveries.c.locked_until < now,
            ),
        )
        if not self._any(is_due):
            return []
        due = (
            select(callback_deliveries.c.id)
            .where(is_due)
            .order_by(callback_deliveries.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(callback_deliveries)
            .where(callback_deliveries.c.id.in_(due.scalar_subquery()))
            .values(locked_until=now + timedelta(seconds=lock_seconds))
            .returning(*callback_deliveries.c)
        )
        with self._write() as conn:
            return [delivery_from_row(row) for row in conn.execute(claim)]

    def record_attempt(
        self,
        delivery: Delivery,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        retry_at: datetime | None,
    ) -> bool:
        """One more attempt of a claimed delivery: delivered, to be retried at
        `retry_at`, or given up. Recorded only while the claim is the latest one
        (its `locked_until` still in place): the result of a claim whose lock passed
        and that another dispatcher claimed again since, or that has a result
        already, is dropped, and False returned."""
        now = self.clock.now()
        if delivered:
            status, finished = DELIVERED, now
        elif retry_at is None:
            status, finished = FAILED, now
        else:
            status, finished = PENDING, None
        with self._write() as conn:
            recorded = conn.execute(
                update(callback_deliveries)
                .where(
                    callback_deliveries.c.id == delivery.id,
                    callback_deliveries.c.status == PENDING,
                    callback_deliveries.c.locked_until == delivery.locked_until,
                )
                .values(
                    status=status,
                    attempts=callback_deliveries.c.attempts + 1,
                    last_status_code=status_code,
                    last_error=error,
                    next_attempt_at=retry_at,
                    locked_until=None,
                    finished_at=finished,
                )
            ).rowcount
        if not recorded:
            log.warning(
                "callback %s: dropped the result of a claim that is no longer the latest "
                "(its lock passed and it was claimed again, or recorded already)",
                delivery.id,
            )
        return bool(recorded)

    def latest_delivery(self, task_id: str) -> Delivery | None:
        query = (
            select(callback_deliveries)
            .where(callback_deliveries.c.task_id == task_id)
            .order_by(callback_deliveries.c.created_at.desc(), callback_deliveries.c.id.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        return None if row is None else delivery_from_row(row)

    def redeliver(self, task_id: str, key_id: str) -> Task:
        """Queue a new delivery (a new `webhook-id`) for a finished task's callback."""
        with self._write() as conn:
            row = conn.execute(
                select(tasks).where(tasks.c.id == task_id, tasks.c.key_id == key_id)
            ).first()
            if row is None:
                raise NotFoundError(f"No task found with id '{task_id}'", param="task_id")
            task = task_from_row(row)
            if not task.params.callback_url:
                raise InvalidRequestError(
                    f"Task '{task_id}' has no callback_url to deliver to", param="task_id"
                )
            if not task.status.is_terminal:
                raise ConflictError(
                    f"Task '{task_id}' is still {task.status.value}; its callback is sent "
                    "once it finishes",
                    param="task_id",
                )
            enqueue(conn, task_id, row.params, self.clock.now())
        return task
