"""What finishing a task costs the GPU: one worker, its results stored behind the engine
or in line with it.

A worker's engine stage should never wait for the CPU work around it. Inputs are
fetched ahead (the prefetch stage); results are encoded as PNG, stored and the task
completed behind it (the finishing stage) while the engine runs the next task. With a
fast configuration (a 4-step Lightning LoRA with FP8 and compile: about 1.2 s per edit
on an H100) encoding 1024x1024 PNGs alone is a fifth of an edit, more with n > 1.

The engine here is the fixture engine with a fixed time per edit (`--gpu-seconds`,
spent sleeping as a process waiting on its GPU does) whose results are textured
images of the input's size (a photo-like 1024x1024 PNG served from a loopback host).
For each `n` the script queues `--tasks` tasks in a SQLite store, runs one `Worker`
until all are completed, and prints tasks per second and the share of the wall time
the engine was running ("engine busy"), side by side with the same worker made to
finish each task before running the next (the arrangement before the finishing stage
existed). Results go to local disk.

    python benchmarks/worker_stages.py [--tasks 12] [--gpu-seconds 1.2] [--n 1,4]
                                       [--side 1024] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from dispatch import MODEL, ImageServer, create_task
from retouch.clock import SystemClock
from retouch.engine.base import EditJob, StepCallback, StopCheck
from retouch.engine.fixture import FixtureEngine
from retouch.fetch import ImageFetcher
from retouch.models import ModelSpec
from retouch.storage import LocalResultStorage
from retouch.store import Store, migrate
from retouch.tasks import EditParams, TaskStatus
from retouch.worker import ENCODER_THREADS, LoadedModel, Worker, WorkerConfig, _Prepared

STEPS = 4
SPEC = ModelSpec(name=MODEL, checkpoint="fixture", steps=STEPS, negative_prompt=None)
TIMEOUT_SECONDS = 600.0


class TimedEngine(FixtureEngine):
    """The fixture engine, `gpu_seconds` per edit, counting the time it runs."""

    def __init__(self, gpu_seconds: float) -> None:
        super().__init__(step_seconds=gpu_seconds / STEPS, steps=STEPS)
        self.busy_seconds = 0.0

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Image.Image]:
        started = time.perf_counter()
        try:
            return super().run(job, on_step, should_stop)
        finally:
            self.busy_seconds += time.perf_counter() - started


class InLineWorker(Worker):
    """The same worker, finishing each task before the engine runs the next."""

    def _run_task(self, prepared: _Prepared) -> None:
        super()._run_task(prepared)
        self._await_finishing()


def photo_like(side: int) -> bytes:
    """A PNG that compresses like a photograph: smooth shapes plus sensor noise."""
    coarse = Image.frombytes("RGB", (24, 24), random.Random(0).randbytes(24 * 24 * 3))
    smooth = coarse.resize((side, side), Image.Resampling.BICUBIC)
    noise = Image.effect_noise((side, side), 64).convert("RGB")
    buffer = io.BytesIO()
    Image.blend(smooth, noise, 0.08).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Row:
    arrangement: str
    n: int
    tasks: int
    seconds: float
    tasks_per_s: float
    engine_busy: float


def measure(
    arrangement: type[Worker], n: int, tasks: int, gpu_seconds: float, url: str, root: Path
) -> Row:
    clock = SystemClock()
    store = Store.from_url(f"sqlite:///{root / 'retouch.db'}", clock)
    migrate(store.engine)
    key = store.create_key("bench", credits=1e9)[0]
    params = EditParams(prompt="invert it", image_urls=[url], n=n, seed=7)
    ids = [create_task(store, key, params, float(n)) for _ in range(tasks)]
    engine = TimedEngine(gpu_seconds)
    worker = arrangement(
        store,
        LocalResultStorage(root / "results", b"worker-stages", clock),
        {MODEL: LoadedModel(SPEC, engine)},
        ImageFetcher(allow_private_networks=True, allowed_ports=None, timeout_seconds=30),
        WorkerConfig(poll_interval_seconds=0.02, idle_wait_seconds=0.02),
        clock=clock,
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    deadline = started + TIMEOUT_SECONDS
    try:
        while True:
            statuses = [store.get_task(task_id) for task_id in ids]
            if all(t is not None and t.status is TaskStatus.COMPLETED for t in statuses):
                break
            failed = [
                t.id
                for t in statuses
                if t is not None and t.status.is_terminal and t.status is not TaskStatus.COMPLETED
            ]
            if failed:
                raise SystemExit(f"tasks did not complete: {failed}")
            if time.perf_counter() > deadline:
                raise SystemExit("timed out")
            time.sleep(0.005)
        seconds = time.perf_counter() - started
    finally:
        worker.stopping.set()
        thread.join(30)
        store.close()
    return Row(
        arrangement="staged" if arrangement is Worker else "in-line",
        n=n,
        tasks=tasks,
        seconds=round(seconds, 3),
        tasks_per_s=round(tasks / seconds, 3),
        engine_busy=round(engine.busy_seconds / seconds, 3),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--gpu-seconds", type=float, default=1.2)
    parser.add_argument("--n", default="1,4", help="comma-separated results per task")
    parser.add_argument("--side", type=int, default=1024, help="input (and result) side")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = parser.parse_args(argv)
    counts = [int(value) for value in args.n.split(",")]

    print(
        f"# {datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {ENCODER_THREADS} encoder threads; "
        f"{args.tasks} tasks of {args.gpu_seconds} s engine time, "
        f"{args.side}x{args.side} results",
        file=sys.stderr,
    )
    server = ImageServer(photo_like(args.side))
    rows: list[Row] = []
    try:
        for n in counts:
            for arrangement in (InLineWorker, Worker):
                with tempfile.TemporaryDirectory(prefix="retouch-stages-") as root:
                    row = measure(
                        arrangement, n, args.tasks, args.gpu_seconds, server.url, Path(root)
                    )
                rows.append(row)
                if args.json:
                    print(json.dumps(asdict(row)), flush=True)
    finally:
        server.close()
    if not args.json:
        print("| arrangement | n | tasks | seconds | tasks/s | engine busy |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            print(
                f"| {row.arrangement} | {row.n} | {row.tasks} | {row.seconds:.2f} | "
                f"{row.tasks_per_s:.3f} | {row.engine_busy:.0%} |"
            )
        for n in counts:
            inline, staged = (r for r in rows if r.n == n)
            print(
                f"n={n}: staged / in-line throughput {staged.tasks_per_s / inline.tasks_per_s:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
