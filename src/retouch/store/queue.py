"""The task table as the queue: creating, claiming, leasing, finishing.

Every state change is one conditional statement (`UPDATE … WHERE status = …
AND lease_owner = …`), so an illegal transition simply matches no row, on
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)

from retouch.errors import ConflictError, NotFoundError
from retouch.store import outbox
from retouch.store.base import StoreBase
from retouch.store.rows import error_values, task_from_row
from retouch.store.schema import tasks
from retouch.tasks import Task, TaskError, TaskStatus

# The hot read paths' statements, built once (building one costs as much as
# running it on SQLite).
_TASK_OF_KEY = select(tasks).where(
    tasks.c.id == bindparam("task_id"), tasks.c.key_id == bindparam("key_id")
)
_TASK_BY_ID = select(tasks).where(tasks.c.id == bindparam("task_id"))
_QUEUE_AHEAD = select(func.count()).where(
    tasks.c.status == TaskStatus.PENDING.value,
    or_(
        tasks.c.created_at < bindparam("created_at", type_=tasks.c.created_at.type),
        and_(
            tasks.c.created_at == bindparam("created_at", type_=tasks.c.created_at.type),
            tasks.c.id < bindparam("task_id"),
        ),
    ),
)
_PENDING = TaskStatus.PENDING.value
_PROCESSING = TaskStatus.PROCESSING.value


class TaskQueue(StoreBase):
    """Tasks from creation to a final state, with the leases workers hold on them."""

    # -- creating and reading tasks -----------------------------------------

    def create_task(self, task: Task) -> None:
        with self._write() as conn:
            conn.execute(
                insert(tasks).values(
                    id=task.id,
                    key_id=task.key_id,
                    model=task.model,
                    status=task.status.value,
                    progress=task.progress,
                    params=task.params.to_json(),
                    user_group=task.user_group,
                    credits_reserved=task.credits_reserved,
                    created_at=task.created_at,
                    attempts=0,
                    cancel_requested=False,
                    results_purged=False,
                )
            )

    def get_task(self, task_id: str, key_id: str | None = None) -> Task | None:
        """The task, or None when it does not exist or belongs to another key."""
        with self._read() as conn:
            if key_id is None:
                row = conn.execute(_TASK_BY_ID, {"task_id": task_id}).first()
            else:
                row = conn.execute(_TASK_OF_KEY, {"task_id": task_id, "key_id": key_id}).first()
        return None if row is None else task_from_row(row)

    def queue_position(self, task: Task) -> int:
        """How many pending tasks will be started before this one."""
        values = {"created_at": task.created_at, "task_id": task.id}
        with self._read() as conn:
            return int(conn.execute(_QUEUE_AHEAD, values).scalar_one())

    def recent_task_seconds(self, model: str, sample: int = 20) -> float | None:
        """Mean run time of the last completed tasks of this model, if any."""
        recent = (
            select(tasks.c.started_at, tasks.c.finished_at)
            .where(tasks.c.model == model, tasks.c.status == TaskStatus.COMPLETED.value)
            .order_by(tasks.c.finished_at.desc())
            .limit(sample)
        )
        with self._read() as conn:
            rows = conn.execute(recent).all()
        durations = [
            (row.finished_at - row.started_at).total_seconds()
            for row in rows
            if row.started_at is not None and row.finished_at is not None
        ]
        return sum(durations) / len(durations) if durations else None

    # -- the worker's side ---------------------------------------------------

    def claim_next(
        self, worker_id: str, lease_seconds: float, models: Sequence[str] | None = None
    ) -> Task | None:
        """Take the oldest pending task (of one of `models`) and lease it to `worker_id`."""
        now = self.clock.now()
        pending = tasks.c.status == _PENDING
        if models is not None:
            pending = and_(pending, tasks.c.model.in_(models))
        if not self._any(pending):
            return None  # idle polls stay reads: no write lock taken for nothing
        oldest = (
            select(tasks.c.id)
            .where(pending)
            .order_by(tasks.c.created_at, tasks.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        claim = (
            update(tasks)
            .where(tasks.c.id == oldest, tasks.c.status == _PENDING)
            .values(
                status=_PROCESSING,
                lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=tasks.c.attempts + 1,
                started_at=func.coalesce(tasks.c.started_at, now),
            )
            .returning(*tasks.c)
        )
        with self._write() as conn:
            row = conn.execute(claim).first()
        return None if row is None else task_from_row(row)

    def renew_lease(self, task_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease; False when the worker no longer holds it."""
        expires = self.clock.now() + timedelta(seconds=lease_seconds)
        return self._update_leased(task_id, worker_id, lease_expires_at=expires)

    def set_progress(
        self, task_id: str, worker_id: str, progress: int, lease_seconds: float
    ) -> bool:
        expires = self.clock.now() + timedelta(seconds=lease_seconds)
        return self._update_leased(task_id, worker_id, progress=progress, lease_expires_at=expires)

    def should_stop(self, task_id: str, worker_id: str) -> bool:
        """True when the task was cancelled or the worker lost its lease."""
        query = select(tasks.c.cancel_requested).where(
            tasks.c.id == task_id,
            tasks.c.status == _PROCESSING,
            tasks.c.lease_owner == worker_id,
        )
        with self._read() as conn:
            flag = conn.execute(query).scalar_one_or_none()
        return flag is None or bool(flag)

    def cancel_was_requested(self, task_id: str) -> bool:
        query = select(tasks.c.cancel_requested).where(tasks.c.id == task_id)
        with self._read() as conn:
            return bool(conn.execute(query).scalar_one_or_none())

    def complete(
        self, task_id: str, worker_id: str, result_keys: Sequence[str], expires_at: datetime
    ) -> bool:
        return self._finish(
            task_id,
            worker_id,
            TaskStatus.COMPLETED,
            progress=100,
            result_keys=list(result_keys),
            results_expire_at=expires_at,
        )

    def fail(self, task_id: str, worker_id: str, error: TaskError) -> bool:
        return self._finish(task_id, worker_id, TaskStatus.FAILED, **error_values(error))

    def cancel_running(self, task_id: str, worker_id: str) -> bool:
        return self._finish(task_id, worker_id, TaskStatus.CANCELLED)

    def release(self, task_id: str, worker_id: str) -> bool:
        """Give a task back to the queue without counting the attempt (shutdown)."""
        return self._update_leased(
            task_id,
            worker_id,
            status=_PENDING,
            progress=0,
            lease_owner=None,
            lease_expires_at=None,
            attempts=tasks.c.attempts - 1,
        )

    def reap_expired_leases(self, max_attempts: int, *, all_leases: bool = False) -> int:
        """Put tasks whose worker vanished back in the queue, or fail them once
        they have used up their attempts. `all_leases` takes over every lease
        (the embedded server at start-up: no other worker can exist)."""
        now = self.clock.now()
        stale = tasks.c.status == _PROCESSING
        if not all_leases:
            stale = and_(stale, tasks.c.lease_expires_at < now)
        exhausted = (
            update(tasks)
            .where(stale, tasks.c.attempts >= max_attempts)
            .values(
                status=TaskStatus.FAILED.value,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
                **error_values(
                    TaskError(
                        code=500,
                        type="internal_server_error",
                        message=(
                            f"the worker running this task stopped {max_attempts} time(s) "
                            "before it finished; the task was given up"
                        ),
                    )
                ),
            )
        )
        requeue = (
            update(tasks)
            .where(stale, tasks.c.attempts < max_attempts)
            .values(status=_PENDING, progress=0, lease_owner=None, lease_expires_at=None)
        )
        with self._write() as conn:
            failed = conn.execute(exhausted.returning(tasks.c.id, tasks.c.params)).all()
            for row in failed:
                outbox.enqueue(conn, row.id, row.params, now)
            requeued = conn.execute(requeue).rowcount
        return len(failed) + int(requeued)

    # -- the client's side ---------------------------------------------------

    def request_cancel(self, task_id: str, key_id: str) -> Task:
        """Cancel a pending task at once; flag a running one for its worker."""
        now = self.clock.now()
        mine = and_(tasks.c.id == task_id, tasks.c.key_id == key_id)
        with self._write() as conn:
            cancelled = conn.execute(
                update(tasks)
                .where(mine, tasks.c.status == _PENDING)
                .values(status=TaskStatus.CANCELLED.value, finished_at=now, cancel_requested=True)
                .returning(tasks.c.params)
            ).first()
            if cancelled is not None:
                outbox.enqueue(conn, task_id, cancelled.params, now)
            conn.execute(
                update(tasks)
                .where(mine, tasks.c.status == _PROCESSING)
                .values(cancel_requested=True)
            )
            row = conn.execute(select(tasks).where(mine)).first()
        if row is None:
            raise NotFoundError(f"No task found with id '{task_id}'", param="task_id")
        task = task_from_row(row)
        if task.status in (TaskStatus.COMPLETED, TaskStatus.FAILED):
            raise ConflictError(
                f"Task '{task_id}' is already {task.status.value} and can no longer be cancelled",
                param="task_id",
            )
        return task

    # -- results housekeeping ----------------------------------------------

    def expired_results(self, limit: int = 500) -> list[tuple[str, list[str]]]:
        query = (
            select(tasks.c.id, tasks.c.result_keys)
            .where(
                tasks.c.results_purged.is_(False),
                tasks.c.results_expire_at <= self.clock.now(),
            )
            .limit(limit)
        )
        with self._read() as conn:
            return [(row.id, list(row.result_keys or [])) for row in conn.execute(query)]

    def mark_results_purged(self, task_ids: Sequence[str]) -> None:
        if not task_ids:
            return
        with self._write() as conn:
            conn.execute(update(tasks).where(tasks.c.id.in_(task_ids)).values(results_purged=True))

    def _update_leased(self, task_id: str, worker_id: str, **values: Any) -> bool:
        statement = (
            update(tasks)
            .where(
                tasks.c.id == task_id,
                tasks.c.status == _PROCESSING,
                tasks.c.lease_owner == worker_id,
            )
            .values(**values)
        )
        with self._write() as conn:
            return conn.execute(statement).rowcount == 1

    def _finish(self, task_id: str, worker_id: str, status: TaskStatus, **values: Any) -> bool:
        """Move a leased task to a terminal state and queue its callback, in one
        transaction; False if the lease was lost."""
        now = self.clock.now()
        statement = (
            update(tasks)
            .where(
                tasks.c.id == task_id,
                tasks.c.status == _PROCESSING,
                tasks.c.lease_owner == worker_id,
            )
            .values(
                status=status.value,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
                **values,
            )
            .returning(tasks.c.params)
        )
        with self._write() as conn:
            row = conn.execute(statement).first()
            if row is not None:
                outbox.enqueue(conn, task_id, row.params, now)
        return row is not None
