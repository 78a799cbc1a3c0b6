"""The worker's stages overlap: the engine runs the next task while the results of
the one before are encoded and stored, and a drain or a stop waits for those."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from retouch.accounts import EntryKind
from retouch.engine.base import EditJob, StepCallback, StopCheck
from retouch.engine.fixture import FixtureEngine
from retouch.images import decode_image
from retouch.tasks import TaskStatus
from tests.integration.conftest import Api
from tests.integration.test_api import create, edit, task_detail
from tests.integration.test_worker_lifecycle import (
    assert_handed_back,
    ledger_kinds,
    stored,
    wait_task,
    worker_thread,
)
from tests.support import ImageHost, png_bytes, wait_for


class PromptRecorder(FixtureEngine):
    """A fixture engine that records the prompt of each run as it starts and ends;
    the second run takes `second_steps` steps."""

    def __init__(self, second_steps: int = 3) -> None:
        super().__init__(step_seconds=0.05, steps=3)
        self.second_steps = second_steps
        self.started: list[str] = []
        self.finished: list[str] = []
        self.second_started = threading.Event()

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Image.Image]:
        self.started.append(job.prompt)
        if len(self.started) == 2:
            self.steps = self.second_steps
            self.second_started.set()
        outputs = super().run(job, on_step, should_stop)
        self.finished.append(job.prompt)
        return outputs


def held_puts(api: Api, monkeypatch: pytest.MonkeyPatch, task_id: str) -> threading.Event:
    """Make storing the results of `task_id` wait until the returned event is set."""
    release = threading.Event()
    real_put = api.storage.put

    def put(task: str, *args: Any) -> str:
        if task == task_id:
            assert release.wait(10), "the results of the first task were never released"
        return real_put(task, *args)

    monkeypatch.setattr(api.storage, "put", put)
    return release


def test_the_engine_runs_the_next_task_while_the_results_before_are_stored(
    api: Api, image_host: ImageHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = image_host.add("/a.png", png_bytes())
    first = create(api, edit([url], prompt="first"))["id"]
    api.clock.advance(1)
    second = create(api, edit([url], prompt="second"))["id"]
    release = held_puts(api, monkeypatch, first)
    engine = PromptRecorder()
    api.start_worker(engine)

    # Storing the first task's results is held; the engine goes on to the second.
    assert engine.second_started.wait(10), "the engine waited for the results before"
    assert engine.started == ["first", "second"]
    assert stored(api.store, first).status is TaskStatus.PROCESSING
    # The second task's results wait their turn: one task finishes at a time.
    wait_for(lambda: len(engine.finished) == 2, timeout=10, what="the second edit")
    time.sleep(0.2)
    assert stored(api.store, first).status is TaskStatus.PROCESSING
    assert stored(api.store, second).status is TaskStatus.PROCESSING

    release.set()
    for task_id in (first, second):
        done = wait_task(api.store, task_id, TaskStatus.COMPLETED, timeout=10)
        assert (done.progress, done.attempts, len(done.result_keys)) == (100, 1, 1)
        assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.CAPTURE]


@pytest.mark.parametrize("how", ["drain", "hard-stop"])
def test_a_worker_that_is_told_to_stop_still_completes_the_results_it_is_storing(
    api: Api, image_host: ImageHost, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The edit is done: its results are stored and the task completed before the
    worker ends, while the task behind it goes back to the queue."""
    url = image_host.add("/a.png", png_bytes())
    first = create(api, edit([url], prompt="first"))["id"]
    api.clock.advance(1)
    second = create(api, edit([url], prompt="second"))["id"]
    release = held_puts(api, monkeypatch, first)
    engine = PromptRecorder(second_steps=200)
    worker = api.start_worker(engine)
    thread = worker_thread(api, worker)
    assert engine.second_started.wait(10)
    wait_for(lambda: stored(api.store, second).progress >= 1, timeout=10, what="progress")

    if how == "drain":
        worker.drain(grace_seconds=0.2)
    else:
        worker.stopping.set()
    thread.join(1)
    assert thread.is_alive(), "the worker waits for the results it is storing"
    assert_handed_back(api.store, second)

    release.set()
    thread.join(10)
    assert not thread.is_alive()
    done = stored(api.store, first)
    assert (done.status, done.progress, len(done.result_keys)) == (TaskStatus.COMPLETED, 100, 1)
    assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.CAPTURE]


def test_several_results_are_stored_in_their_order(api: Api, image_host: ImageHost) -> None:
    """The results of one task are encoded in parallel; each link still serves the
    image the engine produced at its index."""
    source = png_bytes((512, 640), (30, 120, 220))
    task_id = create(api, edit([image_host.add("/a.png", source)], n=5, seed=7))["id"]
    api.start_worker(FixtureEngine(step_seconds=0.01, steps=2))
    wait_task(api.store, task_id, TaskStatus.COMPLETED, timeout=20)

    job = EditJob(
        images=[decode_image(source, "image")], prompt="", seed=7, steps=1, n=5, true_cfg_scale=1.0
    )
    expected = FixtureEngine(step_seconds=0).run(job, lambda *_: None, lambda: False)
    links = task_detail(api, task_id)["results"]
    assert len(links) == 5
    for link, image in zip(links, expected, strict=True):
        download = httpx.get(link)
        assert download.status_code == 200
        served = Image.open(io.BytesIO(download.content))
        assert served.convert("RGB").tobytes() == image.convert("RGB").tobytes()


def test_a_task_cancelled_while_it_waits_for_the_engine_ends_at_once(
    api: Api, image_host: ImageHost
) -> None:
    """The task claimed and fetched ahead (`processing`, progress 0) is cancelled within
    about a second, not after the edit ahead of it; the worker then prepares the
    next one while that edit still runs."""
    url = image_host.add("/a.png", png_bytes())
    running = create(api, edit([url], prompt="running"))["id"]
    api.clock.advance(1)
    waiting = create(api, edit([url], prompt="waiting"))["id"]
    api.clock.advance(1)
    behind = create(api, edit([url], prompt="behind"))["id"]
    engine = PromptRecorder(second_steps=3)
    engine.steps = 2000  # the first edit runs until the end of the test
    api.start_worker(engine)
    wait_for(lambda: stored(api.store, running).progress >= 1, timeout=10, what="progress")
    wait_task(api.store, waiting, TaskStatus.PROCESSING, timeout=10)

    with api.client() as client:
        assert client.post(f"/v1/tasks/{waiting}/cancel").status_code == 200
    done = wait_task(api.store, waiting, TaskStatus.CANCELLED, timeout=5)
    assert ledger_kinds(api.store, done) == [EntryKind.RESERVE, EntryKind.RELEASE]
    # Its place is taken by the task behind, while the first edit still runs.
    wait_task(api.store, behind, TaskStatus.PROCESSING, timeout=5)
    assert stored(api.store, running).status is TaskStatus.PROCESSING
    assert engine.started == ["running"]

    with api.client() as client:
        assert client.post(f"/v1/tasks/{running}/cancel").status_code == 200
    wait_task(api.store, behind, TaskStatus.COMPLETED, timeout=10)
    assert engine.started == ["running", "behind"]
