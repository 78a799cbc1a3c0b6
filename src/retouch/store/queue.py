"""The task table as the queue: creating, claiming, leasing, finishing.

Every state change is one conditional statement (`UPDATE … WHERE status = …
AND lease_owner = …`), so an illegal transition simply matches no row, on
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from retouch.accounts import (
    IDEMPOTENCY_TTL_SECONDS,
    Admission,
    QueueFull,
    TooManyUnfinished,
    to_credits,
    to_units,
)
from retouch.errors import ConflictError, InsufficientQuotaError, NotFoundError, RateLimitError
from retouch.store import ledger, notify, outbox
from retouch.store.base import StoreBase
from retouch.store.rows import error_values, task_from_row
from retouch.store.schema import accounts, idempotency_keys, tasks
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
        tasks.c.priority_at < bindparam("priority_at", type_=tasks.c.priority_at.type),
        and_(
            tasks.c.priority_at == bindparam("priority_at", type_=tasks.c.priority_at.type),
            tasks.c.id < bindparam("task_id"),
        ),
    ),
)
_PENDING = TaskStatus.PENDING.value
_PROCESSING = TaskStatus.PROCESSING.value
_UNFINISHED = (_PENDING, _PROCESSING)
_CANCEL_REQUESTED = tasks.c.cancel_requested.is_(True)
_NOT_CANCELLED = tasks.c.cancel_requested.is_(False)
RATE_PERIOD_SECONDS = 60.0
_QUEUE_CAP_LOCK = 0x7265746F7571  # any constant, distinct from the migration lock


def _admit_rate(tat: datetime | None, per_minute: int, now: datetime) -> datetime:
    """The generic cell rate algorithm: `per_minute` tasks may come in a burst, then
    one every 60/`per_minute` seconds. Returns the limiter's next state, or raises
    with the exact time until a request would pass."""
    interval = RATE_PERIOD_SECONDS / per_minute
    arrival = max(tat or now, now)
    wait = (arrival - now).total_seconds() - (RATE_PERIOD_SECONDS - interval)
    if wait > 1e-6:
        raise RateLimitError(
            f"Rate limit exceeded: this account may create {per_minute} tasks per minute",
            retry_after=wait,
        )
    return arrival + timedelta(seconds=interval)


def _stale_leases(
    now: datetime,
    *,
    all_leases: bool,
    only: Mapping[str, datetime] | None,
    owner: str | None,
) -> ColumnElement[bool]:
    """The running tasks `reap_expired_leases` takes back (see there)."""
    stale = tasks.c.status == _PROCESSING
    if owner is not None:
        stale = and_(stale, tasks.c.lease_owner == owner)
    elif not all_leases:
        stale = and_(stale, tasks.c.lease_expires_at < now)
    if only is not None:
        named = (
            and_(tasks.c.id == task_id, tasks.c.lease_expires_at == expiry)
            for task_id, expiry in only.items()
        )
        stale = and_(stale, or_(*named))
    return stale


def _given_up(max_attempts: int) -> TaskError:
    return TaskError(
        code=500,
        type="internal_server_error",
        message=(
            f"the worker running this task stopped {max_attempts} time(s) "
            "before it finished; the task was given up"
        ),
    )


class TaskQueue(StoreBase):
    """Tasks from creation to a final state, with the leases workers hold on them."""

    # -- creating and reading tasks -----------------------------------------

    def create_task(self, task: Task, admission: Admission | None = None) -> tuple[Task, bool]:
        """Admit, reserve and enqueue a task in one transaction. Returns the task and
        whether it is an earlier one replayed for the same `Idempotency-Key`."""
        try:
            return self._create_task(task, admission)
        except IntegrityError:
            if admission is None or admission.idempotency_key is None:
                raise
            # A concurrent request with the same Idempotency-Key committed first.
            return self._create_task(task, admission)

    def _create_task(self, task: Task, admission: Admission | None) -> tuple[Task, bool]:
        now = self.clock.now()
        task = replace(task, priority_at=task.priority_at or task.created_at)
        units = to_units(task.credits_reserved)
        with self._write() as conn:
            # The account's row lock orders its creates: a request racing another with
            # the same Idempotency-Key waits here, then finds the first one's task.
            account = conn.execute(
                select(accounts).where(accounts.c.id == task.account_id).with_for_update()
            ).one()
            if admission is not None and admission.idempotency_key is not None:
                earlier = self._replay(conn, task, admission, now)
                if earlier is not None:
                    return earlier, True
            rate_tat = None
            if admission is not None:
                rate_tat = _admit_rate(account.rate_tat, admission.requests_per_minute, now)
                self._admit_capacity(conn, task.account_id, admission)
            available = account.balance_units - account.reserved_units
            if units > available:
                raise InsufficientQuotaError(
                    f"Insufficient credits: this task needs {task.credits_reserved} and the "
                    f"account has {to_credits(available)} available",
                    fallback_suggestion="ask the operator to add credits, or lower `n`",
                )
            conn.execute(
                insert(tasks).values(
                    id=task.id,
                    key_id=task.key_id,
                    account_id=task.account_id,
                    model=task.model,
                    status=task.status.value,
                    progress=task.progress,
                    params=task.params.to_json(),
                    user_group=task.user_group,
                    credits_reserved=task.credits_reserved,
                    created_at=task.created_at,
                    priority_at=task.priority_at,
                    attempts=0,
                    cancel_requested=False,
                    results_purged=False,
                    base_url=task.base_url,
                )
            )
            ledger.reserve(conn, task.account_id, task.id, units, now)
            notify.announce_task(conn)
            if rate_tat is not None:
                conn.execute(
                    update(accounts)
                    .where(accounts.c.id == task.account_id)
                    .values(rate_tat=rate_tat)
                )
            if admission is not None and admission.idempotency_key is not None:
                conn.execute(
                    insert(idempotency_keys).values(
                        key_id=task.key_id,
                        idempotency_key=admission.idempotency_key,
                        fingerprint=admission.fingerprint,
                        task_id=task.id,
                        created_at=now,
                        expires_at=now + timedelta(seconds=IDEMPOTENCY_TTL_SECONDS),
                    )
                )
        return task, False

    def _replay(
        self, conn: Connection, task: Task, admission: Admission, now: datetime
    ) -> Task | None:
        """The task an earlier request with this Idempotency-Key created, if any."""
        same_key = and_(
            idempotency_keys.c.key_id == task.key_id,
            idempotency_keys.c.idempotency_key == admission.idempotency_key,
        )
        conn.execute(delete(idempotency_keys).where(same_key, idempotency_keys.c.expires_at <= now))
        seen = conn.execute(
            select(idempotency_keys.c.fingerprint, idempotency_keys.c.task_id).where(same_key)
        ).first()
        if seen is None:
            return None
        if seen.fingerprint != admission.fingerprint:
            raise ConflictError(
                "This Idempotency-Key was already used with a different request body; "
                "use a new key for a different request",
                param="Idempotency-Key",
            )
        return task_from_row(conn.execute(_TASK_BY_ID, {"task_id": seen.task_id}).one())

    def _admit_capacity(self, conn: Connection, account_id: str, admission: Admission) -> None:
        """The account's and the server's limits on unfinished tasks."""
        unfinished = conn.execute(
            select(func.count()).where(
                tasks.c.account_id == account_id, tasks.c.status.in_(_UNFINISHED)
            )
        ).scalar_one()
        if unfinished >= admission.max_concurrent_tasks:
            raise TooManyUnfinished(admission.max_concurrent_tasks)
        if conn.dialect.name == "postgresql":
            # Creates of different accounts count the server's tasks one at a time
            # (SQLite's write lock already does that), so the cap holds exactly.
            conn.execute(select(func.pg_advisory_xact_lock(_QUEUE_CAP_LOCK)))
        counts: dict[str, int] = dict(
            conn.execute(
                select(tasks.c.status, func.count())
                .where(tasks.c.status.in_(_UNFINISHED))
                .group_by(tasks.c.status)
            ).all()
        )
        total = sum(counts.values())
        if total >= admission.max_queued_tasks:
            raise QueueFull(total, counts.get(_PROCESSING, 0), admission.max_queued_tasks)

    def unfinished_tasks(self, account_id: str) -> list[Task]:
        query = select(tasks).where(
            tasks.c.account_id == account_id, tasks.c.status.in_(_UNFINISHED)
        )
        with self._read() as conn:
            return [task_from_row(row) for row in conn.execute(query)]

    def purge_idempotency_keys(self) -> int:
        """Forget Idempotency-Keys older than 24 hours."""
        with self._write() as conn:
            statement = delete(idempotency_keys).where(
                idempotency_keys.c.expires_at <= self.clock.now()
            )
            return int(conn.execute(statement).rowcount)

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
        priority_at, task_id = task.queue_order
        values = {"priority_at": priority_at, "task_id": task_id}
        with self._read() as conn:
            return int(conn.execute(_QUEUE_AHEAD, values).scalar_one())

    def recent_task_seconds(self, model: str, sample: int = 20) -> float | None:
        """Mean run time of the last completed tasks of this model, if any: from the
        start of their (last) run on the engine, not from their claim, which may have
        come a whole edit earlier (older tasks: from the claim)."""
        recent = (
            select(tasks.c.started_at, tasks.c.run_started_at, tasks.c.finished_at)
            .where(tasks.c.model == model, tasks.c.status == TaskStatus.COMPLETED.value)
            .order_by(tasks.c.finished_at.desc())
            .limit(sample)
        )
        with self._read() as conn:
            rows = conn.execute(recent).all()
        durations = [
            (row.finished_at - (row.run_started_at or row.started_at)).total_seconds()
            for row in rows
            if (row.run_started_at or row.started_at) is not None and row.finished_at is not None
        ]
        return sum(durations) / len(durations) if durations else None

    def tasks_in_hand(self, model: str) -> list[Task]:
        """The model's processing tasks: running on an engine, finishing, or claimed
        ahead and waiting for one (few: at most three per worker)."""
        query = select(tasks).where(tasks.c.model == model, tasks.c.status == _PROCESSING)
        with self._read() as conn:
            return [task_from_row(row) for row in conn.execute(query)]

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
            .order_by(tasks.c.priority_at, tasks.c.id)
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
                lease_seconds=lease_seconds,
                attempts=tasks.c.attempts + 1,
                started_at=func.coalesce(tasks.c.started_at, now),
                run_started_at=None,
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

    def mark_running(self, task_id: str, worker_id: str) -> bool:
        """The engine starts the task's run now; False when the lease was lost."""
        return self._update_leased(task_id, worker_id, run_started_at=self.clock.now())

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
        """Complete a leased task with its results; False if the lease was lost or a
        cancel was requested meanwhile (the worker then cancels it and drops them)."""
        return self._finish(
            task_id,
            worker_id,
            TaskStatus.COMPLETED,
            _NOT_CANCELLED,
            progress=100,
            result_keys=list(result_keys),
            results_expire_at=expires_at,
        )

    def fail(self, task_id: str, worker_id: str, error: TaskError) -> bool:
        # A failed task's progress is 0, as in the seed's callbacks.
        return self._finish(
            task_id, worker_id, TaskStatus.FAILED, progress=0, **error_values(error)
        )

    def cancel_running(self, task_id: str, worker_id: str) -> bool:
        """Cancel a leased task whose cancel was requested; nothing is charged."""
        return self._finish(task_id, worker_id, TaskStatus.CANCELLED, _CANCEL_REQUESTED)

    def release(self, task_id: str, worker_id: str) -> bool:
        """Give a task back to the queue without counting the attempt (shutdown); one
        whose cancel was requested is cancelled instead, never queued again."""
        released = self._update_leased(
            task_id,
            worker_id,
            _NOT_CANCELLED,
            announce=True,
            status=_PENDING,
            progress=0,
            lease_owner=None,
            lease_expires_at=None,
            attempts=tasks.c.attempts - 1,
        )
        return released or self.cancel_running(task_id, worker_id)

    def expired_leases(self) -> dict[str, tuple[datetime, float | None]]:
        """The running tasks whose lease has expired by this clock: the expiry and
        the length of each lease (None for a lease taken before that was kept)."""
        query = select(tasks.c.id, tasks.c.lease_expires_at, tasks.c.lease_seconds).where(
            tasks.c.status == _PROCESSING, tasks.c.lease_expires_at < self.clock.now()
        )
        with self._read() as conn:
            return {
                row.id: (row.lease_expires_at, row.lease_seconds) for row in conn.execute(query)
            }

    def reap_expired_leases(
        self,
        max_attempts: int,
        *,
        all_leases: bool = False,
        only: Mapping[str, datetime] | None = None,
        owner: str | None = None,
    ) -> int:
        """Put tasks whose worker vanished back in the queue, fail them once they
        have used up their attempts, or cancel them when a cancel was requested
        (settled and called back like any ending). `all_leases` takes over every lease
        (the embedded server at start-up: no other worker can exist); `only`
        limits it to these tasks, each if its lease still expires when it did
        (renewed meanwhile, it is not taken); `owner` takes every lease of a
        worker known to be dead, expired or not."""
        if only is not None and not only:
            return 0
        now = self.clock.now()
        stale = _stale_leases(now, all_leases=all_leases, only=only, owner=owner)
        ended_values = {"finished_at": now, "lease_owner": None, "lease_expires_at": None}
        # A cancel requested before the worker vanished ends the task: it is neither
        # queued again nor failed for its attempts, as its worker would have done.
        cancelled = (
            update(tasks)
            .where(stale, _CANCEL_REQUESTED)
            .values(status=TaskStatus.CANCELLED.value, **ended_values)
        )
        # A cancel requested while this runs leaves its task to the next reap (it is
        # still leased, and expired), which cancels it.
        stale = and_(stale, _NOT_CANCELLED)
        exhausted = (
            update(tasks)
            .where(stale, tasks.c.attempts >= max_attempts)
            .values(
                status=TaskStatus.FAILED.value,
                progress=0,
                **ended_values,
                **error_values(_given_up(max_attempts)),
            )
        )
        requeue = (
            update(tasks)
            .where(stale, tasks.c.attempts < max_attempts)
            .values(status=_PENDING, progress=0, lease_owner=None, lease_expires_at=None)
        )
        with self._write() as conn:
            ended = [
                *conn.execute(cancelled.returning(tasks.c.id, tasks.c.params)),
                *conn.execute(exhausted.returning(tasks.c.id, tasks.c.params)),
            ]
            # Nothing was produced: the whole reservation goes back, then the callback.
            for row in sorted(ended, key=lambda row: row.id):
                ledger.settle(conn, row.id, 0, now)
                outbox.enqueue(conn, row.id, row.params, now)
            requeued = conn.execute(requeue).rowcount
            if requeued:
                notify.announce_task(conn)
        return len(ended) + int(requeued)

    # -- the client's side ---------------------------------------------------

    def request_cancel(self, task_id: str, key_id: str) -> Task:
        """Cancel a pending task at once; flag a running one for its worker."""
        now = self.clock.now()
        mine = and_(tasks.c.id == task_id, tasks.c.key_id == key_id)
        with self._write() as conn:
            cancelled = conn.execute(
                update(tasks)
                .where(mine, tasks.c.status == _PENDING)
                .values(
                    status=TaskStatus.CANCELLED.value,
                    finished_at=now,
                    cancel_requested=True,
                    # Never run, it has no results to sweep; one requeued after its
                    # worker vanished may have some left (`abandoned_results`).
                    results_purged=tasks.c.attempts == 0,
                )
                .returning(tasks.c.params)
            ).first()
            if cancelled is not None:
                ledger.settle(conn, task_id, 0, now)
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

    def expired_results(self, limit: int = 500, after: str | None = None) -> list[str]:
        """Completed tasks whose results have expired, not yet purged, in the order of
        their ids from `after` on (a sweep goes on past a task it could not purge)."""
        return self._task_ids(
            and_(
                tasks.c.results_purged.is_(False),
                tasks.c.results_expire_at <= self.clock.now(),
            ),
            limit,
            after,
        )

    def abandoned_results(self, limit: int = 500, after: str | None = None) -> list[str]:
        """Tasks that ended without results after a worker had run them (failed or
        cancelled), not yet swept: an attempt killed while storing its images may
        have left some. In the order of their ids from `after` on."""
        return self._task_ids(
            and_(
                tasks.c.results_purged.is_(False),
                tasks.c.status.in_((TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)),
                tasks.c.attempts > 0,
            ),
            limit,
            after,
        )

    def _task_ids(self, condition: ColumnElement[bool], limit: int, after: str | None) -> list[str]:
        if after is not None:
            condition = and_(condition, tasks.c.id > after)
        query = select(tasks.c.id).where(condition).order_by(tasks.c.id).limit(limit)
        with self._read() as conn:
            return list(conn.scalars(query))

    def mark_results_purged(self, task_ids: Sequence[str]) -> None:
        if not task_ids:
            return
        with self._write() as conn:
            conn.execute(update(tasks).where(tasks.c.id.in_(task_ids)).values(results_purged=True))

    def _update_leased(
        self,
        task_id: str,
        worker_id: str,
        *conditions: Any,
        announce: bool = False,
        **values: Any,
    ) -> bool:
        statement = (
            update(tasks)
            .where(
                tasks.c.id == task_id,
                tasks.c.status == _PROCESSING,
                tasks.c.lease_owner == worker_id,
                *conditions,
            )
            .values(**values)
        )
        with self._write() as conn:
            changed = conn.execute(statement).rowcount == 1
            if changed and announce:
                notify.announce_task(conn)
            return changed

    def _finish(
        self, task_id: str, worker_id: str, status: TaskStatus, *conditions: Any, **values: Any
    ) -> bool:
        """Move a leased task to a terminal state and queue its callback, in one
        transaction; False if the lease was lost (or `conditions` do not hold)."""
        now = self.clock.now()
        statement = (
            update(tasks)
            .where(
                tasks.c.id == task_id,
                tasks.c.status == _PROCESSING,
                tasks.c.lease_owner == worker_id,
                *conditions,
            )
            .values(
                status=status.value,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
                **values,
            )
            .returning(tasks.c.params, tasks.c.result_keys)
        )
        with self._write() as conn:
            row = conn.execute(statement).first()
            if row is not None:
                # Billing is final before the callback is queued (the seed's order).
                ledger.settle(conn, task_id, len(row.result_keys or []), now)
                outbox.enqueue(conn, task_id, row.params, now)
        return row is not None
