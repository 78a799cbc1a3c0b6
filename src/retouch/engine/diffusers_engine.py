"""Qwen-Image-Edit through diffusers: `QwenImageEditPipeline` (one image) and
`QwenImageEditPlusPipeline` (1-3 images: -2509, -2511)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from PIL import Image

from retouch.engine.base import EditJob, EngineOptions, Interrupted, StepCallback, StopCheck
from retouch.errors import ModelLoadError
from retouch.models import DEMO, PIPELINE_CLASSES, Family, ModelSpec

log = logging.getLogger(__name__)

# The shape most edits have (1024x1024, one input): compiled once at start-up.
WARMUP_SIZE = (1024, 1024)
FP8_MIN_CAPABILITY = (8, 9)


class _Stop(Exception):
    """Raised inside the pipeline to leave it at once."""


class DiffusersEngine:
    def __init__(self, spec: ModelSpec, options: EngineOptions | None = None) -> None:
        self.spec = spec
        self.options = options or EngineOptions()
        self.checkpoint = resolve_checkpoint(spec.checkpoint, self.options.models_dir)
        check_family(self.checkpoint, spec.family)
        self.device, self.dtype = _placement(self.options)
        self.pipe = self._load()
        if spec.lora:
            self._fuse_lora()
        if self.options.quantize == "fp8":
            self._quantize_fp8()
        self._place()
        if self.options.compile:
            self._compile_and_warm_up()

    # -- loading --------------------------------------------------------------

    def _load(self) -> Any:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        pipeline_class = getattr(diffusers, PIPELINE_CLASSES[self.spec.family])
        try:
            pipe = pipeline_class.from_pretrained(self.checkpoint, dtype=self.dtype)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load {PIPELINE_CLASSES[self.spec.family]} from {self.checkpoint!r} "
                f"({type(exc).__name__}: {_first_line(exc)}); pass --model a local checkpoint "
                "directory or a Hugging Face id that is already in the local cache "
                "(or `demo` for the tiny built-in model)."
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        log.info("loaded %s from %s", PIPELINE_CLASSES[self.spec.family], self.checkpoint)
        return pipe

    def _fuse_lora(self) -> None:
        lora = self.spec.lora
        if lora is None:
            return
        try:
            self.pipe.load_lora_weights(lora.source, adapter_name="retouch")
            self.pipe.fuse_lora(lora_scale=lora.weight, adapter_names=["retouch"])
            self.pipe.unload_lora_weights()
        except Exception as exc:
            raise ModelLoadError(
                f"Could not apply the LoRA {lora.source!r} to {self.checkpoint!r} "
                f"({type(exc).__name__}: {_first_line(exc)}); check that it was trained for "
                "this model."
            ) from exc
        log.info("fused LoRA %s (scale %s)", lora.source, lora.weight)

    def _quantize_fp8(self) -> None:
        import torch

        if not self.device.startswith("cuda") or not torch.cuda.is_available():
            raise ModelLoadError(
                f"--quantize fp8 needs a CUDA GPU of compute capability "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer; the device is "
                f"{self.device}."
            )
        capability = torch.cuda.get_device_capability(self.device)
        if capability < FP8_MIN_CAPABILITY:
            raise ModelLoadError(
                f"--quantize fp8 needs compute capability 8.9 or newer; {self.device} has "
                f"{capability[0]}.{capability[1]}."
            )
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        quantize_(self.pipe.transformer, config)
        if self.options.quantize_text_encoder:
            quantize_(self.pipe.text_encoder, config)
        if not self.options.compile:
            log.warning(
                "FP8 WITHOUT --compile IS SLOWER THAN BF16 (measured 0.518 s vs 0.396 s per "
                "forward on an H100): add --compile"
            )

    def _place(self) -> None:
        offload = self.options.offload
        if offload != "none" and not self.device.startswith("cuda"):
            raise ModelLoadError(
                f"--offload {offload} moves weights between the CPU and a GPU; the device is "
                f"{self.device}. Use --offload none on the CPU."
            )
        if offload == "model":
            self.pipe.enable_model_cpu_offload(device=self.device)
        elif offload == "sequential":
            self.pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            self.pipe.to(self.device)

    def _compile_and_warm_up(self) -> None:
        started = time.monotonic()
        self.pipe.transformer.compile_repeated_blocks(fullgraph=True)
        width, height = WARMUP_SIZE
        job = EditJob(
            images=[Image.new("RGB", (width, height), (127, 127, 127))],
            prompt="warm-up",
            seed=0,
            steps=2,
            true_cfg_scale=self.spec.effective_true_cfg_scale,
            negative_prompt=self.spec.negative_prompt,
            width=width,
            height=height,
        )
        self.run(job, lambda *_: None, lambda: False)
        log.info("compiled and warmed up in %.1f s", time.monotonic() - started)

    # -- running --------------------------------------------------------------

    def count_tokens(self, prompt: str) -> int | None:
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return None
        return len(tokenizer(prompt, add_special_tokens=False).input_ids)

    def run(self, job: EditJob, on_step: StepCallback, should_stop: StopCheck) -> list[Image.Image]:
        import torch

        def step_end(pipe: Any, index: int, _timestep: Any, kwargs: dict[str, Any]) -> Any:
            on_step(index + 1, pipe.num_timesteps)
            if should_stop():
                # Raising leaves the pipeline at once (no VAE decode) and keeps it reusable.
                raise _Stop
            return kwargs

        generator = torch.Generator(device=self.device).manual_seed(job.seed)
        images: Any = job.images if self.spec.family == "edit-plus" else job.images[0]
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


def resolve_checkpoint(checkpoint: str, models_dir: Path) -> str:
    """`demo` is built on first use into the models directory; other values pass."""
    if checkpoint == DEMO:
        from retouch.engine.demo import ensure_demo_checkpoint

        return str(ensure_demo_checkpoint(models_dir / "demo"))
    path = Path(checkpoint).expanduser()
    if _looks_like_a_path(checkpoint) and not path.is_dir():
        raise ModelLoadError(
            f"There is no checkpoint directory at {checkpoint!r}; pass --model an existing "
            "directory, a Hugging Face id such as Qwen/Qwen-Image-Edit-2511, or `demo`."
        )
    return str(path) if path.is_dir() else checkpoint


def check_family(checkpoint: str, family: Family) -> None:
    """Refuse a checkpoint whose pipeline class is not the configured family's."""
    class_name = _pipeline_class(checkpoint)
    if class_name == PIPELINE_CLASSES[family]:
        return
    if class_name in PIPELINE_CLASSES.values():
        other = next(f for f, name in PIPELINE_CLASSES.items() if name == class_name)
        raise ModelLoadError(
            f"{checkpoint!r} is a {class_name} checkpoint but the model is configured as "
            f"family {family!r}; set family = {other!r} (or --family {other})."
        )
    raise ModelLoadError(
        f"{checkpoint!r} is a {class_name or 'unknown'} checkpoint; Retouch serves "
        "QwenImageEditPipeline and QwenImageEditPlusPipeline checkpoints."
    )


def _pipeline_class(checkpoint: str) -> str | None:
    index = Path(checkpoint) / "model_index.json"
    try:
        if index.is_file():
            config = json.loads(index.read_text())
        else:
            from diffusers import DiffusionPipeline

            config = DiffusionPipeline.load_config(checkpoint)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not read model_index.json of {checkpoint!r} "
            f"({type(exc).__name__}: {_first_line(exc)}); pass --model a local checkpoint "
            "directory or a Hugging Face id that is already in the local cache "
            "(HF_HUB_OFFLINE=1 on machines without network), or `demo`."
        ) from exc
    name = config.get("_class_name")
    return name if isinstance(name, str) else None


def _looks_like_a_path(checkpoint: str) -> bool:
    """Hugging Face ids are `org/name`; anything else with a slash is a path."""
    return checkpoint.startswith(("/", ".", "~")) or checkpoint.count("/") > 1


def _placement(options: EngineOptions) -> tuple[str, Any]:
    import torch

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if options.dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, getattr(torch, options.dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else "no details"
