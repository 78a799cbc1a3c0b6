"""Accounts, the credits ledger and the queue's order, on every backend.

The `store` fixture runs the ledger check after each test, so every scenario
here also proves that the invariants hold after it.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from retouch.accounts import Admission, EntryKind, to_units
from retouch.errors import (
    ConflictError,
    InsufficientQuotaError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
)
from retouch.keys import ApiKey
from retouch.store import Store, create_db_engine
from retouch.store.migrate import alembic_config, migrate
from retouch.store.schema import metadata
from retouch.tasks import EditParams, Task, TaskError
from tests.support import pending_task

LEASE = 30.0
PRICE = 1.5


def submit(
    store: Store,
    key: ApiKey,
    n: int = 1,
    *,
    vip_head_start: float = 0.0,
    admission: Admission | None = None,
) -> Task:
    now = store.clock.now()
    params = EditParams(prompt="edit", image_urls=["https://example.com/a.png"], n=n)
    head_start = now - timedelta(seconds=vip_head_start)
    task = pending_task(key, now, params, credits=PRICE * n, priority_at=head_start)
    return store.create_task(task, admission)[0]


def entries(store: Store, key: ApiKey) -> list[tuple[str, float]]:
    """The account's entries, oldest first, as (kind, credits)."""
    return [(e.kind.value, e.credits) for e in reversed(store.ledger(key.account_id))]


@pytest.fixture
def key(store: Store) -> ApiKey:
    return store.create_key("alice", credits=10)[0]


def test_a_key_gets_its_own_account_or_joins_one(store: Store) -> None:
    first, _ = store.create_key("team", user_group="vip", credits=12.5)
    assert (first.account.name, first.user_group, first.account.available) == ("team", "vip", 12.5)
    second, _ = store.create_key("ci-bot", "team")
    assert second.account_id == first.account_id and second.account.balance == 12.5
    with pytest.raises(ConflictError) as clash:
        store.create_key("team")
    assert clash.value.param == "name"
    with pytest.raises(NotFoundError):
        store.create_key("x", "no-such-account")
    assert [e.kind for e in store.ledger("team")] == [EntryKind.GRANT]
    assert store.get_account(first.account_id) == store.get_account("team")


def test_grants_add_and_take_back_only_what_is_available(store: Store, key: ApiKey) -> None:
    submit(store, key, n=2)  # holds 3.0 of 10
    assert store.grant("alice", 2.25, "top-up").available == pytest.approx(9.25)
    with pytest.raises(InvalidRequestError, match=r"only 9\.25 are available"):
        store.grant("alice", -9.5)
    assert store.grant(key.account_id, -9.25).available == 0
    with pytest.raises(InvalidRequestError, match=r"finer than 0\.001"):
        store.grant("alice", 0.0005)
    assert entries(store, key) == [
        ("grant", 10.0),
        ("reserve", 3.0),
        ("grant", 2.25),
        ("grant", -9.25),
    ]


def test_creating_a_task_reserves_and_refuses_beyond_the_balance(store: Store, key: ApiKey) -> None:
    submit(store, key, n=6)  # 9.0 of 10
    with pytest.raises(InsufficientQuotaError, match=r"needs 1\.5 .* 1\.0 available"):
        submit(store, key)
    account = store.get_account("alice")
    assert (account.balance, account.reserved, account.available) == (10.0, 9.0, 1.0)
    assert store.usage(key.account_id).tasks["pending"] == 1


@pytest.mark.parametrize(
    ("outcome", "expected_entry", "balance"),
    [
        ("complete-all", ("capture", 3.0), 7.0),
        ("complete-one", ("capture", 1.5), 8.5),
        ("fail", ("release", 3.0), 10.0),
        ("cancel-running", ("release", 3.0), 10.0),
        ("cancel-pending", ("release", 3.0), 10.0),
        ("worker-lost", ("release", 3.0), 10.0),
    ],
)
def test_every_ending_settles_the_reservation_once(
    store: Store, key: ApiKey, outcome: str, expected_entry: tuple[str, float], balance: float
) -> None:
    task = submit(store, key, n=2)
    expires = store.clock.now() + timedelta(hours=24)
    if outcome == "cancel-pending":
        store.request_cancel(task.id, key.id)
    else:
        assert store.claim_next("w1", LEASE) is not None
    if outcome == "complete-all":
        assert store.complete(task.id, "w1", ["a.png", "b.png"], expires)
    elif outcome == "complete-one":
        assert store.complete(task.id, "w1", ["a.png"], expires)
    elif outcome == "fail":
        assert store.fail(task.id, "w1", TaskError(500, "internal_server_error", "boom"))
    elif outcome == "cancel-running":
        store.request_cancel(task.id, key.id)
        assert store.cancel_running(task.id, "w1")
    elif outcome == "worker-lost":
        store.clock.advance(LEASE + 1)  # type: ignore[attr-defined]
        assert store.reap_expired_leases(max_attempts=1) == 1
    # A presumed-dead worker waking up cannot settle it a second time.
    assert not store.complete(task.id, "w1", ["late.png"], expires)
    assert entries(store, key) == [("grant", 10.0), ("reserve", 3.0), expected_entry]
    account = store.get_account("alice")
    assert (account.balance, account.reserved) == (balance, 0)


def test_a_requeued_task_keeps_its_one_reservation(store: Store, key: ApiKey) -> None:
    task = submit(store, key)
    store.claim_next("w1", LEASE)
    assert store.release(task.id, "w1")  # shutdown: back to the queue
    store.claim_next("w2", LEASE)
    store.clock.advance(LEASE + 1)  # type: ignore[attr-defined]
    assert store.reap_expired_leases(max_attempts=3) == 1  # lost worker: requeued
    assert entries(store, key) == [("grant", 10.0), ("reserve", 1.5)]
    assert store.get_account("alice").reserved == 1.5


@pytest.mark.parametrize(
    ("damage", "repair", "expected"),
    [
        (
            "UPDATE accounts SET balance_units = balance_units + 1",
            "UPDATE accounts SET balance_units = balance_units - 1",
            "entries sum to",
        ),
        (
            "UPDATE accounts SET reserved_units = 0",
            "UPDATE accounts SET reserved_units = 1500",
            "open reservations sum to",
        ),
        (
            "UPDATE accounts SET balance_units = 1000",
            "UPDATE accounts SET balance_units = 10000",
            "negative available",
        ),
        (
            "UPDATE tasks SET status = 'completed' WHERE status = 'pending'",
            "UPDATE tasks SET status = 'pending' WHERE finished_at IS NULL",
            "0 captures and 0 releases",
        ),
        (
            "UPDATE tasks SET status = 'pending' WHERE status = 'cancelled'",
            "UPDATE tasks SET status = 'cancelled' WHERE finished_at IS NOT NULL",
            "settled before it finished",
        ),
        (
            "UPDATE ledger_entries SET kind = 'capture' WHERE kind = 'release'",
            "UPDATE ledger_entries SET kind = 'release' WHERE kind = 'capture'",
            "entries sum to",
        ),
        (
            "UPDATE tasks SET credits_reserved = 2",
            "UPDATE tasks SET credits_reserved = 1.5",
            "but shows 2.0",
        ),
        (
            "UPDATE ledger_entries SET kind = 'refund' WHERE kind = 'grant'",
            "UPDATE ledger_entries SET kind = 'grant' WHERE kind = 'refund'",
            "malformed refund entry",
        ),
    ],
)
def test_the_ledger_check_finds_each_kind_of_damage(
    store: Store, key: ApiKey, damage: str, repair: str, expected: str
) -> None:
    cancelled = submit(store, key)
    store.request_cancel(cancelled.id, key.id)
    submit(store, key)  # and one open reservation
    assert store.check_ledger() == []
    with store.engine.begin() as conn:
        conn.execute(text(damage))
    problems = store.check_ledger()
    assert any(expected in problem for problem in problems), problems
    with store.engine.begin() as conn:
        conn.execute(text(repair))
    assert store.check_ledger() == []


def test_vip_goes_first_but_default_is_never_held_past_the_head_start(
    store: Store, key: ApiKey
) -> None:
    """One worker, a vip task arriving every 2 s (each takes 2 s to run), a vip
    head start of 30 s: the default task submitted at t=0 waits no longer than
    the head start plus the task already running."""
    vip = store.create_key("vip", user_group="vip", credits=1000)[0]
    head_start, period = 30.0, 2.0
    submit(store, vip, vip_head_start=head_start)
    default_task = submit(store, key)
    started_at = None
    for _ in range(200):
        submit(store, vip, vip_head_start=head_start)
        claimed = store.claim_next("w1", LEASE)
        assert claimed is not None
        if claimed.id == default_task.id:
            started_at = claimed.started_at
            break
        assert claimed.user_group == "vip"  # vip first while within the head start
        store.clock.advance(period)  # type: ignore[attr-defined]
        assert store.complete(claimed.id, "w1", ["r.png"], store.clock.now())
    assert started_at is not None, "the default task was starved"
    waited = (started_at - default_task.created_at).total_seconds()
    assert head_start - period <= waited <= head_start + period
    assert store.queue_position(default_task) == 0


def test_rate_limit_follows_the_clock_exactly(store: Store, key: ApiKey) -> None:
    store.grant("alice", 100)
    limits = Admission(requests_per_minute=3, max_concurrent_tasks=100, max_queued_tasks=100)
    for _ in range(3):
        submit(store, key, admission=limits)
    with pytest.raises(RateLimitError) as refused:
        submit(store, key, admission=limits)
    assert refused.value.headers["Retry-After"] == "20"
    assert refused.value.fallback_suggestion == "retry after 20 seconds"
    store.clock.advance(19.999)  # type: ignore[attr-defined]
    with pytest.raises(RateLimitError) as still:
        submit(store, key, admission=limits)
    assert still.value.headers["Retry-After"] == "1"
    store.clock.advance(0.001)  # type: ignore[attr-defined]
    submit(store, key, admission=limits)
    # A refused request costs nothing: no task, no reservation, no rate.
    assert store.usage(key.account_id).tasks["pending"] == 4
    assert store.get_account("alice").reserved == 6.0


def test_idempotency_keys_replay_conflict_and_expire(store: Store, key: ApiKey) -> None:
    once = Admission(100, 100, 100, idempotency_key="order-1", fingerprint="a" * 64)
    first = submit(store, key, admission=once)
    task = store.get_task(first.id)
    assert task is not None
    replayed, was_replayed = store.create_task(
        Task(**{**task.__dict__, "id": "task-unified-1-zzzzzzzz"}), once
    )
    assert was_replayed and replayed.id == first.id
    changed = Admission(100, 100, 100, idempotency_key="order-1", fingerprint="b" * 64)
    with pytest.raises(ConflictError):
        submit(store, key, admission=changed)
    assert [kind for kind, _ in entries(store, key)] == ["grant", "reserve"]
    store.clock.advance(24 * 3600)  # type: ignore[attr-defined]
    assert store.purge_idempotency_keys() == 1
    assert submit(store, key, admission=changed).id != first.id


def test_migrations_build_exactly_the_declared_schema(store: Store) -> None:
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []


def test_the_lease_length_column_comes_and_goes_with_its_revision(database_url: str) -> None:
    """0004 adds each lease's length; taking it back leaves 0003's schema, and it
    can be applied again."""
    engine = create_db_engine(database_url)
    config = alembic_config(engine)
    try:
        migrate(engine)
        command.downgrade(config, "0003")
        with engine.connect() as conn:
            columns = {column["name"] for column in inspect(conn).get_columns("tasks")}
        assert "lease_seconds" not in columns and "lease_expires_at" in columns
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    finally:
        engine.dispose()


def test_upgrading_gives_existing_keys_and_tasks_accounts_and_entries(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'old.db'}")
    command.upgrade(alembic_config(engine), "0002")
    with engine.begin() as conn:
        for key_id, name, group in [("key_a", "ann", "vip"), ("key_b", "ann", "default")]:
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, name, key_hash, prefix, user_group, created_at) "
                    "VALUES (:id, :name, :hash, 'rt_x', :group, '2026-01-01 00:00:00')"
                ),
                {"id": key_id, "name": name, "hash": key_id * 4, "group": group},
            )
        for task_id, key_id, status, reserved in [
            ("task-unified-1-aaaaaaaa", "key_a", "completed", 2.0),
            ("task-unified-1-bbbbbbbb", "key_a", "pending", 1.5),
            ("task-unified-1-cccccccc", "key_b", "processing", 3.0),
        ]:
            conn.execute(
                text(
                    "INSERT INTO tasks (id, key_id, model, status, progress, params, user_group, "
                    "credits_reserved, created_at, attempts, cancel_requested, results_purged) "
                    "VALUES (:id, :key, 'qwen-image-edit', :status, 0, '{}', 'default', "
                    ":reserved, '2026-01-01 00:00:01', 0, 0, 0)"
                ),
                {"id": task_id, "key": key_id, "status": status, "reserved": reserved},
            )
    migrate(engine)
    store = Store(engine)
    try:
        assert store.check_ledger() == []
        accounts = {account.name: account for account in store.list_accounts()}
        assert set(accounts) == {"ann", "ann (key_b)"}
        assert accounts["ann"].user_group == "vip"
        assert (accounts["ann"].reserved, accounts["ann"].available) == (1.5, 100.0)
        assert (accounts["ann (key_b)"].reserved, accounts["ann (key_b)"].available) == (3.0, 100)
        assert to_units(accounts["ann"].balance) == 101_500
    finally:
        store.close()


def test_concurrent_starts_migrate_once(database_url: str, tmp_path: Path) -> None:
    """Several processes starting at once (API replicas, workers) each run the
    migrations: they must not race (an advisory lock on PostgreSQL, the write
    lock on SQLite)."""
    command = [sys.executable, "-m", "retouch", "migrate", "--database-url", database_url]
    starts = [
        subprocess.Popen(
            [*command, "--data-dir", str(tmp_path / f"p{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [start.communicate(timeout=120)[0] for start in starts]
    assert [start.returncode for start in starts] == [0] * 4, outputs
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        assert head is not None and [row[0] for row in versions] == [head]
        assert differences == []
    finally:
        engine.dispose()
