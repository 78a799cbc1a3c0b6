"""The worker: claim a task, fetch its inputs, run the engine, store results, finalize.

A worker holds a lease on the task it runs and renews it while it works; every
write it makes is conditional on still holding that lease, so a worker that
was presumed dead can never finish a task twice.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from PIL import Image

from retouch.clock import Clock, SystemClock
from retouch.engine.base import EditJob, Engine, Interrupted
from retouch.errors import InputImageError
from retouch.fetch import ImageFetcher
from retouch.images import decode_image, encode_png
from retouch.storage import ResultStorage
from retouch.store import Store
from retouch.tasks import Task, TaskError

log = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class WorkerConfig:
    lease_seconds: float = 60.0
    result_ttl_seconds: int = 24 * 3600
    poll_interval_seconds: float = 0.2


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(4)}"


class Worker:
    def __init__(
        self,
        store: Store,
        storage: ResultStorage,
        engine: Engine,
        fetcher: ImageFetcher,
        config: WorkerConfig | None = None,
        *,
        worker_id: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.engine = engine
        self.fetcher = fetcher
        self.config = config or WorkerConfig()
        self.worker_id = worker_id or new_worker_id()
        self.clock = clock or SystemClock()
        self.stopping = threading.Event()

    def run(self) -> None:
        """Work until `stopping` is set; a running task is handed back, not lost."""
        log.info("worker %s started", self.worker_id)
        while not self.stopping.is_set():
            try:
                busy = self.run_once()
            except Exception:
                # The store is unreachable or similar: keep the worker alive and retry.
                log.exception("worker %s: could not run the next task", self.worker_id)
                busy = False
            if not busy:
                self.stopping.wait(self.config.poll_interval_seconds)
        log.info("worker %s stopped", self.worker_id)

    def run_once(self) -> bool:
        """Run the next pending task, if there is one."""
        task = self.store.claim_next(self.worker_id, self.config.lease_seconds)
        if task is None:
            return False
        with _LeaseKeeper(self.store, task.id, self.worker_id, self.config.lease_seconds):
            _TaskRun(self, task).execute()
        return True


class _TaskRun:
    """One attempt at one task."""

    def __init__(self, worker: Worker, task: Task) -> None:
        self.worker = worker
        self.task = task
        self.store = worker.store
        self._reported = task.progress

    def execute(self) -> None:
        worker_id = self.worker.worker_id
        try:
            images = self._fetch_inputs()
            if self.should_stop():
                raise Interrupted
            outputs = self.worker.engine.run(self._job(images), self.on_step, self.should_stop)
            self._finish(outputs)
        except Interrupted:
            self._interrupted()
        except InputImageError as exc:
            log.info("task %s: bad input %s: %s", self.task.id, exc.param, exc.message)
            error = TaskError(code=exc.status, type=exc.type, message=exc.message, param=exc.param)
            self.store.fail(self.task.id, worker_id, error)
        except Exception as exc:
            log.exception("task %s: the engine failed", self.task.id)
            self.store.fail(self.task.id, worker_id, engine_error(exc))

    def should_stop(self) -> bool:
        return self.worker.stopping.is_set() or self.store.should_stop(
            self.task.id, self.worker.worker_id
        )

    def on_step(self, done: int, total: int) -> None:
        # 100 is reserved for a completed task; steps map onto 0-99.
        progress = min(99, done * 100 // max(total, 1))
        if progress > self._reported:
            self._reported = progress
            self.store.set_progress(
                self.task.id, self.worker.worker_id, progress, self.worker.config.lease_seconds
            )

    def _fetch_inputs(self) -> list[Image.Image]:
        urls = self.task.params.image_urls
        limit = self.worker.engine.max_images
        if len(urls) > limit:
            raise InputImageError(
                f"this model takes at most {limit} image(s); {len(urls)} were given",
                param="image_urls",
            )

        def fetch(index: int) -> Image.Image:
            param = f"image_urls[{index}]"
            return decode_image(self.worker.fetcher.fetch(urls[index], param), param)

        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            return list(pool.map(fetch, range(len(urls))))

    def _job(self, images: list[Image.Image]) -> EditJob:
        params = self.task.params
        engine = self.worker.engine
        return EditJob(
            images=images,
            prompt=params.prompt,
            seed=params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1),
            steps=engine.default_steps,
            true_cfg_scale=engine.default_true_cfg_scale,
            negative_prompt=params.negative_prompt or engine.default_negative_prompt,
            n=params.n,
            width=params.width,
            height=params.height,
        )

    def _finish(self, outputs: list[Image.Image]) -> None:
        worker = self.worker
        keys = [
            worker.storage.put(self.task.id, index, encode_png(image))
            for index, image in enumerate(outputs)
        ]
        expires = worker.clock.now() + timedelta(seconds=worker.config.result_ttl_seconds)
        if not self.store.complete(self.task.id, worker.worker_id, keys, expires):
            # The lease was lost (we were presumed dead): the task is someone else's now.
            log.warning("task %s: lease lost before completion; results dropped", self.task.id)
            worker.storage.delete(keys)

    def _interrupted(self) -> None:
        worker_id = self.worker.worker_id
        if self.store.cancel_was_requested(self.task.id):
            self.store.cancel_running(self.task.id, worker_id)
            log.info("task %s: cancelled while running", self.task.id)
        elif self.worker.stopping.is_set():
            self.store.release(self.task.id, worker_id)
            log.info("task %s: handed back to the queue at shutdown", self.task.id)
        else:
            log.warning("task %s: lease lost while running", self.task.id)


def engine_error(exc: BaseException) -> TaskError:
    """What a client sees when the engine fails: the cause, never a traceback."""
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if "out of memory" in detail.lower():
        message = (
            f"the GPU ran out of memory while editing ({detail}); "
            "try a smaller size, fewer images or fewer results"
        )
    else:
        message = f"the model failed while editing: {type(exc).__name__}: {detail}"
    return TaskError(code=500, type="internal_server_error", message=message)


class _LeaseKeeper:
    """Renews a task's lease in the background while the worker runs it."""

    def __init__(self, store: Store, task_id: str, worker_id: str, lease_seconds: float) -> None:
        self._store = store
        self._task_id = task_id
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{task_id}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._done.wait(self._lease_seconds / 3):
            if not self._store.renew_lease(self._task_id, self._worker_id, self._lease_seconds):
                return
