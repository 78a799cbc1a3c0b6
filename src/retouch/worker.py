"""The worker: claim a task, fetch its inputs, run the engine, store results, finalize.

Three stages keep the GPU busy: a prefetch thread claims the next task and
fetches and decodes its inputs while the engine is still running the current
one, and a finishing thread encodes, stores and completes the task before it
while the engine runs the next. At most one task waits ahead of the engine and
one behind it.

A worker holds a lease on each task it has claimed and renews it while it
works; every write it makes is conditional on still holding that lease, so a
worker that was presumed dead can never finish a task twice.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

from PIL import Image

from retouch.clock import Clock, SystemClock
from retouch.engine.base import EditJob, Engine, Interrupted
from retouch.errors import InvalidInputError, first_line
from retouch.fetch import FetchStopped, ImageFetcher
from retouch.images import decode_image, encode_png
from retouch.logs import RepeatedFailure, context
from retouch.metrics import STAGE_SECONDS, STEP_SECONDS, TASKS_FINISHED
from retouch.models import ModelSpec
from retouch.prompts import ensure_prompt_fits
from retouch.storage import ResultStorage, new_run
from retouch.store import Store, database_unavailable
from retouch.store.notify import Wakeups
from retouch.tasks import MAX_SEED, Task, TaskError, TaskStatus
from retouch.uploads import Uploads

log = logging.getLogger(__name__)
_JITTER = secrets.SystemRandom()
# Retrying a finalizing write while the database is unreachable: doubling waits.
_FINALIZE_FIRST_DELAY = 0.25
_FINALIZE_MAX_DELAY = 5.0
# Threads encoding result PNGs (n is at most 6).
ENCODER_THREADS = max(1, min(6, os.cpu_count() or 1))


@dataclass(frozen=True)
class WorkerConfig:
    lease_seconds: float = 60.0
    result_ttl_seconds: int = 24 * 3600
    poll_interval_seconds: float = 0.2
    # With notifications an idle worker still looks for work this often (a missed
    # notification costs at most this long); without them, every poll interval.
    idle_wait_seconds: float = 0.2


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    engine: Engine


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(4)}"


class Worker:
    def __init__(
        self,
        store: Store,
        storage: ResultStorage,
        models: Mapping[str, LoadedModel],
        fetcher: ImageFetcher,
        config: WorkerConfig | None = None,
        *,
        worker_id: str | None = None,
        clock: Clock | None = None,
        wakeups: Wakeups | None = None,
        uploads: Uploads | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.models = dict(models)
        self.fetcher = fetcher
        self.config = config or WorkerConfig()
        self.worker_id = worker_id or new_worker_id()
        self._claim_failures = RepeatedFailure(log, f"worker {self.worker_id}: claiming a task")
        self.clock = clock or SystemClock()
        self.wakeups = wakeups
        self.uploads = uploads
        # `draining`: claim nothing more, finish what runs; `stopping`: stop now and
        # hand what runs back to the queue.
        self.draining = threading.Event()
        self.stopping = threading.Event()
        self.busy = threading.Event()
        self._ready: queue.Queue[_Prepared | None] = queue.Queue()
        self._slot = threading.Semaphore(1)
        # The task prepared and waiting for the engine (at most one: the slot).
        self._waiting: _Prepared | None = None
        # The finishing stage (one thread) and the PNG encoders; threads start on use.
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="finish")
        self._finishing: Future[None] | None = None
        self.encoders = ThreadPoolExecutor(ENCODER_THREADS, thread_name_prefix="encode")

    def drain(self, grace_seconds: float) -> None:
        """Stop claiming; let the running task finish for up to `grace_seconds`, then
        hand it back to the queue (what SIGTERM does)."""
        log.info("worker %s: draining (grace %.0f s)", self.worker_id, grace_seconds)
        self.draining.set()
        timer = threading.Timer(grace_seconds, self.stopping.set)
        timer.daemon = True
        timer.start()

    def run(self) -> None:
        """Work until drained or stopped; tasks in hand go back to the queue, not lost."""
        log.info("worker %s started, serving %s", self.worker_id, ", ".join(self.models))
        if self.wakeups is not None:
            self.wakeups.start()
        prefetcher = threading.Thread(target=self._prefetch_loop, name="prefetch", daemon=True)
        prefetcher.start()
        try:
            while (prepared := self._ready.get()) is not None:
                if not prepared.take():
                    continue  # cancelled while it waited: ended, its slot freed then
                self._slot.release()
                if self.draining.is_set() or self.stopping.is_set():
                    # Claimed ahead but not started: someone else may run it now.
                    with prepared.lease:
                        self._hand_back(prepared.task.id)
                    continue
                self._run_task(prepared)
        finally:
            self._await_finishing()
            self._finisher.shutdown()
            self.encoders.shutdown()
        prefetcher.join()
        log.info("worker %s stopped", self.worker_id)

    def _run_task(self, prepared: _Prepared) -> None:
        """Stage 2: run the engine, then hand the results to the finishing stage (once
        the task before has finished there), or end the task here."""
        run = _TaskRun(self, prepared)
        outputs: list[Image.Image] | None = None
        self.busy.set()
        try:
            with context(task_id=prepared.task.id, worker_id=self.worker_id):
                outputs = run.execute()
        except Exception:
            # Finalizing failed (store unreachable): the lease will expire and the task
            # will be retried; the worker itself carries on.
            log.exception("task %s: could not be finalized", prepared.task.id)
        finally:
            self.busy.clear()
            if outputs is None:
                prepared.lease.stop()
        if outputs is None:
            return
        self._await_finishing()
        self._finishing = self._finisher.submit(self._finish_task, run, outputs)

    def _finish_task(self, run: _TaskRun, outputs: list[Image.Image]) -> None:
        """Stage 3: encode and store the results and complete the task."""
        try:
            with context(task_id=run.task.id, worker_id=self.worker_id):
                run.finish(outputs)
        except Exception:
            log.exception("task %s: could not be finalized", run.task.id)
        finally:
            run.lease.stop()

    def _await_finishing(self) -> None:
        if self._finishing is not None:
            self._finishing.result()
            self._finishing = None

    def _hand_back(self, task_id: str) -> None:
        try:
            self.store.release(task_id, self.worker_id)
        except Exception:
            # The database is away (a drain during its restart, say): the lease will
            # expire and the task run again; the drain goes on.
            log.exception("task %s: could not be handed back to the queue", task_id)

    # -- stage 1: claim and prepare ---------------------------------------

    def _claiming(self) -> bool:
        return not (self.draining.is_set() or self.stopping.is_set())

    def _prefetch_loop(self) -> None:
        try:
            while self._claiming():
                if not self._slot.acquire(timeout=self.config.poll_interval_seconds):
                    self._withdraw_if_cancelled()
                    continue
                if not self._claiming() or not self._prefetch_one():
                    self._slot.release()
                    self._idle()
        finally:
            self._ready.put(None)

    def _withdraw_if_cancelled(self) -> None:
        """End the task waiting for the engine if it was cancelled (or its lease lost)
        meanwhile: a cancel must not wait for the edit ahead of it to finish. The store
        is asked at most once a second."""
        waiting = self._waiting
        if waiting is None or self.stopping.is_set() or not waiting.stop():
            return
        if not waiting.withdraw():
            return  # the engine took it first: it stops there at its first step
        self._slot.release()
        task_id = waiting.task.id
        with waiting.lease, context(task_id=task_id, worker_id=self.worker_id):
            try:
                self._stopped_early(task_id, "waiting for the engine")
            except Exception:
                # The database is away: the lease will expire; the cancel is kept.
                log.exception("task %s: could not be cancelled", task_id)

    def _idle(self) -> None:
        """Wait for work: woken by the store's notification of a new task where the
        backend has one (PostgreSQL), else after the poll interval."""
        deadline = time.monotonic() + self.config.idle_wait_seconds
        while self._claiming():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # Jittered, so that workers polling one database do not fall into step.
            step = min(remaining, self.config.poll_interval_seconds * _JITTER.uniform(0.8, 1.2))
            if self.wakeups is None:
                self.stopping.wait(step)
                if self.draining.is_set():
                    return
                continue
            if self.wakeups.wait(step):
                return

    def _prefetch_one(self) -> bool:
        """Claim a task and hand it to the engine stage; False when none was handed."""
        try:
            task = self.store.claim_next(
                self.worker_id, self.config.lease_seconds, models=list(self.models)
            )
        except Exception as exc:
            # The store is unreachable or similar: keep the worker alive and retry.
            self._claim_failures.failed(exc)
            return False
        self._claim_failures.succeeded()
        if task is None:
            return False
        if task.started_at is not None:
            wait = (task.started_at - task.created_at).total_seconds()
            STAGE_SECONDS.labels("queue_wait").observe(max(0.0, wait))
        lease = _LeaseKeeper(self.store, task.id, self.worker_id, self.config.lease_seconds)
        lease.start()
        try:
            with context(task_id=task.id, worker_id=self.worker_id):
                prepared = self._prepare(task, lease)
        except Exception:
            # Failing (or cancelling) it did not work (the worker was stopped while the
            # database was away, or the store broke): its lease will expire and the
            # task will run again; the worker goes on.
            log.exception("task %s: could not be failed or cancelled", task.id)
            lease.stop()
            return False
        except BaseException:
            lease.stop()
            raise
        if prepared is None:
            lease.stop()
            return False
        self._waiting = prepared
        self._ready.put(prepared)
        return True

    def _prepare(self, task: Task, lease: _LeaseKeeper) -> _Prepared | None:
        """Check the prompt and fetch the inputs, or finalize the task here."""
        if task.cancel_requested:
            # Cancelled before this claim (handed back by an older version, say):
            # nothing is fetched or run.
            self.cancel(task.id)
            return None
        model = self.models[task.model]
        try:
            check_prompt(model.engine, task.params.prompt)
            images = self._fetch_inputs(task, model.spec)
        except FetchStopped:
            self._stopped_early(task.id, "fetching its inputs")
            return None
        except InvalidInputError as exc:
            log.info("task %s: bad input %s: %s", task.id, exc.param, exc.message)
            error = TaskError(code=exc.status, type=exc.type, message=exc.message, param=exc.param)
            self.fail(task.id, error)
            return None
        except Exception as exc:
            log.exception("task %s: preparing the inputs failed", task.id)
            self.fail(task.id, engine_error(exc))
            return None
        return _Prepared(task, model, images, lease, _StopCheck(self, task.id))

    def _stopped_early(self, task_id: str, doing: str) -> None:
        """A task stopped before it ran (`doing`: what it was doing): the worker is
        stopping (it goes back to the queue), it was cancelled (it is cancelled here)
        or its lease was lost."""
        if self.stopping.is_set():
            log.info("task %s: %s stopped: the worker is stopping", task_id, doing)
            self._hand_back(task_id)
        elif self.store.cancel_was_requested(task_id):
            self.cancel(task_id)
        else:
            log.warning("task %s: lease lost while %s", task_id, doing)

    def fail(self, task_id: str, error: TaskError) -> bool:
        """Fail a task this worker holds; False if its lease was lost."""
        return finalize(
            self,
            task_id,
            "failing",
            lambda: self.store.fail(task_id, self.worker_id, error),
            lambda task: task.status is TaskStatus.FAILED,
        )

    def cancel(self, task_id: str) -> bool:
        """Cancel a task this worker holds whose cancel was requested; False if its
        lease was lost."""
        cancelled = finalize(
            self,
            task_id,
            "cancelling",
            lambda: self.store.cancel_running(task_id, self.worker_id),
            lambda task: task.status is TaskStatus.CANCELLED,
        )
        if cancelled:
            TASKS_FINISHED.labels("cancelled").inc()
            log.info("task %s: cancelled", task_id)
        else:
            log.warning("task %s: lease lost before it could be cancelled", task_id)
        return cancelled

    def _fetch_inputs(self, task: Task, spec: ModelSpec) -> list[Image.Image]:
        urls = task.params.image_urls
        if len(urls) > spec.max_images:
            raise InvalidInputError(
                f"model {spec.name!r} takes at most {spec.max_images} image(s); "
                f"{len(urls)} were given",
                param="image_urls",
            )

        stop = _StopCheck(self, task.id)

        def fetch(index: int) -> Image.Image:
            param = f"image_urls[{index}]"
            data = self.uploads.resolve(urls[index], param) if self.uploads else None
            if data is None:
                data = self.fetcher.fetch(urls[index], param, should_stop=stop)
            return decode_image(data, param)

        with STAGE_SECONDS.labels("fetch").time(), ThreadPoolExecutor(len(urls)) as pool:
            return list(pool.map(fetch, range(len(urls))))


def finalize(
    worker: Worker,
    task_id: str,
    what: str,
    write: Callable[[], bool],
    landed: Callable[[Task], bool],
) -> bool:
    """Run a finalizing write, conditional on the worker's lease; True if it took effect.

    While the database is unreachable the write is retried (the lease keeper renews
    the lease meanwhile), so a database restart as a task finishes costs no attempt.
    A try whose commit may have gone through unanswered is settled by reading the
    task back: `landed` tells whether it holds our write. Once the worker is told to
    stop it gives up, raising: the lease then expires and the task runs again."""
    failures = RepeatedFailure(log, f"task {task_id}: {what}")
    delay = _FINALIZE_FIRST_DELAY
    uncertain = False
    while True:
        try:
            if write():
                failures.succeeded()
                return True
            if not uncertain:
                return False
            task = worker.store.get_task(task_id)
            failures.succeeded()
            return task is not None and landed(task)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            failures.failed(exc)
            uncertain = True
            if worker.stopping.wait(delay):
                raise
        delay = min(delay * 2, _FINALIZE_MAX_DELAY)


def check_prompt(engine: Engine, prompt: str) -> None:
    ensure_prompt_fits(engine.count_tokens(prompt))


@dataclass
class _Prepared:
    """A task ready for the engine: taken by it, or withdrawn while it waits."""

    task: Task
    model: LoadedModel
    images: list[Image.Image]
    lease: _LeaseKeeper
    stop: _StopCheck
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _state: str = "waiting"  # then "taken" or "withdrawn"

    def take(self) -> bool:
        return self._move("taken")

    def withdraw(self) -> bool:
        return self._move("withdrawn")

    def _move(self, state: str) -> bool:
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = state
            return True


class _TaskRun:
    """Stage 2: one attempt at one prepared task on the engine."""

    def __init__(self, worker: Worker, prepared: _Prepared) -> None:
        self.worker = worker
        self.task = prepared.task
        self.model = prepared.model
        self.images = prepared.images
        self.lease = prepared.lease
        self.store = worker.store
        self._reported = self.task.progress
        self._last_step = time.perf_counter()
        # The database going away (restarting, say) is no engine failure: the task
        # carries on. Its lease keeper renews the lease once the database is back,
        # and finishing it is conditional on still holding that lease.
        self._store_failures = RepeatedFailure(
            log, f"task {self.task.id}: reaching the database (the task carries on)"
        )
        self.run = new_run()

    def execute(self) -> list[Image.Image] | None:
        """The edited images, or None once the task has been ended here (failed,
        cancelled or handed back)."""
        try:
            if self.should_stop():
                raise Interrupted
            self._mark_running()
            started = time.perf_counter()
            self._last_step = started
            outputs = self.model.engine.run(self._job(), self.on_step, self.should_stop)
            STAGE_SECONDS.labels("gpu").observe(time.perf_counter() - started)
            return outputs
        except Interrupted:
            self._interrupted()
        except Exception as exc:
            log.exception("task %s: the engine failed", self.task.id)
            self._fail(engine_error(exc))
        return None

    def finish(self, outputs: list[Image.Image]) -> None:
        try:
            self._finish(outputs)
        except Interrupted:
            self._interrupted()

    def _fail(self, error: TaskError) -> None:
        if self.worker.fail(self.task.id, error):
            TASKS_FINISHED.labels("failed").inc()

    def should_stop(self) -> bool:
        return self.worker.stopping.is_set() or self._cancelled_or_lost()

    def _cancelled_or_lost(self) -> bool:
        """The task was cancelled or its lease lost (with the database away: no)."""
        try:
            stop = self.store.should_stop(self.task.id, self.worker.worker_id)
        except Exception as exc:
            self._store_failures.failed(exc)
            return False
        self._store_failures.succeeded()
        return stop

    def _mark_running(self) -> None:
        """Record the start of the run (what wait estimates measure from)."""
        try:
            self.store.mark_running(self.task.id, self.worker.worker_id)
        except Exception as exc:
            self._store_failures.failed(exc)
            return
        self._store_failures.succeeded()

    def on_step(self, done: int, total: int) -> None:
        now = time.perf_counter()
        STEP_SECONDS.observe(now - self._last_step)
        self._last_step = now
        # 100 is reserved for a completed task; steps map onto 0-99.
        progress = min(99, done * 100 // max(total, 1))
        if progress > self._reported:
            try:
                self.store.set_progress(
                    self.task.id, self.worker.worker_id, progress, self.worker.config.lease_seconds
                )
            except Exception as exc:
                self._store_failures.failed(exc)
                return
            self._store_failures.succeeded()
            self._reported = progress

    def _job(self) -> EditJob:
        params = self.task.params
        spec = self.model.spec
        return EditJob(
            images=self.images,
            prompt=params.prompt,
            seed=params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1),
            steps=spec.effective_steps,
            true_cfg_scale=spec.effective_true_cfg_scale,
            negative_prompt=params.negative_prompt or spec.negative_prompt,
            n=params.n,
            width=params.width,
            height=params.height,
        )

    def _finish(self, outputs: list[Image.Image]) -> None:
        worker = self.worker
        keys: list[str] = []
        try:
            self._store_results(outputs, keys)
        except Interrupted:
            self._drop(keys)
            raise
        except Exception as exc:
            log.exception("task %s: storing the results failed", self.task.id)
            self._drop(keys)
            self._fail(storage_error(exc))
            return
        expires = worker.clock.now() + timedelta(seconds=worker.config.result_ttl_seconds)
        completed = finalize(
            worker,
            self.task.id,
            "completing",
            lambda: self.store.complete(self.task.id, worker.worker_id, keys, expires),
            # Result keys carry this attempt's run tag: they are ours alone.
            lambda task: task.status is TaskStatus.COMPLETED and task.result_keys == keys,
        )
        if not completed:
            self._not_completed(keys)
            return
        TASKS_FINISHED.labels("completed").inc()
        log.info("task %s: completed with %d result(s)", self.task.id, len(keys))
        try:
            # What an earlier attempt, killed while storing, left behind.
            worker.storage.delete_task(self.task.id, keep=keys)
        except Exception:
            log.warning("task %s: sweeping earlier attempts failed", self.task.id, exc_info=True)

    def _store_results(self, outputs: list[Image.Image], keys: list[str]) -> None:
        """Encode and store the results, adding each key to `keys`; `Interrupted` once
        the task is cancelled (or its lease lost) before all are stored. A worker
        told to stop still stores and completes an edit it has finished. The images
        are encoded in parallel (zlib runs outside the GIL), each stored as soon as
        it and those before it are encoded."""
        encoders = self.worker.encoders
        with STAGE_SECONDS.labels("upload").time():
            if self._cancelled_or_lost():
                raise Interrupted
            encoded = [encoders.submit(encode_png, image) for image in outputs]
            try:
                for index, future in enumerate(encoded):
                    data = future.result()
                    if index and self._cancelled_or_lost():
                        raise Interrupted
                    keys.append(self.worker.storage.put(self.task.id, index, data, self.run))
            finally:
                for future in encoded:
                    future.cancel()

    def _not_completed(self, keys: list[str]) -> None:
        """Completing did not take: a cancel came in as the results were stored, or
        the lease was lost (we were presumed dead). Either way our results (tagged
        with our run, ours alone) are dropped and nothing is charged."""
        self._drop(keys)
        if self.store.cancel_was_requested(self.task.id):
            self.worker.cancel(self.task.id)
        else:
            log.warning("task %s: lease lost before completion; results dropped", self.task.id)

    def _drop(self, keys: list[str]) -> None:
        """Delete results of this attempt that will not be kept; what cannot be
        deleted now the janitor sweeps once the task has ended."""
        try:
            self.worker.storage.delete(keys)
        except Exception:
            log.warning("task %s: deleting dropped results failed", self.task.id, exc_info=True)

    def _interrupted(self) -> None:
        worker_id = self.worker.worker_id
        if self.store.cancel_was_requested(self.task.id):
            self.worker.cancel(self.task.id)
        elif self.worker.stopping.is_set():
            self.store.release(self.task.id, worker_id)
            log.info("task %s: handed back to the queue at shutdown", self.task.id)
        else:
            log.warning("task %s: lease lost while running", self.task.id)


def engine_error(exc: BaseException) -> TaskError:
    """What a client sees when the engine fails: the cause, never a traceback."""
    detail = first_line(exc) or type(exc).__name__
    if "out of memory" in detail.lower():
        message = (
            f"the GPU ran out of memory while editing ({detail}); "
            "try a smaller size, fewer images or fewer results"
        )
    else:
        message = f"the model failed while editing: {type(exc).__name__}: {detail}"
    return TaskError(code=500, type="internal_server_error", message=message)


def storage_error(exc: BaseException) -> TaskError:
    """What a client sees when its results could not be stored."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # Temporary and the operator's to fix; the path in the OS message is not news.
        return TaskError(
            code=503,
            type="service_unavailable_error",
            message="the result storage is full (no space left), so the result images "
            "could not be saved; no credits were charged, try again later",
        )
    return TaskError(
        code=500,
        type="internal_server_error",
        message=f"storing the result images failed: {type(exc).__name__}: {first_line(exc)}",
    )


class _StopCheck:
    """Whether a task's fetches should stop: its worker is stopping (asked at once),
    or it was cancelled or its lease lost (the store is asked at most once every
    `interval` seconds; fetchers ask ten times a second). Thread-safe."""

    def __init__(self, worker: Worker, task_id: str, interval: float = 1.0) -> None:
        self._worker = worker
        self._task_id = task_id
        self._interval = interval
        self._lock = threading.Lock()
        self._asked = -interval
        self._stop = False

    def __call__(self) -> bool:
        if self._worker.stopping.is_set():
            return True
        with self._lock:
            now = time.monotonic()
            if now - self._asked >= self._interval:
                self._asked = now
                self._stop = self._ask_store()
            return self._stop

    def _ask_store(self) -> bool:
        try:
            return self._worker.store.should_stop(self._task_id, self._worker.worker_id)
        except Exception:
            return False  # the database is away: the fetch goes on, the deadline holds


class _LeaseKeeper:
    """Renews a task's lease in the background from claim to finalize."""

    def __init__(self, store: Store, task_id: str, worker_id: str, lease_seconds: float) -> None:
        self._store = store
        self._task_id = task_id
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{task_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def __enter__(self) -> _LeaseKeeper:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _renew(self) -> None:
        failures = RepeatedFailure(log, f"renewing the lease of task {self._task_id}")
        while not self._done.wait(self._lease_seconds / 3):
            try:
                if not self._store.renew_lease(self._task_id, self._worker_id, self._lease_seconds):
                    return
                failures.succeeded()
            except Exception as exc:
                failures.failed(exc)
