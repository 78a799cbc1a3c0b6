"""What every engine offers the worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

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


@dataclass(frozen=True)
class EngineOptions:
    """How to place and speed up a model: the operator's choices, not the model's."""

    models_dir: Path = Path("retouch-data/models")
    device: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    offload: Literal["none", "model", "sequential"] = "none"
    compile: bool = False
    quantize: Literal["none", "fp8"] = "none"
    quantize_text_encoder: bool = False


class Engine(Protocol):
    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Image.Image]:
        """The edited images (`job.n` of them), or `Interrupted`."""
        ...

    def count_tokens(self, prompt: str) -> int | None:
        """Tokens of `prompt` by the model's own tokenizer (None: no tokenizer)."""
        ...
