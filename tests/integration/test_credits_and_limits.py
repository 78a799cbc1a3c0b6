"""Credits, rate limits, capacity and idempotency, seen through the HTTP API.

Every test runs on each backend (the `store` fixture), and the `store` fixture
checks the ledger's invariants after each one, so every scenario here also
proves that the ledger still balances after it.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import event

from retouch.accounts import GroupLimits, Limits
from retouch.engine.base import EditJob, Interrupted, StepCallback, StopCheck
from retouch.engine.fixture import FixtureEngine
from retouch.store import base as store_base
from retouch.tasks import Task, TaskStatus
from tests.integration.conftest import Api
from tests.integration.test_api import (
    GENERATIONS,
    assert_error,
    create,
    edit,
    task_detail,
    wait_status,
)
from tests.integration.test_uploads_and_events import stored_uploads
from tests.integration.test_worker_lifecycle import wait_task
from tests.support import ImageHost, png_bytes, wait_for

URL = "https://example.com/a.png"
PRICE = 1.5  # SPEC's price per image
ROOMY = Limits(
    default=GroupLimits(requests_per_minute=10_000, max_concurrent_tasks=1_000),
    vip=GroupLimits(requests_per_minute=10_000, max_concurrent_tasks=1_000),
)


# -- helpers -----------------------------------------------------------------


def post(
    api: Api,
    body: dict[str, Any],
    *,
    secret: str | None = None,
    idempotency_key: str | bytes | None = None,
) -> httpx.Response:
    headers: dict[str, str] | dict[bytes, bytes] = {}
    if isinstance(idempotency_key, bytes):
        headers = {b"Idempotency-Key": idempotency_key}
    elif idempotency_key is not None:
        headers = {"Idempotency-Key": idempotency_key}
    with api.client(secret) as client:
        return client.post(GENERATIONS, json=body, headers=headers)


def usage(api: Api, secret: str | None = None) -> dict[str, Any]:
    with api.client(secret) as client:
        response = client.get("/v1/usage")
    assert response.status_code == 200, response.text
    return dict(response.json())


def credits(api: Api, secret: str | None = None) -> dict[str, float]:
    return dict(usage(api, secret)["credits"])


def entries(api: Api, account: str = "alice") -> list[tuple[str, str | None, float]]:
    """The account's ledger, oldest first, as (kind, task id, credits)."""
    return [(e.kind.value, e.task_id, e.credits) for e in reversed(api.store.ledger(account))]


def task_counts(**counts: int) -> dict[str, int]:
    return {
        "pending": 0,
        "processing": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        **counts,
    }


def in_parallel(count: int, call: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """`count` calls at once, each on its own thread (and its own connection)."""
    barrier = threading.Barrier(count)

    def run(index: int) -> httpx.Response:
        barrier.wait(timeout=10)
        return call(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def stored(api: Api, task_id: str) -> Task:
    task = api.store.get_task(task_id)
    assert task is not None
    return task


def cancel(api: Api, task_id: str, secret: str | None = None) -> dict[str, Any]:
    with api.client(secret) as client:
        response = client.post(f"/v1/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text
    return dict(response.json())


class RecordingEngine(FixtureEngine):
    """The fixture engine, noting the prompt of each job in the order it ran them."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.prompts: list[str] = []

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Any]:
        self.prompts.append(job.prompt)
        return super().run(job, on_step, should_stop)


# -- reserving credits ---------------------------------------------------------


def test_concurrent_creates_reserve_exactly_what_the_balance_covers(api: Api) -> None:
    covered, attempts = 5, 24
    api.service.limits = ROOMY
    api.store.grant("alice", -(100 - PRICE * covered))
    assert credits(api) == {"balance": 7.5, "reserved": 0.0, "available": 7.5}

    responses = in_parallel(attempts, lambda i: post(api, edit([URL], prompt=f"edit {i}")))

    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(accepted) == covered
    assert len(refused) == attempts - covered
    for response in refused:
        error = assert_error(response, 402, "insufficient_quota_error")
        assert "credits" in error["message"]
    ids = {r.json()["id"] for r in accepted}
    assert len(ids) == covered
    assert credits(api) == {"balance": 7.5, "reserved": 7.5, "available": 0.0}
    assert usage(api)["tasks"] == task_counts(pending=covered)
    assert {
        task.id for task in api.store.unfinished_tasks(api.store.get_account("alice").id)
    } == ids
    reservations = [e for e in entries(api) if e[0] == "reserve"]
    assert sorted(reservations) == sorted(("reserve", task_id, PRICE) for task_id in ids)


def test_a_refused_create_creates_and_reserves_nothing(api: Api) -> None:
    api.store.update_account("alice", requests_per_minute=1)
    api.store.grant("alice", -99)  # 1.0 left: less than one image
    before_usage, before_ledger = usage(api), entries(api)

    single = post(api, edit([URL]))
    double = post(api, edit([URL], n=2))

    error = assert_error(single, 402, "insufficient_quota_error")
    assert error["message"] == (
        "Insufficient credits: this task needs 1.5 and the account has 1.0 available"
    )
    assert error["fallback_suggestion"] == "ask the operator to add credits, or lower `n`"
    assert "3.0" in assert_error(double, 402, "insufficient_quota_error")["message"]
    assert usage(api) == before_usage
    assert before_usage["credits"] == {"balance": 1.0, "reserved": 0.0, "available": 1.0}
    assert before_usage["tasks"] == task_counts()
    assert entries(api) == before_ledger
    # The refusals did not use up the one-a-minute rate limit or leave anything
    # behind: once credits are granted, the same request passes.
    api.store.grant("alice", 0.5)
    assert post(api, edit([URL])).status_code == 200
    assert credits(api) == {"balance": 1.5, "reserved": 1.5, "available": 0.0}


def test_n_is_reserved_per_image(api: Api) -> None:
    api.store.grant("alice", -(100 - 4.5))
    assert post(api, edit([URL], n=4)).status_code == 402  # 6.0 > 4.5
    task = create(api, edit([URL], n=3))
    assert task["usage"]["credits_reserved"] == 4.5
    assert credits(api) == {"balance": 4.5, "reserved": 4.5, "available": 0.0}


# -- settling through a real worker ---------------------------------------------


def test_a_completed_task_captures_its_images(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine())
    task = create(api, edit([image_host.add("/a.png", png_bytes())], n=2))
    assert credits(api) == {"balance": 100.0, "reserved": 3.0, "available": 97.0}

    done = wait_status(api, task["id"], "completed", "failed")
    assert done["status"] == "completed" and len(done["results"]) == 2

    assert credits(api) == {"balance": 97.0, "reserved": 0.0, "available": 97.0}
    assert entries(api) == [
        ("grant", None, 100.0),
        ("reserve", task["id"], 3.0),
        ("capture", task["id"], 3.0),
    ]
    assert usage(api)["tasks"] == task_counts(completed=1)


def test_a_task_the_engine_fails_releases_its_credits(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine(fail_with=RuntimeError("the GPU fell off the bus")))
    task = create(api, edit([image_host.add("/a.png", png_bytes())], n=2))

    failed = wait_status(api, task["id"], "failed", "completed")
    assert failed["status"] == "failed"
    assert "the GPU fell off the bus" in failed["error"]["message"]

    assert credits(api) == {"balance": 100.0, "reserved": 0.0, "available": 100.0}
    assert entries(api) == [
        ("grant", None, 100.0),
        ("reserve", task["id"], 3.0),
        ("release", task["id"], 3.0),
    ]
    assert usage(api)["tasks"] == task_counts(failed=1)


def test_a_task_whose_input_is_missing_releases_its_credits(
    api: Api, image_host: ImageHost
) -> None:
    api.start_worker(FixtureEngine())
    task = create(api, edit([image_host.url("/missing.png")]))
    assert wait_status(api, task["id"], "failed", "completed")["status"] == "failed"
    assert credits(api) == {"balance": 100.0, "reserved": 0.0, "available": 100.0}
    assert [e[0] for e in entries(api)] == ["grant", "reserve", "release"]


def test_cancelling_a_pending_task_releases_its_credits(api: Api) -> None:
    task = create(api, edit([URL], n=2))
    assert credits(api)["reserved"] == 3.0
    assert cancel(api, task["id"])["status"] == "cancelled"
    cancel(api, task["id"])  # a second cancel is a no-op, and releases nothing twice
    assert credits(api) == {"balance": 100.0, "reserved": 0.0, "available": 100.0}
    assert entries(api) == [
        ("grant", None, 100.0),
        ("reserve", task["id"], 3.0),
        ("release", task["id"], 3.0),
    ]
    assert usage(api)["tasks"] == task_counts(cancelled=1)


def test_cancelling_a_running_task_releases_its_credits(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.05, steps=400))
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    wait_status(api, task["id"], "processing")
    cancel(api, task["id"])
    wait_status(api, task["id"], "cancelled", timeout=5)
    assert credits(api) == {"balance": 100.0, "reserved": 0.0, "available": 100.0}
    assert [e[0] for e in entries(api)] == ["grant", "reserve", "release"]


# -- inline images (data: URIs) --------------------------------------------------


def inline_image(color: tuple[int, int, int] = (0, 0, 255)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(color=color)).decode()


def test_refused_creates_keep_no_inline_images(api: Api) -> None:
    """A `data:` image is kept only for a task that is admitted: an account without
    credits, or past a limit, cannot fill the disk with requests that are refused."""
    image = inline_image()
    assert post(api, edit([URL]), idempotency_key="k-1").status_code == 200
    conflict = post(api, edit([image]), idempotency_key="k-1")
    assert_error(conflict, 409, "conflict_error", "Idempotency-Key")
    assert stored_uploads(api) == []

    api.service.limits = Limits(max_queued_tasks=1)
    assert_error(post(api, edit([image])), 503, "service_unavailable_error")
    assert stored_uploads(api) == []

    api.service.limits = Limits(
        default=GroupLimits(requests_per_minute=1_000, max_concurrent_tasks=1)
    )
    assert_error(post(api, edit([image])), 429, "rate_limit_error")
    assert stored_uploads(api) == []

    api.service.limits = ROOMY
    api.store.grant("alice", -(100 - PRICE))  # nothing left beside the first task's
    assert_error(post(api, edit([image, image])), 402, "insufficient_quota_error")
    assert stored_uploads(api) == []

    api.store.grant("alice", PRICE)
    admitted = post(api, edit([image]))
    assert admitted.status_code == 200, admitted.text
    (link,) = stored(api, admitted.json()["id"]).params.image_urls
    assert stored_uploads(api) == [urlsplit(link).path.rsplit("/", 1)[1]]


def test_a_replayed_create_keeps_one_set_of_inline_images(api: Api) -> None:
    body = edit([inline_image(), URL, inline_image((0, 255, 0))])
    first = post(api, body, idempotency_key="inline")
    again = post(api, body, idempotency_key="inline")
    assert first.status_code == again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    links = stored(api, first.json()["id"]).params.image_urls
    assert links[1] == URL
    kept = [urlsplit(link).path.rsplit("/", 1)[1] for link in (links[0], links[2])]
    assert stored_uploads(api) == sorted(kept)
    for link in (links[0], links[2]):
        assert httpx.get(link).status_code == 200  # the task's links still open


# -- the rate limit ------------------------------------------------------------


def test_rate_limit_edges_follow_the_clock(api: Api) -> None:
    api.service.limits = Limits(
        default=GroupLimits(requests_per_minute=3, max_concurrent_tasks=100),
        vip=GroupLimits(requests_per_minute=5, max_concurrent_tasks=100),
    )
    for _ in range(3):
        assert post(api, edit([URL])).status_code == 200

    limited = post(api, edit([URL]))
    error = assert_error(limited, 429, "rate_limit_error")
    assert limited.headers["Retry-After"] == "20"
    assert error["fallback_suggestion"] == "retry after 20 seconds"
    assert "3 tasks per minute" in error["message"]

    api.clock.advance(19.5)
    almost = post(api, edit([URL]))
    assert_error(almost, 429, "rate_limit_error")
    assert almost.headers["Retry-After"] == "1"
    assert almost.json()["error"]["fallback_suggestion"] == "retry after 1 second"

    api.clock.advance(0.5)
    assert post(api, edit([URL])).status_code == 200
    # One every 20 seconds from here on.
    assert post(api, edit([URL])).headers["Retry-After"] == "20"

    # Refusals reserved nothing: four tasks, four reservations.
    assert credits(api)["reserved"] == 4 * PRICE
    assert usage(api)["tasks"] == task_counts(pending=4)
    assert usage(api)["limits"] == {"requests_per_minute": 3, "max_concurrent_tasks": 100}

    # A vip account has its own limiter and the vip limit.
    _key, vip = api.store.create_key("v", user_group="vip")
    for _ in range(5):
        assert post(api, edit([URL]), secret=vip).status_code == 200
    vip_limited = post(api, edit([URL]), secret=vip)
    assert_error(vip_limited, 429, "rate_limit_error")
    assert vip_limited.headers["Retry-After"] == "12"
    assert usage(api, vip)["limits"] == {"requests_per_minute": 5, "max_concurrent_tasks": 100}


def test_an_accounts_own_rate_limit_overrides_its_groups(api: Api) -> None:
    api.store.update_account("alice", requests_per_minute=1)
    assert usage(api)["limits"]["requests_per_minute"] == 1
    assert post(api, edit([URL])).status_code == 200
    limited = post(api, edit([URL]))
    assert_error(limited, 429, "rate_limit_error")
    assert limited.headers["Retry-After"] == "60"


def test_concurrent_creates_pass_the_rate_limit_exactly_as_often_as_it_allows(api: Api) -> None:
    api.store.update_account("alice", requests_per_minute=3)
    responses = in_parallel(12, lambda _i: post(api, edit([URL])))
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 9
    assert {r.headers["Retry-After"] for r in responses if r.status_code == 429} == {"20"}
    assert usage(api)["tasks"] == task_counts(pending=3)
    assert credits(api)["reserved"] == 3 * PRICE


# -- capacity ------------------------------------------------------------------


def test_concurrency_limit_counts_unfinished_tasks(api: Api) -> None:
    api.service.limits = Limits(
        default=GroupLimits(requests_per_minute=1_000, max_concurrent_tasks=2)
    )
    first = create(api, edit([URL]))
    second = create(api, edit([URL]))
    before = usage(api)

    third = post(api, edit([URL]))
    error = assert_error(third, 429, "rate_limit_error")
    assert "2 unfinished tasks" in error["message"]
    # The wait is until the first of the unfinished tasks should be done.
    retry_after = int(third.headers["Retry-After"])
    assert retry_after >= 1
    estimates = [task_detail(api, t["id"])["task_info"]["estimated_time"] for t in (first, second)]
    assert retry_after == min(estimates) == 30
    assert error["fallback_suggestion"] == f"retry after {retry_after} seconds"
    assert usage(api) == before

    # The limit is the account's: another account is not held back.
    _key, bob = api.store.create_key("bob")
    assert post(api, edit([URL]), secret=bob).status_code == 200

    cancel(api, first["id"])
    assert post(api, edit([URL])).status_code == 200
    assert usage(api)["tasks"] == task_counts(pending=2, cancelled=1)
    assert_error(post(api, edit([URL])), 429, "rate_limit_error")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sqlite_write_held_past_the_busy_timeout_is_a_503_and_the_next_one_goes_through(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process's SQLite writers take turns on a lock of its own; one that cannot get
    it within the busy timeout is a database that cannot answer now (503, nothing
    created or charged), as SQLite's own "database is locked" is."""
    monkeypatch.setattr(store_base, "SQLITE_BUSY_SECONDS", 0.3)
    before = (usage(api), entries(api))
    holding, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        with api.store._write():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    try:
        assert holding.wait(5)
        refused = post(api, edit([URL]))
        assert_error(refused, 503, "service_unavailable_error")
        assert (usage(api), entries(api)) == before
    finally:
        release.set()
        holder.join(5)
    assert post(api, edit([URL])).status_code == 200


def test_a_full_queue_is_503_and_creates_nothing(api: Api) -> None:
    api.service.limits = Limits(max_queued_tasks=2)
    _key, bob = api.store.create_key("bob")
    mine = create(api, edit([URL]))
    assert post(api, edit([URL]), secret=bob).status_code == 200
    before = (usage(api), usage(api, bob), entries(api), entries(api, "bob"))

    for secret in (None, bob):
        full = post(api, edit([URL]), secret=secret)
        error = assert_error(full, 503, "service_unavailable_error")
        assert "queue is full" in error["message"]
        # No run times yet: one default task time (30 s) until a slot frees.
        assert full.headers["Retry-After"] == "30"
        assert error["fallback_suggestion"] == "retry after 30 seconds"

    assert (usage(api), usage(api, bob), entries(api), entries(api, "bob")) == before
    cancel(api, mine["id"])
    assert post(api, edit([URL]), secret=bob).status_code == 200


def test_concurrent_creates_respect_the_concurrency_limit(api: Api) -> None:
    api.service.limits = Limits(
        default=GroupLimits(requests_per_minute=1_000, max_concurrent_tasks=3)
    )
    responses = in_parallel(12, lambda _i: post(api, edit([URL])))
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 9
    assert usage(api)["tasks"] == task_counts(pending=3)
    assert credits(api)["reserved"] == 3 * PRICE


def test_concurrent_creates_from_many_accounts_respect_the_queue_cap(api: Api) -> None:
    """The cap is server-wide: requests from different accounts (whose rows are
    locked separately) must not together overshoot it."""
    api.service.limits = Limits(max_queued_tasks=3)
    keys = [api.store.create_key(f"user-{i}")[1] for i in range(24)]
    responses = in_parallel(24, lambda i: post(api, edit([URL]), secret=keys[i]))
    unfinished = sum(usage(api, secret)["tasks"]["pending"] for secret in keys)
    assert unfinished == 3, f"{unfinished} tasks admitted under a server-wide cap of 3"
    assert sorted(r.status_code for r in responses) == [200] * 3 + [503] * 21


# -- idempotency ---------------------------------------------------------------


def test_a_repeated_idempotency_key_replays_the_task(api: Api) -> None:
    first = post(api, edit([URL], n=2), idempotency_key="order-1")
    again = post(api, edit([URL], n=2), idempotency_key="order-1")

    assert first.status_code == again.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    task_id = first.json()["id"]
    assert credits(api) == {"balance": 100.0, "reserved": 3.0, "available": 97.0}
    assert usage(api)["tasks"] == task_counts(pending=1)
    assert entries(api) == [("grant", None, 100.0), ("reserve", task_id, 3.0)]

    # The same request in another spelling (key order, spacing, defaults spelt out)
    # is the same request.
    spelled = (
        '{"n": 2, "image_urls": ["https://example.com/a.png"],   "prompt": "make it blue",'
        '"model": "qwen-image-edit", "callback_url": null}'
    )
    with api.client() as client:
        respelled = client.post(
            GENERATIONS, content=spelled, headers={"Idempotency-Key": "order-1"}
        )
    assert respelled.status_code == 200, respelled.text
    assert respelled.headers["Idempotent-Replayed"] == "true"
    assert respelled.json()["id"] == task_id

    # A replay shows the task as it is now.
    cancel(api, task_id)
    later = post(api, edit([URL], n=2), idempotency_key="order-1")
    assert later.headers["Idempotent-Replayed"] == "true"
    assert (later.json()["id"], later.json()["status"]) == (task_id, "cancelled")
    assert [e[0] for e in entries(api)] == ["grant", "reserve", "release"]


def test_an_idempotency_key_with_another_body_conflicts(api: Api) -> None:
    first = create(api, edit([URL]))  # no key: unrelated to what follows
    keyed = post(api, edit([URL]), idempotency_key="k-1")
    assert keyed.status_code == 200 and keyed.json()["id"] != first["id"]
    before = (usage(api), entries(api))

    for changed in (edit([URL], n=2), edit([URL], prompt="make it red"), edit([URL], seed=7)):
        clash = post(api, changed, idempotency_key="k-1")
        error = assert_error(clash, 409, "conflict_error", "Idempotency-Key")
        assert "different request body" in error["message"]
        assert "Idempotent-Replayed" not in clash.headers

    assert (usage(api), entries(api)) == before


def test_idempotency_keys_belong_to_the_api_key(api: Api) -> None:
    _key, bob = api.store.create_key("bob")
    mine = post(api, edit([URL]), idempotency_key="shared")
    theirs = post(api, edit([URL]), secret=bob, idempotency_key="shared")
    assert mine.status_code == theirs.status_code == 200
    assert "Idempotent-Replayed" not in theirs.headers
    assert mine.json()["id"] != theirs.json()["id"]
    # Another account may use the same key with another body: no conflict.
    other_body = post(api, edit([URL], n=2), secret=bob, idempotency_key="solo")
    assert post(api, edit([URL]), idempotency_key="solo").status_code == 200
    assert other_body.status_code == 200
    assert credits(api)["reserved"] == 2 * PRICE
    assert credits(api, bob)["reserved"] == PRICE + 2 * PRICE
    # bob's replay is of bob's task, never alice's.
    replay = post(api, edit([URL]), secret=bob, idempotency_key="shared")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == theirs.json()["id"]
    # Keys are per API key (the README's rule), even within one account.
    _key, second = api.store.create_key("alice-ci", "alice")
    same_account = post(api, edit([URL]), secret=second, idempotency_key="shared")
    assert "Idempotent-Replayed" not in same_account.headers
    assert same_account.json()["id"] not in {mine.json()["id"], theirs.json()["id"]}


def test_an_idempotency_key_expires_after_24_hours(api: Api) -> None:
    first = post(api, edit([URL]), idempotency_key="daily")
    api.clock.advance(24 * 3600 - 1)
    replay = post(api, edit([URL]), idempotency_key="daily")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]

    api.clock.advance(2)  # 24 h + 1 s after the first request
    fresh = post(api, edit([URL]), idempotency_key="daily")
    assert fresh.status_code == 200
    assert "Idempotent-Replayed" not in fresh.headers
    assert fresh.json()["id"] != first.json()["id"]
    # The new task holds the key now; the body may differ from the expired one's.
    assert post(api, edit([URL]), idempotency_key="daily").json()["id"] == fresh.json()["id"]
    assert credits(api)["reserved"] == 2 * PRICE
    assert usage(api)["tasks"] == task_counts(pending=2)


@pytest.mark.parametrize(
    "value",
    ["", "x" * 256, "a b", "tab\there", "caf\u00e9".encode(), "\u00e9t\u00e9".encode("latin-1")],
    ids=["empty", "256-chars", "space", "tab", "utf8", "latin1"],
)
def test_an_invalid_idempotency_key_is_400(api: Api, value: str | bytes) -> None:
    response = post(api, edit([URL]), idempotency_key=value)
    error = assert_error(response, 400, "invalid_request_error", "Idempotency-Key")
    assert "1 to 255 visible ASCII" in error["message"]
    assert usage(api)["tasks"] == task_counts()
    assert credits(api)["reserved"] == 0.0


def test_the_longest_and_oddest_valid_idempotency_keys_pass(api: Api) -> None:
    for value in ("k" * 255, "!", "~{}[]:;'\"<>,.?/|\\"):
        first = post(api, edit([URL]), idempotency_key=value)
        again = post(api, edit([URL]), idempotency_key=value)
        assert first.status_code == 200, (value, first.text)
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
    assert usage(api)["tasks"] == task_counts(pending=3)


def test_a_replay_is_not_rate_limited(api: Api) -> None:
    api.store.update_account("alice", requests_per_minute=1)
    first = post(api, edit([URL]), idempotency_key="retry-me")
    assert first.status_code == 200
    assert_error(post(api, edit([URL])), 429, "rate_limit_error")
    replay = post(api, edit([URL]), idempotency_key="retry-me")
    assert replay.status_code == 200, replay.text
    assert replay.json()["id"] == first.json()["id"]


def _race_replays(api: Api, racers: int) -> set[str]:
    body = edit([URL], n=2)
    responses = in_parallel(racers, lambda _i: post(api, body, idempotency_key="race"))
    refused = [r.json()["error"]["message"] for r in responses if r.status_code != 200]
    assert not refused, f"{len(refused)} of {racers} replays refused: {refused[0]}"
    replayed = [r.headers.get("Idempotent-Replayed") for r in responses]
    assert replayed.count(None) == 1 and replayed.count("true") == racers - 1
    return {r.json()["id"] for r in responses}


def test_racing_replays_create_and_charge_one_task(api: Api) -> None:
    ids = _race_replays(api, 24)
    assert len(ids) == 1
    (task_id,) = ids
    assert entries(api) == [("grant", None, 100.0), ("reserve", task_id, 3.0)]
    assert credits(api) == {"balance": 100.0, "reserved": 3.0, "available": 97.0}
    assert usage(api)["tasks"] == task_counts(pending=1)


def test_racing_replays_when_the_first_takes_the_last_credits(api: Api) -> None:
    """A replay must answer with the task even when a new task would be refused:
    here the first request takes all the credits, so the replays' own admission
    would fail with 402."""
    api.store.grant("alice", -(100 - 2 * PRICE))
    ids = _race_replays(api, 24)
    assert len(ids) == 1
    assert credits(api) == {"balance": 3.0, "reserved": 3.0, "available": 0.0}


def test_racing_replays_under_a_one_per_minute_limit(api: Api) -> None:
    """Likewise when the first request uses up the rate limit."""
    api.store.update_account("alice", requests_per_minute=1)
    ids = _race_replays(api, 24)
    assert len(ids) == 1
    assert usage(api)["tasks"] == task_counts(pending=1)


# -- keys and accounts -----------------------------------------------------------


def test_revoking_a_key_does_not_stop_its_running_task(api: Api, image_host: ImageHost) -> None:
    key, bob = api.store.create_key("bob")
    api.start_worker(FixtureEngine(step_seconds=0.05, steps=20))
    response = post(api, edit([image_host.add("/a.png", png_bytes())]), secret=bob)
    assert response.status_code == 200
    task_id = response.json()["id"]
    wait_for(lambda: stored(api, task_id).status is TaskStatus.PROCESSING)

    assert api.store.revoke_key(key.id)
    with api.client(bob) as client:
        for refused in (
            client.post(GENERATIONS, json=edit([URL])),
            client.get(f"/v1/tasks/{task_id}"),
            client.get("/v1/usage"),
        ):
            assert_error(refused, 401, "authentication_error")
    assert stored(api, task_id).status is TaskStatus.PROCESSING

    done = wait_for(lambda: (t := stored(api, task_id)).status.is_terminal and t, timeout=20)
    assert done.status is TaskStatus.COMPLETED
    assert entries(api, "bob") == [
        ("grant", None, 100.0),
        ("reserve", task_id, PRICE),
        ("capture", task_id, PRICE),
    ]
    account = api.store.get_account("bob")
    assert (account.balance, account.reserved) == (100 - PRICE, 0.0)


def test_a_rotated_key_keeps_its_tasks_and_idempotency_keys(
    api: Api, image_host: ImageHost
) -> None:
    """Rotation replaces a key's secret, not the key: the new secret polls and cancels
    the tasks created before (a running one too), and a retry with the same
    Idempotency-Key finds the task instead of creating a second one."""
    key, old = api.store.create_key("bob")
    api.start_worker(FixtureEngine(step_seconds=0.05, steps=400))
    body = edit([image_host.add("/a.png", png_bytes())])
    response = post(api, body, secret=old, idempotency_key="order-1")
    assert response.status_code == 200
    task_id = response.json()["id"]
    wait_for(lambda: stored(api, task_id).progress > 0)

    rotated, new = api.store.rotate_key(key.id)
    assert rotated.id == key.id and new != old
    with api.client(old) as client:
        assert_error(client.get(f"/v1/tasks/{task_id}"), 401, "authentication_error")
    with api.client(new) as client:
        polled = client.get(f"/v1/tasks/{task_id}")
        assert polled.status_code == 200 and polled.json()["status"] == "processing"
    replayed = post(api, body, secret=new, idempotency_key="order-1")
    assert replayed.status_code == 200 and replayed.json()["id"] == task_id

    with api.client(new) as client:
        cancelled = client.post(f"/v1/tasks/{task_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    done = wait_for(lambda: (t := stored(api, task_id)).status.is_terminal and t, timeout=20)
    assert done.status is TaskStatus.CANCELLED
    assert entries(api, "bob") == [
        ("grant", None, 100.0),
        ("reserve", task_id, PRICE),
        ("release", task_id, PRICE),
    ]


def test_vip_tasks_go_ahead_of_default_ones(api: Api, image_host: ImageHost) -> None:
    url = image_host.add("/a.png", png_bytes())
    _key, vip = api.store.create_key("v", user_group="vip")
    early = create(api, edit([url], prompt="default early"))
    api.clock.advance(30)
    response = post(api, edit([url], prompt="vip soon after"), secret=vip)
    assert response.status_code == 200
    vip_task = response.json()
    assert vip_task["usage"]["user_group"] == "vip"
    assert vip_task["task_info"]["estimated_time"] == 30  # first in the queue
    # The head start is 60 s: a vip task 61 s later queues behind the default one.
    api.clock.advance(31)
    late = post(api, edit([url], prompt="vip much later"), secret=vip)
    assert late.status_code == 200
    assert late.json()["task_info"]["estimated_time"] == 90

    assert task_detail(api, early["id"])["task_info"]["estimated_time"] == 60
    assert api.store.queue_position(stored(api, vip_task["id"])) == 0
    assert api.store.queue_position(stored(api, early["id"])) == 1

    engine = RecordingEngine()
    api.start_worker(engine)
    wait_for(lambda: engine.runs == 3 and len(engine.prompts) == 3)
    assert engine.prompts == ["vip soon after", "default early", "vip much later"]


class HeldAtFirstStep(FixtureEngine):
    """Reports step 1 of 5 (20 %), then holds until released (or stopped)."""

    def __init__(self) -> None:
        super().__init__(step_seconds=0)
        self.release = threading.Event()

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Any]:
        on_step(1, 5)
        while not self.release.wait(0.02):
            if should_stop():
                raise Interrupted
        return super().run(job, lambda *_: None, should_stop)


def test_estimates_count_the_run_ahead_and_the_task_claimed_ahead(
    api: Api, image_host: ImageHost
) -> None:
    """With 30 s per task (nothing measured yet) and one worker: the running task has
    80 % left (24 s); the one its worker claimed ahead waits for it (24 + 30); a
    pending one waits for both, the queue ahead and itself."""
    url = image_host.add("/a.png", png_bytes())
    ids = []
    for index in range(4):
        ids.append(create(api, edit([url], prompt=f"task {index}"))["id"])
        api.clock.advance(1)
    engine = HeldAtFirstStep()
    api.start_worker(engine)
    wait_for(
        lambda: (
            stored(api, ids[0]).progress == 20
            and stored(api, ids[1]).status is TaskStatus.PROCESSING
        ),
        what="the first task at step 1, the second claimed ahead",
    )
    estimates = [task_detail(api, task_id)["task_info"]["estimated_time"] for task_id in ids]
    assert estimates == [24, 24 + 30, 24 + 30 + 30, 24 + 30 + 30 + 30]

    engine.release.set()
    for task_id in ids:
        done = wait_task(api.store, task_id, TaskStatus.COMPLETED)
        assert api.service.estimated_time(done) == 0


# -- the usage endpoint ----------------------------------------------------------


def test_usage_shows_the_account_its_credits_limits_and_tasks(api: Api) -> None:
    account = api.store.get_account("alice")
    assert usage(api) == {
        "object": "usage",
        "account": {"id": account.id, "name": "alice"},
        "user_group": "default",
        "credits": {"balance": 100.0, "reserved": 0.0, "available": 100.0},
        "limits": {"requests_per_minute": 60, "max_concurrent_tasks": 10},
        "tasks": task_counts(),
    }
    kept = create(api, edit([URL], n=3))
    dropped = create(api, edit([URL]))
    cancel(api, dropped["id"])
    api.store.update_account("alice", max_concurrent_tasks=4)
    # A second key of the same account sees the same account.
    _key, second = api.store.create_key("alice-ci", "alice")
    shown = usage(api, second)
    assert shown == {
        "object": "usage",
        "account": {"id": account.id, "name": "alice"},
        "user_group": "default",
        "credits": {"balance": 100.0, "reserved": 4.5, "available": 95.5},
        "limits": {"requests_per_minute": 60, "max_concurrent_tasks": 4},
        "tasks": task_counts(pending=1, cancelled=1),
    }
    assert task_detail(api, kept["id"])["usage"]["credits_reserved"] == 4.5

    _key, vip = api.store.create_key("v", user_group="vip", credits=12.5)
    assert usage(api, vip)["user_group"] == "vip"
    assert usage(api, vip)["credits"] == {"balance": 12.5, "reserved": 0.0, "available": 12.5}
    assert usage(api, vip)["limits"] == {"requests_per_minute": 600, "max_concurrent_tasks": 50}
    with api.client("") as client:
        assert_error(client.get("/v1/usage"), 401, "authentication_error")


def test_a_refusal_past_a_high_concurrency_limit_reads_the_queue_once(api: Api) -> None:
    """The Retry-After of a 429 for too many unfinished tasks looks up one queue position
    (per model), not one per unfinished task: at 1,000 unfinished tasks each refused
    create ran 1,000 queue counts, and clients past their limit retry in a loop."""
    limit = 25
    api.service.limits = Limits(
        default=GroupLimits(requests_per_minute=1_000, max_concurrent_tasks=limit)
    )
    created = [create(api, edit([URL])) for _ in range(limit)]
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(api.store.engine, "before_cursor_execute", count)
    try:
        refused = post(api, edit([URL]))
    finally:
        event.remove(api.store.engine, "before_cursor_execute", count)
    assert_error(refused, 429, "rate_limit_error")
    estimates = [task_detail(api, t["id"])["task_info"]["estimated_time"] for t in created]
    assert int(refused.headers["Retry-After"]) == min(estimates) == 30
    assert len(statements) < 10, "\n".join(statements)
