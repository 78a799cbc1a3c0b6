"""The store contract, run on every backend (SQLite; PostgreSQL where configured)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, event, inspect, select, text, update

from retouch.accounts import EntryKind
from retouch.clock import FakeClock
from retouch.errors import ConflictError, NotFoundError
from retouch.janitor import Janitor
from retouch.keys import ApiKey
from retouch.storage import LocalResultStorage
from retouch.store import Store, create_db_engine, migrate
from retouch.store.base import QUERY_THREADS
from retouch.store.migrate import alembic_config
from retouch.store.schema import metadata, tasks
from retouch.tasks import EditParams, Task, TaskError, TaskStatus
from tests.support import pending_task

LEASE = 30.0


def make_task(
    store: Store, key: ApiKey, offset_seconds: float = 0.0, callback_url: str | None = None
) -> Task:
    now = store.clock.now() + timedelta(seconds=offset_seconds)
    params = EditParams(
        prompt="edit",
        image_urls=["https://example.com/a.png"],
        n=2,
        seed=7,
        callback_url=callback_url,
    )
    task = pending_task(key, now, params, credits=2.0)
    return store.create_task(task)[0]


def settlement(store: Store, task: Task) -> list[EntryKind]:
    """The kinds of the task's ledger entries, oldest first."""
    entries = reversed(store.ledger(task.account_id))
    return [entry.kind for entry in entries if entry.task_id == task.id]


def results_purged(engine: Any) -> dict[str, bool]:
    with engine.connect() as conn:
        rows = conn.execute(select(tasks.c.id, tasks.c.results_purged)).all()
    return {row.id: bool(row.results_purged) for row in rows}


@pytest.fixture
def key(store: Store) -> ApiKey:
    return store.create_key("alice")[0]


def test_migrate_is_idempotent(store: Store) -> None:
    migrate(store.engine)
    tables = set(inspect(store.engine).get_table_names())
    assert {"api_keys", "tasks", "alembic_version"} <= tables


def test_keys_are_stored_hashed_and_found_by_secret(store: Store) -> None:
    key, secret = store.create_key("bob", user_group="vip")
    assert secret.startswith("rt_") and len(secret) > 40
    found = store.find_active_key(secret)
    assert found == key
    assert store.find_active_key(secret + "x") is None
    with store.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT key_hash, prefix FROM api_keys").all()
    assert all(secret not in (row[0], row[1]) for row in stored)


def test_revoked_key_is_not_found(store: Store) -> None:
    key, secret = store.create_key("carol")
    assert store.revoke_key(key.id)
    assert store.find_active_key(secret) is None
    assert not store.revoke_key(key.id)
    assert [k.active for k in store.list_keys()] == [False]


def test_task_round_trip(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    loaded = store.get_task(task.id, key.id)
    assert loaded == task
    assert loaded.created_at.tzinfo is not None


def test_another_keys_task_is_invisible(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    other = store.create_key("mallory")[0]
    assert store.get_task(task.id, other.id) is None
    with pytest.raises(NotFoundError):
        store.request_cancel(task.id, other.id)
    assert store.get_task(task.id, key.id).status is TaskStatus.PENDING  # type: ignore[union-attr]


def test_claim_takes_oldest_first_and_leases_it(store: Store, key: ApiKey) -> None:
    second = make_task(store, key, offset_seconds=1)
    first = make_task(store, key)
    claimed = store.claim_next("w1", LEASE)
    assert claimed is not None and claimed.id == first.id
    assert claimed.status is TaskStatus.PROCESSING
    assert claimed.lease_owner == "w1" and claimed.attempts == 1
    assert claimed.lease_expires_at == store.clock.now() + timedelta(seconds=LEASE)
    assert store.claim_next("w2", LEASE).id == second.id  # type: ignore[union-attr]
    assert store.claim_next("w3", LEASE) is None


def test_concurrent_claims_never_share_a_task(store: Store, key: ApiKey) -> None:
    tasks = {make_task(store, key, offset_seconds=i).id for i in range(20)}
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all(worker: str) -> None:
        while (task := store.claim_next(worker, LEASE)) is not None:
            with lock:
                claimed.append(task.id)

    threads = [threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(tasks)


def test_progress_and_finish_require_the_lease(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    assert store.set_progress(task.id, "w1", 40, LEASE)
    assert not store.set_progress(task.id, "intruder", 90, LEASE)
    assert not store.complete(task.id, "intruder", ["x"], store.clock.now())
    assert store.get_task(task.id).progress == 40  # type: ignore[union-attr]
    expires = store.clock.now() + timedelta(hours=24)
    keys = [f"{task.id}/0.png", f"{task.id}/1.png"]
    assert store.complete(task.id, "w1", keys, expires)
    done = store.get_task(task.id)
    assert done is not None and done.status is TaskStatus.COMPLETED
    assert (done.progress, done.result_keys, done.results_expire_at) == (100, keys, expires)
    assert done.lease_owner is None and done.finished_at == store.clock.now()
    # A finished task cannot be finished again, by anyone.
    assert not store.complete(task.id, "w1", keys, expires)
    assert not store.fail(task.id, "w1", TaskError(500, "internal_server_error", "late"))


def test_fail_records_the_error(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    error = TaskError(400, "invalid_request_error", "the image is 200x180", "image_urls[0]")
    assert store.fail(task.id, "w1", error)
    failed = store.get_task(task.id)
    assert failed is not None and failed.status is TaskStatus.FAILED and failed.error == error


def test_cancel_pending_is_immediate(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    cancelled = store.request_cancel(task.id, key.id)
    assert cancelled.status is TaskStatus.CANCELLED and not cancelled.can_cancel
    assert store.claim_next("w1", LEASE) is None
    # Cancelling again is harmless.
    assert store.request_cancel(task.id, key.id).status is TaskStatus.CANCELLED


def test_cancel_running_flags_it_for_the_worker(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    assert not store.should_stop(task.id, "w1")
    flagged = store.request_cancel(task.id, key.id)
    assert flagged.status is TaskStatus.PROCESSING and flagged.cancel_requested
    assert not flagged.can_cancel
    assert store.should_stop(task.id, "w1")
    assert store.cancel_running(task.id, "w1")
    assert store.get_task(task.id).status is TaskStatus.CANCELLED  # type: ignore[union-attr]


def test_a_task_whose_cancel_was_requested_cannot_be_completed(store: Store, key: ApiKey) -> None:
    """A cancel that comes in while the worker stores its results wins: completing
    is refused (the worker then cancels it), so nothing is charged."""
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    assert not store.cancel_running(task.id, "w1"), "no cancel was requested"
    store.request_cancel(task.id, key.id)
    expires = store.clock.now() + timedelta(hours=24)
    assert not store.complete(task.id, "w1", [f"{task.id}/0-0123abcd.png"], expires)
    flagged = store.get_task(task.id)
    assert flagged is not None and flagged.status is TaskStatus.PROCESSING
    assert store.cancel_running(task.id, "w1")
    cancelled = store.get_task(task.id)
    assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED
    assert cancelled.result_keys == [] and cancelled.results_expire_at is None
    assert settlement(store, task) == [EntryKind.RESERVE, EntryKind.RELEASE]


def test_handing_back_a_task_whose_cancel_was_requested_cancels_it(
    store: Store, key: ApiKey
) -> None:
    task = make_task(store, key, callback_url="https://example.com/hook")
    store.claim_next("w1", LEASE)
    store.request_cancel(task.id, key.id)
    assert store.release(task.id, "w1")
    cancelled = store.get_task(task.id)
    assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED
    assert settlement(store, task) == [EntryKind.RESERVE, EntryKind.RELEASE]
    assert store.latest_delivery(task.id) is not None
    assert store.claim_next("w2", LEASE) is None
    assert not store.release(task.id, "w1")


def test_a_task_cancelled_before_it_ran_has_no_results_to_sweep(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    """Never run, a cancelled task is marked purged at once: the janitor's scan for
    abandoned results does not grow with them. One that ran before its worker
    vanished, then was cancelled while queued again, may have left some."""
    never_ran = make_task(store, key)
    store.request_cancel(never_ran.id, key.id)
    ran = make_task(store, key, offset_seconds=1)
    store.claim_next("w1", LEASE)
    clock.advance(LEASE + 1)
    assert store.reap_expired_leases(max_attempts=3) == 1  # back in the queue
    store.request_cancel(ran.id, key.id)
    assert results_purged(store.engine) == {never_ran.id: True, ran.id: False}
    assert store.abandoned_results() == [ran.id]


def test_cancel_finished_task_conflicts(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    store.complete(task.id, "w1", [], store.clock.now())
    with pytest.raises(ConflictError, match="already completed"):
        store.request_cancel(task.id, key.id)


def test_lost_lease_means_should_stop(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    assert store.should_stop(task.id, "someone-else")


def test_expired_lease_is_requeued_then_failed_after_max_attempts(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    clock.advance(LEASE - 1)
    assert store.reap_expired_leases(max_attempts=2) == 0
    clock.advance(2)
    assert store.reap_expired_leases(max_attempts=2) == 1
    requeued = store.get_task(task.id)
    assert requeued is not None and requeued.status is TaskStatus.PENDING
    assert requeued.lease_owner is None and requeued.attempts == 1
    # The vanished worker can no longer write.
    assert not store.set_progress(task.id, "w1", 50, LEASE)
    store.claim_next("w2", LEASE)
    assert store.set_progress(task.id, "w2", 40, LEASE)
    clock.advance(LEASE + 1)
    assert store.reap_expired_leases(max_attempts=2) == 1
    failed = store.get_task(task.id)
    assert failed is not None and failed.status is TaskStatus.FAILED
    assert failed.error is not None and "stopped 2 time(s)" in failed.error.message
    assert failed.progress == 0  # a failed task's progress, as in the seed's callbacks


@pytest.mark.parametrize(
    ("how", "max_attempts"),
    [("expired", 3), ("expired-last-attempt", 1), ("dead-owner", 3), ("startup", 3)],
)
def test_a_reaped_task_whose_cancel_was_requested_ends_cancelled(
    store: Store, key: ApiKey, clock: FakeClock, how: str, max_attempts: int
) -> None:
    """Its worker vanished after the cancel was acknowledged: the task is not queued
    again (nor failed for its attempts) but cancelled, settled at nothing and
    called back, as its worker would have done."""
    task = make_task(store, key, callback_url="https://example.com/hook")
    store.claim_next("w1", LEASE)
    store.set_progress(task.id, "w1", 40, LEASE)
    store.request_cancel(task.id, key.id)
    clock.advance(LEASE + 1)
    if how == "dead-owner":
        assert store.reap_expired_leases(max_attempts, owner="w1") == 1
    elif how == "startup":
        assert store.reap_expired_leases(max_attempts, all_leases=True) == 1
    else:
        expiry = store.expired_leases()[task.id][0]
        assert store.reap_expired_leases(max_attempts, only={task.id: expiry}) == 1
    cancelled = store.get_task(task.id)
    assert cancelled is not None
    assert (cancelled.status, cancelled.error) == (TaskStatus.CANCELLED, None)
    assert (cancelled.lease_owner, cancelled.finished_at) == (None, clock.now())
    assert settlement(store, task) == [EntryKind.RESERVE, EntryKind.RELEASE]
    account = store.get_account(key.account_id)
    assert account.reserved == 0 and account.available == 100.0
    delivery = store.latest_delivery(task.id)
    assert delivery is not None and delivery.url == "https://example.com/hook"
    assert store.claim_next("w2", LEASE) is None
    assert store.reap_expired_leases(max_attempts, all_leases=True) == 0
    # Its worker ran it: what that attempt may have stored is swept.
    assert store.abandoned_results() == [task.id]


def test_reaping_named_leases_skips_those_renewed_since(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    """`only` takes back each named task only while its lease still expires when it
    did when named: a lease renewed in between stays with its worker."""
    dead, live, fresh = (make_task(store, key, offset) for offset in (0, 1, 2))
    for worker in ("dead", "live", "fresh"):
        store.claim_next(worker, LEASE)
    clock.advance(LEASE / 2)
    store.renew_lease(fresh.id, "fresh", LEASE)
    clock.advance(LEASE / 2 + 1)
    expired = store.expired_leases()
    assert set(expired) == {dead.id, live.id}  # `fresh` was renewed in time
    assert {length for _expiry, length in expired.values()} == {LEASE}
    assert store.renew_lease(live.id, "live", LEASE)
    assert store.reap_expired_leases(max_attempts=2, only={}) == 0
    named = {task_id: expiry for task_id, (expiry, _length) in expired.items()}
    assert store.reap_expired_leases(max_attempts=2, only=named) == 1
    found = [store.get_task(task.id) for task in (dead, live, fresh)]
    states = {task.id: (task.status, task.lease_owner) for task in found if task is not None}
    assert states == {
        dead.id: (TaskStatus.PENDING, None),
        live.id: (TaskStatus.PROCESSING, "live"),
        fresh.id: (TaskStatus.PROCESSING, "fresh"),
    }


def test_the_leases_of_a_worker_known_dead_are_taken_back_unexpired(
    store: Store, key: ApiKey
) -> None:
    dead, alive = make_task(store, key), make_task(store, key, 1)
    store.claim_next("dead", LEASE)
    store.claim_next("alive", LEASE)
    assert store.reap_expired_leases(max_attempts=2, owner="dead") == 1
    taken, kept = store.get_task(dead.id), store.get_task(alive.id)
    assert taken is not None and (taken.status, taken.lease_owner) == (TaskStatus.PENDING, None)
    assert kept is not None and (kept.status, kept.lease_owner) == (TaskStatus.PROCESSING, "alive")


def test_the_janitor_takes_back_a_lease_only_once_seen_expired_for_half_a_lease(
    store: Store, key: ApiKey, clock: FakeClock, tmp_path: Path
) -> None:
    """A clock stepped forward makes every lease look expired at once; the janitor
    takes a task back only after its lease has stayed expired, unrenewed, for half a
    lease of steady time. Live workers renew theirs within a third of a lease (the
    live one below), so only the dead worker's task goes back to the queue. The
    lease is the one its worker took (30 s), whatever the janitor's own setting."""
    steady = [0.0]
    storage = LocalResultStorage(tmp_path, b"k" * 32, clock)
    janitor = Janitor(
        store, storage, max_attempts=2, interval_seconds=60, lease_seconds=20 * LEASE,
        monotonic=lambda: steady[0],
    )  # fmt: skip
    dead, live = make_task(store, key), make_task(store, key, 1)
    store.claim_next("dead", LEASE)
    store.claim_next("live", LEASE)
    clock.advance(25 * 3600)  # the step forward
    assert janitor.reap_leases() == 0  # seen expired: not yet taken
    steady[0] += LEASE / 3
    assert store.renew_lease(live.id, "live", LEASE)  # its keeper's next renewal
    assert janitor.reap_leases() == 0
    steady[0] += LEASE / 6 - 0.1
    assert janitor.reap_leases() == 0  # a hair short of half a lease
    steady[0] += 0.1
    assert janitor.reap_leases() == 1
    taken, kept = store.get_task(dead.id), store.get_task(live.id)
    assert taken is not None and (taken.status, taken.attempts) == (TaskStatus.PENDING, 1)
    assert kept is not None and (kept.status, kept.lease_owner) == (TaskStatus.PROCESSING, "live")
    # The live worker stops renewing (it died too): half a lease after its lease
    # expired it is taken back as well.
    clock.advance(LEASE + 1)
    assert janitor.reap_leases() == 0
    steady[0] += LEASE / 2
    assert janitor.reap_leases() == 1
    assert store.get_task(live.id).status is TaskStatus.PENDING  # type: ignore[union-attr]
    # A lease taken before leases kept their length: judged by the janitor's own.
    old = store.claim_next("old", LEASE)
    assert old is not None
    with store.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == old.id).values(lease_seconds=None))
    clock.advance(LEASE + 1)
    assert janitor.reap_leases() == 0
    steady[0] += LEASE / 2
    assert janitor.reap_leases() == 0
    steady[0] += 10 * LEASE - LEASE / 2
    assert janitor.reap_leases() == 1


def test_take_over_all_leases_at_startup(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    assert store.reap_expired_leases(max_attempts=3, all_leases=True) == 1
    assert store.get_task(task.id).status is TaskStatus.PENDING  # type: ignore[union-attr]


def test_release_does_not_count_the_attempt(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    assert store.release(task.id, "w1")
    released = store.get_task(task.id)
    assert released is not None and released.status is TaskStatus.PENDING
    assert released.attempts == 0


def test_queue_position_and_recent_durations(store: Store, key: ApiKey, clock: FakeClock) -> None:
    first = make_task(store, key)
    second = make_task(store, key, offset_seconds=1)
    assert store.queue_position(first) == 0
    assert store.queue_position(second) == 1
    assert store.recent_task_seconds("qwen-image-edit") is None
    store.claim_next("w1", LEASE)
    clock.advance(12)
    store.complete(first.id, "w1", [], clock.now())
    assert store.recent_task_seconds("qwen-image-edit") == pytest.approx(12)


def test_run_times_count_from_the_engines_start_not_the_claim(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    """A task is claimed ahead while the one before runs: its run time starts when
    the engine takes it, and a run handed back and claimed again starts afresh."""
    task = make_task(store, key)
    claimed = store.claim_next("w1", LEASE)
    assert claimed is not None and claimed.run_started_at is None
    assert [t.id for t in store.tasks_in_hand("qwen-image-edit")] == [task.id]
    clock.advance(10)  # waiting for the engine
    assert store.mark_running(task.id, "w1")
    assert not store.mark_running(task.id, "w2")  # not its lease
    clock.advance(3)
    assert store.release(task.id, "w1")  # handed back mid-run
    again = store.claim_next("w2", LEASE)
    assert again is not None and again.run_started_at is None
    clock.advance(5)
    assert store.mark_running(task.id, "w2")
    started = store.get_task(task.id)
    assert started is not None and started.run_started_at == clock.now()
    clock.advance(2)
    assert store.complete(task.id, "w2", [], clock.now())
    assert store.recent_task_seconds("qwen-image-edit") == pytest.approx(2)
    assert store.tasks_in_hand("qwen-image-edit") == []


def test_recent_durations_are_read_from_an_index_without_a_sort(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    """The wait estimate's query (every few seconds per model) walks the index on
    (model, status, finished_at) backwards instead of sorting every completed task."""
    indexes = {
        index["name"]: index["column_names"] for index in inspect(store.engine).get_indexes("tasks")
    }
    assert indexes["ix_tasks_model_finished"] == ["model", "status", "finished_at"]
    for offset in range(3):
        task = make_task(store, key, offset_seconds=offset)
        store.claim_next("w1", LEASE)
        clock.advance(10)
        store.complete(task.id, "w1", [], clock.now())
    seen: list[tuple[str, Any]] = []

    def record(_conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "finished_at DESC" in statement:
            seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        assert store.recent_task_seconds("qwen-image-edit") == pytest.approx(10)
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    [(statement, parameters)] = seen
    with store.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            explain = "EXPLAIN QUERY PLAN "
        else:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a tiny table
            explain = "EXPLAIN "
        plan = " ".join(
            str(row[-1]) for row in conn.exec_driver_sql(explain + statement, parameters)
        )
    assert "ix_tasks_model_finished" in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan


def test_revision_0005_adds_the_index_and_marks_never_run_cancels_purged(
    database_url: str, clock: FakeClock
) -> None:
    """On a database an older version left (tasks cancelled before they ran never
    marked purged), 0005 marks them, adds the index, and can be taken back and
    applied again; the migrated schema is exactly the declared one."""
    engine = create_db_engine(database_url)
    store = Store(engine, clock)
    try:
        migrate(engine)
        key = store.create_key("alice")[0]
        never_ran = make_task(store, key)
        store.request_cancel(never_ran.id, key.id)
        ran = make_task(store, key, offset_seconds=1)
        store.claim_next("w1", LEASE)
        store.request_cancel(ran.id, key.id)
        assert store.cancel_running(ran.id, "w1")
        pending = make_task(store, key, offset_seconds=2)
        with engine.begin() as conn:  # as an older version left them
            conn.execute(update(tasks).values(results_purged=False))
        store.close()
        config = alembic_config(engine)
        command.downgrade(config, "0004")
        with engine.connect() as conn:
            names = {index["name"] for index in inspect(conn).get_indexes("tasks")}
        assert "ix_tasks_model_finished" not in names and "ix_tasks_queue" in names
        command.upgrade(config, "head")
        assert results_purged(engine) == {never_ran.id: True, ran.id: False, pending.id: False}
        with engine.connect() as conn:
            names = {index["name"] for index in inspect(conn).get_indexes("tasks")}
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert "ix_tasks_model_finished" in names
    finally:
        store.close()


def test_expired_results_listed_until_purged(store: Store, key: ApiKey, clock: FakeClock) -> None:
    task = make_task(store, key)
    store.claim_next("w1", LEASE)
    store.complete(task.id, "w1", [f"{task.id}/0.png"], clock.now() + timedelta(hours=1))
    assert store.expired_results() == []
    clock.advance(3601)
    assert store.expired_results() == [task.id]
    store.mark_results_purged([task.id])
    assert store.expired_results() == []


def test_result_sweeps_list_tasks_in_order_from_a_given_one(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    """A sweep goes on past a task it could not purge (still listed) by asking for
    the tasks after it."""
    made = []
    for _ in range(3):
        made.append(make_task(store, key).id)
        clock.advance(1)  # ids carry their creation time: they sort in this order
        assert store.claim_next("w1", LEASE) is not None
        if len(made) == 2:
            store.fail(made[-1], "w1", TaskError(500, "internal_server_error", "boom"))
        else:
            store.complete(made[-1], "w1", [], clock.now())
    clock.advance(1)
    assert made == sorted(made)
    assert store.expired_results(limit=1) == [made[0]]
    assert store.expired_results(limit=1, after=made[0]) == [made[2]]
    assert store.expired_results(after=made[2]) == []
    assert store.abandoned_results() == [made[1]]
    assert store.abandoned_results(after=made[1]) == []


def test_claim_only_takes_the_workers_models(store: Store, key: ApiKey) -> None:
    task = make_task(store, key)
    assert store.claim_next("w1", LEASE, models=["another-model"]) is None
    claimed = store.claim_next("w1", LEASE, models=["another-model", "qwen-image-edit"])
    assert claimed is not None and claimed.id == task.id


def test_every_thread_that_may_query_gets_a_connection_at_once(database_url: str) -> None:
    """However few connections are kept open (`--db-pool-size`), the API's thread
    pool and the server's own threads may all query at the same moment: none of
    them waits for a connection, let alone times out."""
    engine = create_db_engine(database_url, pool_size=2)
    together = threading.Barrier(QUERY_THREADS, timeout=20)
    answers: list[int] = []

    def query() -> None:
        with engine.connect() as conn:
            together.wait()  # every thread holds its connection here at once
            answers.append(conn.execute(text("SELECT 1")).scalar_one())

    threads = [threading.Thread(target=query) for _ in range(QUERY_THREADS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert answers == [1] * QUERY_THREADS
        if engine.dialect.name == "postgresql":
            assert engine.pool.checkedin() == 2  # type: ignore[attr-defined]  # kept open
    finally:
        engine.dispose()
