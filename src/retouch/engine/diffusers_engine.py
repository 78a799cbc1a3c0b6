"""Qwen-Image-Edit through diffusers: `QwenImageEditPipeline` (one image) and
`QwenImageEditPlusPipeline` (1-3 images: -2509, -2511)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from retouch.engine.base import EditJob, Interrupted, StepCallback, StopCheck
from retouch.errors import ModelLoadError

log = logging.getLogger(__name__)

Family = Literal["edit", "edit-plus"]
_PIPELINES: dict[Family, str] = {
    "edit": "QwenImageEditPipeline",
    "edit-plus": "QwenImageEditPlusPipeline",
}


@dataclass(frozen=True)
class FamilyDefaults:
    steps: int
    true_cfg_scale: float
    negative_prompt: str | None
    max_images: int


# The model cards' recommended settings; true CFG needs a negative prompt.
DEFAULTS: dict[Family, FamilyDefaults] = {
    "edit": FamilyDefaults(steps=50, true_cfg_scale=4.0, negative_prompt=" ", max_images=1),
    "edit-plus": FamilyDefaults(steps=40, true_cfg_scale=4.0, negative_prompt=" ", max_images=3),
}


class _Stop(Exception):
    """Raised inside the pipeline to leave it at once."""


class DiffusersEngine:
    def __init__(
        self,
        checkpoint: str,
        *,
        family: Family | Literal["auto"] = "auto",
        device: str | None = None,
        dtype: str = "auto",
        steps: int | None = None,
        true_cfg_scale: float | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.family: Family = detect_family(checkpoint) if family == "auto" else family
        defaults = DEFAULTS[self.family]
        self.default_steps = steps or defaults.steps
        self.default_true_cfg_scale = true_cfg_scale or defaults.true_cfg_scale
        self.default_negative_prompt = defaults.negative_prompt
        self.max_images = defaults.max_images
        self.device, self.dtype = _placement(device, dtype)
        self.pipe = self._load()

    def _load(self) -> Any:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        pipeline_class = getattr(diffusers, _PIPELINES[self.family])
        try:
            pipe = pipeline_class.from_pretrained(self.checkpoint, dtype=self.dtype)
            pipe.to(self.device)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load {_PIPELINES[self.family]} from {self.checkpoint!r} "
                f"({type(exc).__name__}: {_first_line(exc)}); pass --model a local checkpoint "
                "directory or a Hugging Face id that is already in the local cache "
                "(or `demo` for the tiny built-in model)."
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        log.info("loaded %s from %s on %s", _PIPELINES[self.family], self.checkpoint, self.device)
        return pipe

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Image.Image]:
        import torch

        def step_end(pipe: Any, index: int, _timestep: Any, kwargs: dict[str, Any]) -> Any:
            on_step(index + 1, pipe.num_timesteps)
            if should_stop():
                # Raising leaves the pipeline at once (no VAE decode) and keeps it reusable.
                raise _Stop
            return kwargs

        generator = torch.Generator(device=self.device).manual_seed(job.seed)
        images: Any = job.images if self.family == "edit-plus" else job.images[0]
        try:
            output = self.pipe(
                image=images,
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                true_cfg_scale=job.true_cfg_scale,
                num_inference_steps=job.steps,
                num_images_per_prompt=job.n,
                height=job.height,
                width=job.width,
                generator=generator,
                callback_on_step_end=step_end,
            )
        except _Stop:
            raise Interrupted from None
        finally:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        return list(output.images)


def detect_family(checkpoint: str) -> Family:
    """Read the pipeline class from the checkpoint's `model_index.json`."""
    path = Path(checkpoint).expanduser()
    if _looks_like_a_path(checkpoint) and not path.is_dir():
        raise ModelLoadError(
            f"There is no checkpoint directory at {checkpoint!r}; pass --model an existing "
            "directory, a Hugging Face id such as Qwen/Qwen-Image-Edit-2511, or `demo`."
        )
    index = path / "model_index.json"
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name")
    else:
        try:
            from diffusers import DiffusionPipeline

            class_name = DiffusionPipeline.load_config(checkpoint).get("_class_name")
        except Exception as exc:
            raise ModelLoadError(
                f"Could not read model_index.json of {checkpoint!r} "
                f"({type(exc).__name__}: {_first_line(exc)}); pass --model a local checkpoint "
                "directory or a Hugging Face id that is already in the local cache, "
                "or `demo` for the tiny built-in model."
            ) from exc
    for family, name in _PIPELINES.items():
        if class_name == name:
            return family
    raise ModelLoadError(
        f"{checkpoint!r} is a {class_name or 'unknown'} checkpoint; Retouch serves "
        "QwenImageEditPipeline and QwenImageEditPlusPipeline checkpoints."
    )


def _looks_like_a_path(checkpoint: str) -> bool:
    """Hugging Face ids are `org/name`; anything else with a slash is a path."""
    return checkpoint.startswith(("/", ".", "~")) or checkpoint.count("/") > 1


def _placement(device: str | None, dtype: str) -> tuple[str, Any]:
    import torch

    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return chosen, torch.bfloat16 if chosen.startswith("cuda") else torch.float32
    return chosen, getattr(torch, dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else "no details"
