"""What every engine offers the worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

StepCallback = Callable[[int, int], None]
"""`on_step(done, total)`: called after each denoising step."""

StopCheck = Callable[[], bool]
"""`should_stop()`: polled after each denoising step; True stops the run."""


class Interrupted(Exception):
    """The run stopped because `should_stop()` said so."""


@dataclass(frozen=True)
class EditJob:
    images: list[Image.Image]
    prompt: str
    seed: int
    steps: int
    true_cfg_scale: float
    negative_prompt: str | None = None
    n: int = 1
    width: int | None = None
    height: int | None = None


class Engine(Protocol):
    @property
    def default_steps(self) -> int: ...

    @property
    def default_true_cfg_scale(self) -> float: ...

    @property
    def default_negative_prompt(self) -> str | None: ...

    @property
    def max_images(self) -> int: ...

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Image.Image]:
        """The edited images (`job.n` of them), or `Interrupted`."""
        ...
