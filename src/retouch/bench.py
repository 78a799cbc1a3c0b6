"""`retouch bench`: run edits through the engine and time every stage.

Stages: fetch (inputs), text encode, VAE encode, denoise (per step), VAE
decode, PNG encode. The pipeline's own methods are wrapped for the duration
of a run, so the figures come from the real code path, not a copy of it.
"""

from __future__ import annotations

import itertools
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from retouch.engine.base import EditJob, Engine
from retouch.fetch import ImageFetcher
from retouch.images import decode_image, encode_png

# Methods of the diffusers pipelines that make up each stage.
_WRAPPED = {
    "text_encode": ("pipe", "encode_prompt"),
    "vae_encode": ("pipe", "_encode_vae_image"),
    "vae_decode": ("vae", "decode"),
}


@dataclass
class StageTimes:
    fetch: float = 0.0
    text_encode: float = 0.0
    vae_encode: float = 0.0
    denoise: float = 0.0
    vae_decode: float = 0.0
    png_encode: float = 0.0
    steps: int = 0
    total: float = 0.0
    peak_memory_gib: float = 0.0
    peak_reserved_gib: float | None = None  # CUDA only
    step_times: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        if self.step_times:
            return statistics.median(self.step_times)
        return self.denoise / self.steps if self.steps else 0.0

    def row(self) -> dict[str, float]:
        row = {
            "fetch_s": self.fetch,
            "text_encode_s": self.text_encode,
            "vae_encode_s": self.vae_encode,
            "denoise_s": self.denoise,
            "s_per_step": self.seconds_per_step,
            "vae_decode_s": self.vae_decode,
            "png_encode_s": self.png_encode,
            "total_s": self.total,
            "peak_memory_gib": self.peak_memory_gib,
        }
        if self.peak_reserved_gib is not None:
            row["peak_reserved_gib"] = self.peak_reserved_gib
        return row


def load_inputs(
    sources: list[str], fetcher: ImageFetcher, size: tuple[int, int]
) -> tuple[list[Image.Image], float]:
    """Images from URLs or files (timed), or one synthetic image at `size`."""
    started = time.perf_counter()
    if not sources:
        return [synthetic_image(size)], 0.0
    images = []
    for index, source in enumerate(sources):
        param = f"image[{index}]"
        if source.startswith(("http://", "https://")):
            data = fetcher.fetch(source, param)
        else:
            data = Path(source).read_bytes()
        images.append(decode_image(data, param))
    return images, time.perf_counter() - started


def synthetic_image(size: tuple[int, int]) -> Image.Image:
    """A gradient, so the VAE sees structure rather than a flat colour."""
    width, height = size
    gradient = Image.linear_gradient("L").resize((width, height))
    return Image.merge("RGB", (gradient, gradient.rotate(90).resize((width, height)), gradient))


def run_once(engine: Engine, job: EditJob, fetch_seconds: float) -> StageTimes:
    times = StageTimes(fetch=fetch_seconds)
    pipe = getattr(engine, "pipe", None)
    sync = _synchronizer(engine)
    marks: list[float] = []
    _reset_peak_memory(engine)
    started = time.perf_counter()
    with _timed_stages(pipe, times, sync):
        sync()
        marks.append(time.perf_counter())

        def on_step(_done: int, _total: int) -> None:
            sync()
            marks.append(time.perf_counter())

        images = engine.run(job, on_step, lambda: False)
    encode_started = time.perf_counter()
    for image in images:
        encode_png(image)
    times.png_encode = time.perf_counter() - encode_started
    times.total = time.perf_counter() - started + fetch_seconds
    times.step_times = [later - earlier for earlier, later in itertools.pairwise(marks[1:])]
    times.steps = len(marks) - 1
    # The first mark is the start of the call: text and VAE encoding come before step 1.
    first_step = marks[1] - marks[0] - times.text_encode - times.vae_encode if len(marks) > 1 else 0
    times.denoise = max(first_step, 0.0) + sum(times.step_times)
    times.peak_memory_gib, times.peak_reserved_gib = _peak_memory(engine)
    return times


@contextmanager
def _timed_stages(pipe: Any, times: StageTimes, sync: Callable[[], None]) -> Iterator[None]:
    """Wrap the pipeline's stage methods with timers for the duration of a run."""
    if pipe is None:
        yield
        return
    restore: list[tuple[Any, str]] = []
    for stage, (owner_name, method) in _WRAPPED.items():
        owner = pipe if owner_name == "pipe" else getattr(pipe, owner_name, None)
        original = getattr(owner, method, None) if owner is not None else None
        if original is None:
            continue
        setattr(owner, method, _timer(original, stage, times, sync))
        restore.append((owner, method))
    try:
        yield
    finally:
        for owner, method in restore:
            delattr(owner, method)  # the instance attribute hid the class's method


def _timer(
    original: Callable[..., Any], stage: str, times: StageTimes, sync: Callable[[], None]
) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        sync()
        started = time.perf_counter()
        result = original(*args, **kwargs)
        sync()
        setattr(times, stage, getattr(times, stage) + time.perf_counter() - started)
        return result

    return timed


def _device(engine: Engine) -> str:
    return str(getattr(engine, "device", "cpu"))


def _cuda_device(engine: Engine) -> Any:
    """The engine's CUDA device (e.g. cuda:1), or None on any other device. The
    torch.cuda calls below take it explicitly: without it they act on the current
    device, cuda:0, whatever --device says."""
    if not _device(engine).startswith("cuda"):
        return None
    import torch

    return torch.device(_device(engine))


def _synchronizer(engine: Engine) -> Callable[[], None]:
    device = _cuda_device(engine)
    if device is None:
        return lambda: None
    import torch

    def synchronize() -> None:
        torch.cuda.synchronize(device)

    return synchronize


def _reset_peak_memory(engine: Engine) -> None:
    device = _cuda_device(engine)
    if device is not None:
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(engine: Engine) -> tuple[float, float | None]:
    """Peak GiB allocated by tensors and reserved by the caching allocator on a GPU
    (reserved is what the device actually had to give); elsewhere the process's peak
    resident memory and no reserved figure."""
    device = _cuda_device(engine)
    if device is not None:
        import torch

        allocated = float(torch.cuda.max_memory_allocated(device)) / 2**30
        return allocated, float(torch.cuda.max_memory_reserved(device)) / 2**30
    # The process's peak resident memory (kilobytes on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None


def summary(runs: list[StageTimes]) -> dict[str, float]:
    """Mean of each stage over the runs after the first (the first warms caches up)."""
    measured = runs[1:] or runs
    rows = [run.row() for run in measured]
    return {name: statistics.fmean(row[name] for row in rows) for name in rows[0]}
