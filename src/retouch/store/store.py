"""The store: tasks and keys behind one small typed seam.

The task table is the queue. Every state change is one conditional statement
(`UPDATE … WHERE status = … AND lease_owner = …`), so an illegal transition
simply matches no row, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    bindparam,
    create_engine,
    event,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.pool import ConnectionPoolEntry

from retouch.clock import Clock, SystemClock
from retouch.errors import ConflictError, InvalidRequestError, NotFoundError
from retouch.keys import ApiKey, display_prefix, generate_secret, hash_secret, new_key_id
from retouch.store import outbox
from retouch.store.schema import api_keys, callback_deliveries, tasks
from retouch.tasks import EditParams, Task, TaskError, TaskStatus

SQLITE_POOL_SIZE = 48

# The statements of the hot read paths, built once (building one costs as much as
# running it on SQLite).
_KEY_BY_HASH = select(api_keys).where(api_keys.c.key_hash == bindparam("key_hash"))
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


def create_db_engine(url: str) -> Engine:
    """An engine tuned for the backend: SQLite gets WAL, a busy timeout and
    `BEGIN IMMEDIATE` for writes, so concurrent writers queue instead of failing."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    # One pooled connection per thread that may run a query (the API's thread pool
    # is 40): connections beyond the pool would be opened and closed per request.
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=SQLITE_POOL_SIZE,
        max_overflow=SQLITE_POOL_SIZE,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun below
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "busy_timeout=30000",
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


class Store:
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

    @property
    def reads_never_wait(self) -> bool:
        """SQLite in WAL mode: a read never waits for a writer and takes microseconds,
        less than handing it to a worker thread."""
        return self._reuse_connections

    @classmethod
    def from_url(cls, url: str, clock: Clock | None = None) -> Store:
        return cls(create_db_engine(url), clock)

    def close(self) -> None:
        with self._lock:
            for _thread, conn in self._connections:
                conn.close()
            self._connections.clear()
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        if not self._reuse_connections:
            with self.engine.begin() as pooled:
                yield pooled
            return
        conn = self._thread_connection("writer")
        with conn.begin():  # BEGIN IMMEDIATE; COMMIT, or ROLLBACK on an exception
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        if not self._reuse_connections:
            with self.engine.connect() as pooled, pooled.begin():
                yield pooled
            return
        conn = self._thread_connection("reader")
        try:
            yield conn
        finally:
            conn.rollback()  # ends SQLAlchemy's transaction; nothing is open in SQLite

    def _thread_connection(self, role: str) -> Connection:
        """This thread's own SQLite connection for reads (autocommit) or writes."""
        conn: Connection | None = getattr(self._local, role, None)
        if conn is None or conn.closed:
            conn = self.engine.connect()
            if role == "reader":
                conn.execution_options(retouch_readonly=True)
            setattr(self._local, role, conn)
            self._register(conn)
        return conn

    def _register(self, conn: Connection) -> None:
        """Remember a thread's connection; close those of threads that have ended."""
        with self._lock:
            alive = []
            for thread_ref, known in self._connections:
                thread = thread_ref()
                if thread is not None and thread.is_alive():
                    alive.append((thread_ref, known))
                else:
                    known.close()
            alive.append((weakref.ref(threading.current_thread()), conn))
            self._connections = alive

    # -- keys ---------------------------------------------------------------

    def create_key(self, name: str, user_group: str = "default") -> tuple[ApiKey, str]:
        """Create a key; the secret is returned here and never again."""
        secret = generate_secret()
        key = ApiKey(
            id=new_key_id(),
            name=name,
            prefix=display_prefix(secret),
            user_group=user_group,
            created_at=self.clock.now(),
        )
        with self._write() as conn:
            conn.execute(
                insert(api_keys).values(
                    id=key.id,
                    name=key.name,
                    key_hash=hash_secret(secret),
                    prefix=key.prefix,
                    user_group=key.user_group,
                    created_at=key.created_at,
                )
            )
        return key, secret

    def list_keys(self) -> list[ApiKey]:
        with self._read() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [_key_from_row(row) for row in rows]

    def find_active_key(self, secret: str) -> ApiKey | None:
        """The key this secret belongs to, unless it is unknown or revoked."""
        with self._read() as conn:
            row = conn.execute(_KEY_BY_HASH, {"key_hash": hash_secret(secret)}).first()
        if row is None or row.revoked_at is not None:
            return None
        return _key_from_row(row)

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self.clock.now())
            )
        return result.rowcount == 1

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
        return None if row is None else _task_from_row(row)

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
        return None if row is None else _task_from_row(row)

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
        return self._finish(task_id, worker_id, TaskStatus.FAILED, **_error_values(error))

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
                **_error_values(
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
        task = _task_from_row(row)
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

    # -- helpers ------------------------------------------------------------

    def _any(self, condition: Any) -> bool:
        """Whether a row matches: a cheap read before a claim that would take a write lock."""
        with self._read() as conn:
            return bool(conn.execute(select(exists().where(condition))).scalar())

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

    # -- callback deliveries ---------------------------------------------------

    def claim_due_deliveries(self, limit: int, lock_seconds: float) -> list[outbox.Delivery]:
        """Deliveries whose next attempt is due, locked for `lock_seconds` so that
        no other dispatcher sends them meanwhile."""
        now = self.clock.now()
        is_due = and_(
            callback_deliveries.c.status == outbox.PENDING,
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
            return [outbox.delivery_from_row(row) for row in conn.execute(claim)]

    def record_attempt(
        self,
        delivery_id: str,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        """One more attempt: delivered, to be retried at `retry_at`, or given up."""
        now = self.clock.now()
        if delivered:
            status, finished = outbox.DELIVERED, now
        elif retry_at is None:
            status, finished = outbox.FAILED, now
        else:
            status, finished = outbox.PENDING, None
        with self._write() as conn:
            conn.execute(
                update(callback_deliveries)
                .where(callback_deliveries.c.id == delivery_id)
                .values(
                    status=status,
                    attempts=callback_deliveries.c.attempts + 1,
                    last_status_code=status_code,
                    last_error=error,
                    next_attempt_at=retry_at,
                    locked_until=None,
                    finished_at=finished,
                )
            )

    def latest_delivery(self, task_id: str) -> outbox.Delivery | None:
        query = (
            select(callback_deliveries)
            .where(callback_deliveries.c.task_id == task_id)
            .order_by(callback_deliveries.c.created_at.desc(), callback_deliveries.c.id.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        return None if row is None else outbox.delivery_from_row(row)

    def redeliver(self, task_id: str, key_id: str) -> Task:
        """Queue a new delivery (a new `webhook-id`) for a finished task's callback."""
        with self._write() as conn:
            row = conn.execute(
                select(tasks).where(tasks.c.id == task_id, tasks.c.key_id == key_id)
            ).first()
            if row is None:
                raise NotFoundError(f"No task found with id '{task_id}'", param="task_id")
            task = _task_from_row(row)
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
            outbox.enqueue(conn, task_id, row.params, self.clock.now())
        return task


def _error_values(error: TaskError) -> dict[str, Any]:
    return {
        "error_code": error.code,
        "error_type": error.type,
        "error_message": error.message,
        "error_param": error.param,
    }


def _key_from_row(row: Row[Any]) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        user_group=row.user_group,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _task_from_row(row: Row[Any]) -> Task:
    error = None
    if row.error_type is not None:
        error = TaskError(
            code=row.error_code,
            type=row.error_type,
            message=row.error_message,
            param=row.error_param,
        )
    return Task(
        id=row.id,
        key_id=row.key_id,
        model=row.model,
        status=TaskStatus(row.status),
        progress=row.progress,
        params=EditParams.from_json(row.params),
        created_at=row.created_at,
        user_group=row.user_group,
        credits_reserved=row.credits_reserved,
        attempts=row.attempts,
        cancel_requested=bool(row.cancel_requested),
        started_at=row.started_at,
        finished_at=row.finished_at,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        error=error,
        result_keys=list(row.result_keys or []),
        results_expire_at=row.results_expire_at,
    )
