"""Limits under contention, on every backend: a callback claim's result counts only
while that claim is the latest, and the store gives every thread its connections
(or, when a pool's connections are all taken, says the database cannot answer)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import create_engine

from retouch.clock import FakeClock
from retouch.keys import ApiKey
from retouch.store import Store, database_unavailable
from retouch.store.base import QUERY_THREADS, PoolExhausted
from retouch.store.outbox import Delivery
from tests.integration.test_callbacks import finished_task

LOCK = 40.0
RECEIVER = "https://hooks.example/retouch"


@pytest.fixture
def key(store: Store) -> ApiKey:
    return store.create_key("alice")[0]


def claim_one(store: Store) -> Delivery:
    [delivery] = store.claim_due_deliveries(1, LOCK)
    return delivery


def failed(store: Store, delivery: Delivery, clock: FakeClock) -> bool:
    retry_at = clock.now() + timedelta(seconds=1)
    return store.record_attempt(
        delivery, delivered=False, status_code=500, error="HTTP 500", retry_at=retry_at
    )


def delivered(store: Store, delivery: Delivery) -> bool:
    return store.record_attempt(
        delivery, delivered=True, status_code=200, error=None, retry_at=None
    )


def test_a_late_result_after_the_newer_claims_result_changes_nothing(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    task = finished_task(store, key, RECEIVER)
    first = claim_one(store)
    clock.advance(LOCK + 1)  # its lock passes: another dispatcher claims it again
    second = claim_one(store)
    assert second.locked_until != first.locked_until
    assert delivered(store, second)
    assert not failed(store, first, clock)  # the first claim's answer, at last
    latest = store.latest_delivery(task.id)
    assert latest is not None
    assert (latest.status, latest.attempts, latest.last_status_code) == ("delivered", 1, 200)


def test_a_late_result_before_the_newer_claims_result_is_dropped(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    task = finished_task(store, key, RECEIVER)
    first = claim_one(store)
    clock.advance(LOCK + 1)
    second = claim_one(store)
    assert not delivered(store, first)
    latest = store.latest_delivery(task.id)
    assert latest is not None and (latest.status, latest.attempts) == ("pending", 0)
    assert latest.locked_until == second.locked_until  # the newer claim still holds it
    assert failed(store, second, clock)
    latest = store.latest_delivery(task.id)
    assert latest is not None and (latest.status, latest.attempts) == ("pending", 1)


def test_a_result_counts_once(store: Store, key: ApiKey, clock: FakeClock) -> None:
    task = finished_task(store, key, RECEIVER)
    claimed = claim_one(store)
    assert failed(store, claimed, clock)
    assert not failed(store, claimed, clock)
    latest = store.latest_delivery(task.id)
    assert latest is not None and latest.attempts == 1


def test_a_late_result_counts_while_nobody_claimed_the_delivery_again(
    store: Store, key: ApiKey, clock: FakeClock
) -> None:
    """Its lock passed, but nobody sent it meanwhile: the answer is the only one."""
    task = finished_task(store, key, RECEIVER)
    claimed = claim_one(store)
    clock.advance(LOCK + 1)
    assert delivered(store, claimed)
    latest = store.latest_delivery(task.id)
    assert latest is not None and (latest.status, latest.attempts) == ("delivered", 1)


def test_more_threads_than_any_pool_cap_each_read_and_write_at_once(store: Store) -> None:
    """On SQLite each thread keeps a reader and a writer while it lives; a process
    may have more threads querying than any cap chosen in advance (the API's 40,
    the event loop, the callback senders...)."""
    count = QUERY_THREADS + 16
    together = threading.Barrier(count, timeout=20)
    done: list[int] = []

    def read_and_write(index: int) -> None:
        assert store.latest_delivery(f"task-{index}") is None
        store.create_key(f"user-{index}")
        together.wait()  # every thread alive, holding its connections, at once
        done.append(index)

    threads = [threading.Thread(target=read_and_write, args=(i,)) for i in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(done) == list(range(count))
    assert time.monotonic() - started < 10


def test_a_pool_with_no_connection_free_is_a_database_that_cannot_answer(
    database_url: str, clock: FakeClock
) -> None:
    """SQLAlchemy's pool timeout is no `OperationalError`: the store reports it as one,
    so that the API answers 503 and the worker retries, as for any unavailable database."""
    engine = create_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    store = Store(engine, clock)
    try:
        with engine.connect():  # the pool's only connection
            with pytest.raises(PoolExhausted) as caught:
                store.latest_delivery("task")
        assert database_unavailable(caught.value)
        cause = caught.value.orig  # SQLAlchemy's own TimeoutError
        assert cause is not None and database_unavailable(cause)
    finally:
        store.close()
