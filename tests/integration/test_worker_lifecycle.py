"""A worker's life cycle: draining, the grace period, a hard stop, and waking up
on PostgreSQL's notifications instead of polling."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, make_url, text, update
from sqlalchemy.exc import OperationalError

from retouch import server
from retouch.accounts import EntryKind
from retouch.clock import FakeClock
from retouch.engine.base import EditJob, StepCallback, StopCheck
from retouch.engine.fixture import FixtureEngine
from retouch.fetch import ImageFetcher
from retouch.keys import ApiKey
from retouch.settings import Settings
from retouch.store import Store, create_db_engine, migrate
from retouch.store.notify import Wakeups, announce_task
from retouch.store.schema import tasks
from retouch.tasks import EditParams, Task, TaskStatus
from retouch.worker import LoadedModel, Worker, WorkerConfig
from tests.conftest import BACKENDS, POSTGRES_URL
from tests.integration.conftest import SPEC, Api
from tests.integration.test_api import create, edit, task_detail
from tests.support import (
    ImageHost,
    free_port,
    pending_task,
    png_bytes,
    postgres_schema,
    wait_for,
)


def stored(store: Store, task_id: str) -> Task:
    task = store.get_task(task_id)
    assert task is not None, task_id
    return task


def wait_task(store: Store, task_id: str, *statuses: TaskStatus, timeout: float = 20) -> Task:
    task: Task = wait_for(
        lambda: (found := stored(store, task_id)).status in statuses and found,
        timeout=timeout,
        what=f"{task_id} to become {[s.value for s in statuses]}",
    )
    return task


def ledger_kinds(store: Store, task: Task) -> list[EntryKind]:
    """The kinds of the ledger entries of one task, oldest first."""
    entries = reversed(store.ledger(task.account_id))
    return [entry.kind for entry in entries if entry.task_id == task.id]


def worker_thread(api: Api, worker: Worker) -> threading.Thread:
    return next(thread for known, thread in api.workers if known is worker)


def assert_handed_back(store: Store, task_id: str) -> None:
    """Back in the queue as if never claimed: nobody's lease, no progress, the
    attempt not counted, the reservation still open."""
    task = stored(store, task_id)
    assert (task.status, task.progress, task.attempts) == (TaskStatus.PENDING, 0, 0)
    assert (task.lease_owner, task.lease_expires_at, task.finished_at) == (None, None, None)
    assert ledger_kinds(store, task) == [EntryKind.RESERVE]


# -- draining and stopping -----------------------------------------------------


def test_drain_lets_the_running_task_finish_and_claims_nothing_more(
    api: Api, image_host: ImageHost
) -> None:
    worker = api.start_worker(FixtureEngine(step_seconds=0.05, steps=30))
    thread = worker_thread(api, worker)
    url = image_host.add("/a.png", png_bytes())
    running = create(api, edit([url]))["id"]
    wait_for(worker.busy.is_set, timeout=10, what="the first task to run")
    api.clock.advance(1)  # the next two queue in a known order
    ahead = create(api, edit([url]))["id"]
    api.clock.advance(1)
    waiting = create(api, edit([url]))["id"]
    # The worker claims one task ahead of the engine, and only one.
    claimed = wait_task(api.store, ahead, TaskStatus.PROCESSING, timeout=5)
    assert claimed.lease_owner == worker.worker_id and claimed.attempts == 1
    assert stored(api.store, waiting).status is TaskStatus.PENDING
    assert worker.busy.is_set(), "the first task is still running when the drain begins"

    worker.drain(grace_seconds=30)

    thread.join(10)
    assert not thread.is_alive(), "a drained worker exits once its task is done"
    done = stored(api.store, running)
    assert (done.status, done.progress, done.attempts) == (TaskStatus.COMPLETED, 100, 1)
    assert len(done.result_keys) == 1
    assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.CAPTURE]
    # The task claimed ahead went back untouched; the other was never claimed.
    assert_handed_back(api.store, ahead)
    assert_handed_back(api.store, waiting)
    assert not worker.stopping.is_set(), "the grace period has not run out"


def test_an_idle_worker_drains_at_once(api: Api, image_host: ImageHost) -> None:
    worker = api.start_worker(FixtureEngine(step_seconds=0.01, steps=2))
    thread = worker_thread(api, worker)
    time.sleep(0.1)  # several idle polls
    started = time.monotonic()
    worker.drain(grace_seconds=30)
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0
    later = create(api, edit([image_host.add("/a.png", png_bytes())]))["id"]
    time.sleep(0.1)
    assert_handed_back(api.store, later)


def test_when_the_grace_period_runs_out_the_task_goes_back_to_the_queue(
    api: Api, image_host: ImageHost
) -> None:
    worker = api.start_worker(FixtureEngine(step_seconds=0.05, steps=200))
    thread = worker_thread(api, worker)
    url = image_host.add("/a.png", png_bytes())
    task_id = create(api, edit([url]))["id"]
    wait_for(lambda: stored(api.store, task_id).progress >= 2, timeout=10, what="progress")

    started = time.monotonic()
    worker.drain(grace_seconds=0.2)
    thread.join(5)
    elapsed = time.monotonic() - started

    assert not thread.is_alive()
    assert 0.2 <= elapsed < 2.0, elapsed
    assert worker.stopping.is_set()
    assert_handed_back(api.store, task_id)

    # Another worker takes it up and finishes it: one attempt, one capture.
    api.start_worker(FixtureEngine(step_seconds=0.001, steps=2))
    done = wait_task(api.store, task_id, TaskStatus.COMPLETED, timeout=10)
    assert (done.progress, done.attempts) == (100, 1)
    assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.CAPTURE]


def test_a_hard_stop_hands_back_the_running_and_the_prefetched_task_at_once(
    api: Api, image_host: ImageHost
) -> None:
    worker = api.start_worker(FixtureEngine(step_seconds=0.05, steps=200))
    thread = worker_thread(api, worker)
    url = image_host.add("/a.png", png_bytes())
    running = create(api, edit([url]))["id"]
    wait_for(lambda: stored(api.store, running).progress >= 1, timeout=10, what="progress")
    ahead = create(api, edit([url]))["id"]
    wait_task(api.store, ahead, TaskStatus.PROCESSING, timeout=5)

    started = time.monotonic()
    worker.stopping.set()
    thread.join(5)

    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0
    assert_handed_back(api.store, running)
    assert_handed_back(api.store, ahead)


def test_a_database_outage_mid_denoise_is_no_engine_failure(
    api: Api, image_host: ImageHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the database is away (a restart) the cancel checks and progress reports
    fail; the task keeps denoising and completes on its first attempt once it is
    back (`test_faults_processes.py` restarts a real PostgreSQL)."""
    api.start_worker(FixtureEngine(step_seconds=0.02, steps=60))
    task_id = create(api, edit([image_host.add("/a.png", png_bytes())]))["id"]
    wait_for(lambda: stored(api.store, task_id).progress >= 1, timeout=10, what="progress")
    outage = threading.Event()

    def unreachable(real: Callable[..., bool]) -> Callable[..., bool]:
        def call(*args: object) -> bool:
            if outage.is_set():
                raise OperationalError("SELECT", {}, ConnectionRefusedError("server closed"))
            return real(*args)

        return call

    monkeypatch.setattr(api.store, "should_stop", unreachable(api.store.should_stop))
    monkeypatch.setattr(api.store, "set_progress", unreachable(api.store.set_progress))
    outage.set()
    time.sleep(0.3)  # steps go by without the database
    assert stored(api.store, task_id).status is TaskStatus.PROCESSING
    outage.clear()
    done = wait_task(api.store, task_id, TaskStatus.COMPLETED, TaskStatus.FAILED)
    assert (done.status, done.attempts, done.error) == (TaskStatus.COMPLETED, 1, None)
    assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.CAPTURE]


def flaky(real: Callable[..., bool], failures: int, *, after_commit: bool) -> Callable[..., bool]:
    """`real`, whose first `failures` calls fail as a database going away does: before
    the write, or after it was committed (the answer lost on the way back)."""
    left = [failures]

    def call(*args: object) -> bool:
        if left[0] <= 0:
            return real(*args)
        left[0] -= 1
        if after_commit:
            real(*args)
        raise OperationalError(
            "UPDATE", {}, ConnectionResetError("server closed the connection unexpectedly")
        )

    return call


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "answer-lost"])
def test_a_database_outage_as_a_task_completes_costs_no_attempt(
    api: Api, image_host: ImageHost, monkeypatch: pytest.MonkeyPatch, after_commit: bool
) -> None:
    """Completing is retried while the database is away, and a completion whose
    commit went through unanswered is recognised as ours: the task completes on
    its first attempt, once billed, its result links working."""
    monkeypatch.setattr(
        api.store, "complete", flaky(api.store.complete, 3, after_commit=after_commit)
    )
    api.start_worker(FixtureEngine(step_seconds=0.01, steps=5))
    url = image_host.add("/a.png", png_bytes())
    task_id = create(api, edit([url], n=2))["id"]
    done = wait_task(api.store, task_id, TaskStatus.COMPLETED, TaskStatus.FAILED)
    assert (done.status, done.attempts, done.error) == (TaskStatus.COMPLETED, 1, None)
    assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.CAPTURE]
    links = task_detail(api, task_id)["results"]
    assert len(links) == 2 and all(httpx.get(link).status_code == 200 for link in links)
    # The worker carries on.
    following = create(api, edit([url]))["id"]
    assert wait_task(api.store, following, TaskStatus.COMPLETED).attempts == 1


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "answer-lost"])
def test_a_database_outage_as_a_task_fails_still_fails_it_once(
    api: Api, image_host: ImageHost, monkeypatch: pytest.MonkeyPatch, after_commit: bool
) -> None:
    """An engine failure met by a database outage: the task still fails with the
    engine's reason, progress 0 and its credits released, on its first attempt."""
    monkeypatch.setattr(api.store, "fail", flaky(api.store.fail, 2, after_commit=after_commit))
    engine = FixtureEngine(step_seconds=0.01, steps=20, fail_with=RuntimeError("boom"))
    api.start_worker(engine)
    url = image_host.add("/a.png", png_bytes())
    task_id = create(api, edit([url]))["id"]
    failed = wait_task(api.store, task_id, TaskStatus.FAILED, TaskStatus.COMPLETED)
    assert failed.error is not None and "RuntimeError: boom" in failed.error.message
    assert (failed.status, failed.attempts, failed.progress) == (TaskStatus.FAILED, 1, 0)
    assert ledger_kinds(api.store, failed) == [EntryKind.RESERVE, EntryKind.RELEASE]
    engine.fail_with = None
    following = create(api, edit([url]))["id"]
    assert wait_task(api.store, following, TaskStatus.COMPLETED).attempts == 1


def test_a_task_that_cannot_even_be_failed_does_not_stop_the_worker(
    api: Api, image_host: ImageHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing a task with a bad input breaks (a bug, not an outage): the task is
    left to its lease, and the worker goes on claiming and running tasks."""
    real_fail = api.store.fail
    broken = threading.Event()

    def fail(*args: object) -> bool:
        if not broken.is_set():
            broken.set()
            raise RuntimeError("the store broke")
        return real_fail(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(api.store, "fail", fail)
    worker = api.start_worker(FixtureEngine(step_seconds=0.01, steps=5))
    bad = create(api, edit([image_host.add("/not-an-image.png", b"not an image")]))["id"]
    wait_for(broken.is_set, timeout=10, what="failing the task to break")
    good = create(api, edit([image_host.add("/a.png", png_bytes())]))["id"]
    assert wait_task(api.store, good, TaskStatus.COMPLETED).attempts == 1
    assert worker_thread(api, worker).is_alive()
    stuck = stored(api.store, bad)
    assert (stuck.status, stuck.lease_owner) == (TaskStatus.PROCESSING, worker.worker_id)


def test_a_drain_with_the_database_away_still_ends_the_worker(
    api: Api, image_host: ImageHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing back the task claimed ahead fails (the database is restarting): the
    drain goes on, the worker ends without an error, and the task is left to its
    lease, to run again once that expires."""
    worker = api.start_worker(FixtureEngine(step_seconds=0.05, steps=30))
    thread = worker_thread(api, worker)
    url = image_host.add("/a.png", png_bytes())
    running = create(api, edit([url]))["id"]
    wait_for(worker.busy.is_set, timeout=10, what="the first task to run")
    api.clock.advance(1)
    ahead = create(api, edit([url]))["id"]
    wait_task(api.store, ahead, TaskStatus.PROCESSING, timeout=5)
    errors: list[BaseException] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda args: errors.append(args.exc_value or Exception())
    )

    def release(*_args: object) -> bool:
        raise OperationalError("UPDATE", {}, ConnectionRefusedError("server closed"))

    monkeypatch.setattr(api.store, "release", release)
    worker.drain(grace_seconds=30)

    thread.join(10)
    assert not thread.is_alive(), "a drained worker exits once its task is done"
    assert errors == []
    assert stored(api.store, running).status is TaskStatus.COMPLETED
    left = stored(api.store, ahead)
    assert (left.status, left.lease_owner) == (TaskStatus.PROCESSING, worker.worker_id)


# -- cancels that come in at any moment ------------------------------------------


def test_a_claimed_task_whose_cancel_was_requested_is_cancelled_without_fetching(
    api: Api, image_host: ImageHost
) -> None:
    """A queued task flagged for cancelling (an older version handed it back so) is
    cancelled as soon as it is claimed: no input is fetched, nothing runs, nothing
    is charged."""
    url = image_host.add("/a.png", png_bytes())
    task_id = create(api, edit([url]))["id"]
    with api.store.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(cancel_requested=True))
    engine = FixtureEngine(step_seconds=0.01, steps=3)
    api.start_worker(engine)
    cancelled = wait_task(api.store, task_id, TaskStatus.CANCELLED, TaskStatus.COMPLETED)
    assert (cancelled.status, cancelled.attempts) == (TaskStatus.CANCELLED, 1)
    assert image_host.requests == [] and engine.runs == 0
    assert ledger_kinds(api.store, cancelled) == [EntryKind.RESERVE, EntryKind.RELEASE]
    # The worker carries on with the next task.
    following = create(api, edit([url]))["id"]
    assert wait_task(api.store, following, TaskStatus.COMPLETED).attempts == 1


def endless_image(image_host: ImageHost) -> str:
    """An image URL whose body never ends: a byte every 0.1 s (the fetch limit is 5 s)."""

    def chunks() -> Iterator[bytes]:
        while True:
            yield b"x"

    return image_host.stream("/endless.png", chunks, drip_seconds=0.1)


def test_a_cancel_stops_the_fetch_of_its_inputs(api: Api, image_host: ImageHost) -> None:
    """A task cancelled while its inputs download is cancelled within about a second,
    not when the download's time limit runs out; the worker goes on."""
    engine = FixtureEngine(step_seconds=0.01, steps=3)
    api.start_worker(engine)
    task_id = create(api, edit([endless_image(image_host)]))["id"]
    wait_for(lambda: image_host.requests == ["/endless.png"], timeout=5, what="the fetch")
    started = time.monotonic()
    cancel_through_the_api(api, task_id)
    done = wait_task(api.store, task_id, TaskStatus.CANCELLED, TaskStatus.FAILED, timeout=10)
    assert done.status is TaskStatus.CANCELLED, done.error
    assert time.monotonic() - started < 3.0, "stopped by the cancel, not the 5 s limit"
    assert engine.runs == 0
    assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.RELEASE]
    following = create(api, edit([image_host.add("/a.png", png_bytes())]))["id"]
    assert wait_task(api.store, following, TaskStatus.COMPLETED).attempts == 1


def test_a_hard_stop_ends_a_fetch_and_hands_its_task_back(api: Api, image_host: ImageHost) -> None:
    worker = api.start_worker(FixtureEngine(step_seconds=0.01, steps=3))
    thread = worker_thread(api, worker)
    task_id = create(api, edit([endless_image(image_host)]))["id"]
    wait_for(lambda: image_host.requests == ["/endless.png"], timeout=5, what="the fetch")
    started = time.monotonic()
    worker.stopping.set()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.5, "the fetch ends at once, not at its 5 s limit"
    assert_handed_back(api.store, task_id)


class CancelledAsItFinishes(FixtureEngine):
    """A fixture engine whose task is cancelled just after its last step."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        super().__init__(step_seconds=0.01, steps=3)
        self.cancel = cancel

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Image.Image]:
        outputs = super().run(job, on_step, should_stop)
        self.cancel()
        return outputs


def cancel_through_the_api(api: Api, task_id: str) -> None:
    with api.client() as client:
        response = client.post(f"/v1/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("moment", ["after-the-edit", "while-storing", "as-it-completes"])
def test_a_cancel_after_the_edit_is_honoured_and_nothing_is_charged_or_kept(
    api: Api, image_host: ImageHost, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """A cancel that comes in once the engine is done (as the images are encoded,
    while they are stored, or just before the task completes) ends the task
    cancelled: its credits are released and none of its images is kept."""
    task_id = create(api, edit([image_host.add("/a.png", png_bytes())], n=2))["id"]
    engine: FixtureEngine = FixtureEngine(step_seconds=0.01, steps=3)
    if moment == "after-the-edit":
        engine = CancelledAsItFinishes(lambda: cancel_through_the_api(api, task_id))
    elif moment == "while-storing":
        real_put = api.storage.put

        def put(*args: Any) -> str:
            key = real_put(*args)
            cancel_through_the_api(api, task_id)
            return key

        monkeypatch.setattr(api.storage, "put", put)
    else:
        real_complete = api.store.complete

        def complete(*args: Any) -> bool:
            cancel_through_the_api(api, task_id)
            return real_complete(*args)

        monkeypatch.setattr(api.store, "complete", complete)
    api.start_worker(engine)
    done = wait_task(api.store, task_id, TaskStatus.CANCELLED, TaskStatus.COMPLETED)
    assert (done.status, done.result_keys, done.error) == (TaskStatus.CANCELLED, [], None)
    assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.RELEASE]
    assert not list(api.storage.root.rglob("*.png")), "no image of the cancelled task is kept"
    assert task_detail(api, task_id)["status"] == "cancelled"


# -- the server's worker supervisor ------------------------------------------------


def test_the_supervisor_keeps_restarting_a_worker_that_will_not_start(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker process died, and starting a new one fails (no process could be
    forked, say): the supervisor logs it and tries again after a wait, until one
    starts, instead of its monitor dying and the server running on without one."""
    context = multiprocessing.get_context("spawn")
    starts: list[str] = []
    processes: list[BaseProcess] = []

    def spawn() -> BaseProcess:
        starts.append("start")
        if len(starts) in (2, 3):
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        # The first worker dies at once; the one at last started lives on.
        process = context.Process(target=time.sleep, args=(0 if len(starts) == 1 else 60,))
        process.daemon = True
        process.start()
        processes.append(process)
        if len(starts) == 4:
            # Still starting (loading its model, say) when the server stops: the
            # supervisor must stop this one too, not only the one it knew of.
            time.sleep(0.5)
        return process

    monkeypatch.setattr(server, "_RESTART_DELAY_SECONDS", 0.01)
    supervisor = server.WorkerSupervisor(Settings(data_dir=tmp_path / "data"), store)
    monkeypatch.setattr(supervisor, "_spawn", spawn)
    caplog.set_level(logging.ERROR, logger="retouch.server")
    supervisor.start()
    try:
        wait_for(lambda: len(processes) == 2, timeout=30, what="the worker to be started again")
        assert len(starts) == 4 and processes[-1].is_alive()
    finally:
        supervisor.stop()
    assert processes[-1].exitcode is not None, "stopped with the server"
    failures = [r for r in caplog.records if r.getMessage().startswith("could not restart")]
    assert [r.getMessage() for r in failures] == [
        "could not restart the worker (next try in 0 s)",
        "could not restart the worker (next try in 0 s)",
    ]
    assert all(isinstance(r.exc_info and r.exc_info[1], OSError) for r in failures)


# -- waking up on notifications (PostgreSQL) ---------------------------------------


def make_task(store: Store, key: ApiKey) -> Task:
    now = store.clock.now()
    params = EditParams(prompt="edit", image_urls=["https://example.com/a.png"])
    task = pending_task(key, now, params, credits=1.5, model=SPEC.name)
    return store.create_task(task)[0]


@pytest.fixture(params=BACKENDS)
def quiet_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store in a database of its own: other test runs may share the test
    database (and its schema `public`), and exact assertions about what a
    listener hears need a quiet one."""
    if request.param == "sqlite":
        store = Store(create_db_engine(f"sqlite:///{tmp_path / 'test.db'}"), FakeClock())
        migrate(store.engine)
        yield store
        store.close()
        return
    assert POSTGRES_URL is not None
    name = f"retouch_quiet_{secrets.token_hex(6)}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        store = Store(create_db_engine(url), FakeClock())
        migrate(store.engine)
        yield store
        problems = store.check_ledger()
        store.close()
        assert not problems, problems
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


class CountingWakeups(Wakeups):
    """Wakeups that count how often they were waited on and how often they woke."""

    def __init__(self, store: Store) -> None:
        super().__init__(store.engine)
        self.waits = 0
        self.woken = 0

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        woken = super().wait(timeout)
        self.woken += woken
        return woken


def test_wakeups_exist_only_on_postgresql(store: Store) -> None:
    wakeups = Wakeups.for_engine(store.engine)
    if store.engine.dialect.name == "sqlite":
        assert wakeups is None
        return
    assert isinstance(wakeups, Wakeups)
    wakeups.close()


@pytest.mark.skipif(POSTGRES_URL is None, reason="needs RETOUCH_TEST_DATABASE_URL (PostgreSQL)")
def test_a_listener_wakes_only_for_tasks_in_its_own_schema() -> None:
    """Two deployments sharing one database through schemas: a task queued in the
    other schema wakes none of our workers, one queued in ours does."""
    assert POSTGRES_URL is not None
    with postgres_schema(POSTGRES_URL) as ours_url, postgres_schema(POSTGRES_URL) as theirs_url:
        ours, theirs = (Store(create_db_engine(url), FakeClock()) for url in (ours_url, theirs_url))
        wakeups = Wakeups(ours.engine)
        try:
            for store in (ours, theirs):
                migrate(store.engine)
            wakeups.start()
            make_task(theirs, theirs.create_key("them")[0])
            assert not wakeups.wait(0.5)
            make_task(ours, ours.create_key("us")[0])
            assert wakeups.wait(5)
        finally:
            wakeups.close()
            ours.close()
            theirs.close()


def test_a_new_task_wakes_a_listener_and_silence_times_out(quiet_store: Store) -> None:
    wakeups = Wakeups.for_engine(quiet_store.engine)
    if quiet_store.engine.dialect.name == "sqlite":
        assert wakeups is None  # SQLite workers poll
        return
    assert wakeups is not None
    key = quiet_store.create_key("alice")[0]
    try:
        assert wakeups.wait(0) is False  # listening from here on
        started = time.monotonic()
        assert wakeups.wait(0.3) is False, "nothing was announced"
        assert time.monotonic() - started >= 0.3

        creator = threading.Timer(0.1, make_task, args=(quiet_store, key))
        started = time.monotonic()
        creator.start()
        assert wakeups.wait(5) is True
        assert time.monotonic() - started < 1.0
        creator.join()

        # Announcements made while nobody waited are not lost.
        make_task(quiet_store, key)
        time.sleep(0.1)
        assert wakeups.wait(1) is True
        assert wakeups.wait(0.2) is False, "each announcement wakes once"
    finally:
        wakeups.close()


def test_a_task_handed_back_to_the_queue_is_announced(quiet_store: Store) -> None:
    wakeups = Wakeups.for_engine(quiet_store.engine)
    if wakeups is None:
        assert quiet_store.engine.dialect.name == "sqlite"
        return
    assert isinstance(quiet_store.clock, FakeClock)
    key = quiet_store.create_key("alice")[0]
    try:
        task = make_task(quiet_store, key)
        assert wakeups.wait(0) is False  # listening from now on: the creation came before
        assert quiet_store.claim_next("w1", 30.0) is not None
        assert wakeups.wait(0.2) is False, "a claim announces nothing"
        # Released at shutdown.
        assert quiet_store.release(task.id, "w1")
        assert wakeups.wait(1) is True
        # Requeued when its worker vanished.
        assert quiet_store.claim_next("w2", 30.0) is not None
        quiet_store.clock.advance(31)
        assert quiet_store.reap_expired_leases(max_attempts=3) == 1
        assert wakeups.wait(1) is True
        assert stored(quiet_store, task.id).status is TaskStatus.PENDING
        assert wakeups.wait(0.2) is False
    finally:
        wakeups.close()


def test_an_idle_worker_is_woken_by_a_new_task_not_by_its_idle_timeout(
    api: Api, image_host: ImageHost
) -> None:
    if api.store.engine.dialect.name == "sqlite":
        assert Wakeups.for_engine(api.store.engine) is None
        return
    wakeups = CountingWakeups(api.store)
    worker = Worker(
        api.store,
        api.storage,
        {SPEC.name: LoadedModel(SPEC, FixtureEngine(step_seconds=0.01, steps=3))},
        ImageFetcher(allow_private_networks=True, allowed_ports=None, timeout_seconds=5),
        WorkerConfig(lease_seconds=30, poll_interval_seconds=0.05, idle_wait_seconds=30),
        clock=api.clock,
        wakeups=wakeups,
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        # Listen before the worker's first look at the queue, and make sure that
        # announcements arrive before a worker depends on them.
        wakeups.wait(0)
        with api.store.engine.begin() as conn:
            announce_task(conn)
        assert wakeups.wait(2) is True, "the listener hears announcements"
        wakeups.waits = wakeups.woken = 0  # from here on, the worker's own waits
        thread.start()
        wait_for(lambda: wakeups.waits >= 5, timeout=5, what="the worker to idle")
        url = image_host.add("/a.png", png_bytes())
        task_id = create(api, edit([url]))["id"]
        started = time.monotonic()
        # Without the wake-up the worker would look again only after its 30 s idle
        # wait; the bound leaves room for a busy machine.
        wait_for(
            lambda: stored(api.store, task_id).status is not TaskStatus.PENDING,
            timeout=5.0,
            interval=0.01,
            what="the worker to claim the new task",
        )
        assert time.monotonic() - started < 5.0
        assert wakeups.woken >= 1
        wait_task(api.store, task_id, TaskStatus.COMPLETED, timeout=10)
    finally:
        worker.stopping.set()
        if thread.is_alive():
            thread.join(5)
        wakeups.close()
    assert not thread.is_alive()


def test_listening_on_an_unreachable_database_waits_out_its_timeout() -> None:
    """A worker idles by calling `wait(poll interval)` in a loop: a `wait` that
    fails at once would spin, opening a connection and logging a traceback each
    time, for as long as the database is down."""
    engine = create_db_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    wakeups = Wakeups.for_engine(engine)
    assert wakeups is not None
    try:
        started = time.monotonic()
        assert wakeups.wait(0.2) is False
        assert time.monotonic() - started >= 0.2
    finally:
        wakeups.close()
        engine.dispose()
