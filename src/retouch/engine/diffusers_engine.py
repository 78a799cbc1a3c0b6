"""Qwen-Image-Edit through diffusers: `QwenImageEditPipeline` (one image) and
`QwenImageEditPlusPipeline` (1-3 images: -2509, -2511)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from PIL import Image

from retouch.engine.base import EditJob, EngineOptions, Interrupted, StepCallback, StopCheck
from retouch.errors import ModelLoadError
from retouch.models import DEMO, PIPELINE_CLASSES, Family, ModelSpec

log = logging.getLogger(__name__)

# The API's bounds on each side of an output image (`size`: 512-2048, multiples of 16).
MIN_SIDE = 512
MAX_SIDE = 2048
SIDE_MULTIPLE = 16
# The area the pipelines aim for when given no size (diffusers: 1024 * 1024).
DEFAULT_AREA = 1024 * 1024

# Shapes the compiled transformer sees at start-up: (width, height, input images, n).
# Dynamo compiles for the first shape it meets, all sizes static. A call whose shapes
# differ recompiles once, marking the dimensions that changed dynamic ("automatic
# dynamic shapes"), but a size of 1 always stays specialised. Hence three runs:
# 1. 1024x1024, one input, n=1: the commonest request, compiled first;
# 2. another size and aspect with two inputs (edit-plus) and a prompt of another
#    length, n=1: the image- and text-token dimensions become dynamic for batch 1
#    (true CFG's negative prompt already differs in length from the prompt);
# 3. n=2 at a small size: the batch dimension becomes dynamic (n >= 2).
# After these no output size, aspect, image count or n recompiles on a user's request
# (each recompile of the full model costs ~14 s bf16, ~150 s FP8). Sizes are fitted
# into the model's bounds; image counts are capped at its max_images.
WARMUP_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (1024, 1024, 1, 1),
    (832, 1248, 2, 1),
    (512, 512, 1, 2),
)
WARMUP_PROMPTS = ("warm-up", "warm up the compiled transformer for other shapes", "warm-up n")
FP8_MIN_CAPABILITY = (8, 9)
# What two pipelines of one checkpoint and family can hold in common whatever their
# LoRA: everything but the transformer (the LoRA is fused into it) and the scheduler.
SHARED_COMPONENTS = ("text_encoder", "vae", "tokenizer", "processor")


class _Stop(Exception):
    """Raised inside the pipeline to leave it at once."""


class DiffusersEngine:
    """One model entry on a pipeline: its own, or one shared with other entries.

    `on`: the engine of another entry with the same weights (checkpoint, family and
    LoRA), whose pipeline, checked and placed already, this one runs on as it is.
    `components_of`: a pipeline of the same checkpoint and family whose text
    encoder, VAE, tokenizer and processor the new pipeline uses instead of loading
    its own (only with `--offload none`: model offload chains its hooks per
    pipeline, and a component shared by two would carry the hooks of one of them
    only). `retouch.engine.loader.load_engines` decides what is shared.
    """

    checkpoint: str
    device: str
    dtype: Any  # a torch.dtype
    pipe: Any

    def __init__(
        self,
        spec: ModelSpec,
        options: EngineOptions | None = None,
        *,
        on: DiffusersEngine | None = None,
        components_of: Any | None = None,
    ) -> None:
        self.spec = spec
        self.options = options or EngineOptions()
        if on is not None:
            self.checkpoint, self.device, self.dtype = on.checkpoint, on.device, on.dtype
            self.pipe = on.pipe
            return
        self.checkpoint = resolve_checkpoint(spec.checkpoint, self.options.models_dir)
        check_family(self.checkpoint, spec.family)
        # Every option is checked before the (slow) load; what can only fail later
        # (quantizing, placing, compiling) is turned into one ModelLoadError too.
        self.device, self.dtype = _placement(self.options)
        check_options(self.options, self.device)
        if components_of is not None and self.options.offload != "none":
            raise ValueError("pipelines share components only with --offload none")
        self._build(components_of)

    # -- loading --------------------------------------------------------------

    def _build(self, components_of: Any | None) -> None:
        self.pipe = self._load(components_of)
        if self.spec.lora:
            self._fuse_lora()
        if self.options.quantize == "fp8":
            # A borrowed text encoder was quantized (or not) by its pipeline.
            self._quantize_fp8(self.options.quantize_text_encoder and components_of is None)
        self._place()
        if self.options.compile:
            self._compile_and_warm_up()

    def _load(self, components_of: Any | None) -> Any:
        import diffusers
        import transformers

        for library in (diffusers, transformers):
            library.utils.logging.disable_progress_bar()
            # Their warnings go through the process's own handler (JSON lines in a
            # service), not a handler of their own writing raw lines to stderr.
            library.utils.logging.disable_default_handler()
            library.utils.logging.enable_propagation()
        pipeline_class = getattr(diffusers, PIPELINE_CLASSES[self.spec.family])
        # Each pipeline loads its own transformer (a LoRA is fused into it) and
        # scheduler (it keeps the state of a run).
        borrowed = (
            {}
            if components_of is None
            else {name: getattr(components_of, name) for name in SHARED_COMPONENTS}
        )
        try:
            pipe = pipeline_class.from_pretrained(self.checkpoint, dtype=self.dtype, **borrowed)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load {PIPELINE_CLASSES[self.spec.family]} from {self.checkpoint!r} "
                f"({type(exc).__name__}: {_first_line(exc)}); pass --model a local checkpoint "
                "directory or a Hugging Face id that is already in the local cache "
                "(or `demo` for the tiny built-in model)."
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        # Inference only. Dynamo guards on requires_grad, which peft turns off in a
        # transformer it fuses a LoRA into: frozen alike, the transformers of one
        # worker run the same compiled code (no recompiles per transformer).
        pipe.transformer.requires_grad_(False)
        # The VAE decodes the n results of a request one at a time: its activations
        # at full resolution are the largest of an edit (GBs per image at 2048x2048),
        # and the GPU is saturated with one image anyway.
        pipe.vae.enable_slicing()
        log.info("loaded %s from %s", PIPELINE_CLASSES[self.spec.family], self.checkpoint)
        return pipe

    def _fuse_lora(self) -> None:
        lora = self.spec.lora
        if lora is None:
            return
        if importlib.util.find_spec("peft") is None:
            raise ModelLoadError(
                f"--lora {lora.source!r} needs the peft package, which is not installed; "
                "pip install peft (or serve without the LoRA)."
            )
        source = lora.source
        if (_looks_like_a_path(source) or source.endswith(".safetensors")) and not Path(
            source
        ).expanduser().exists():
            raise ModelLoadError(
                f"There is no LoRA file or folder at {source!r}; pass --lora an existing "
                ".safetensors file or folder, or a Hugging Face id (with --lora-weight-name)."
            )
        # `weight_name` picks one file of a LoRA repository or folder holding several.
        weight_name = getattr(lora, "weight_name", None)
        extra: dict[str, Any] = {} if weight_name is None else {"weight_name": weight_name}
        try:
            self.pipe.load_lora_weights(lora.source, adapter_name="retouch", **extra)
            self.pipe.fuse_lora(lora_scale=lora.weight, adapter_names=["retouch"])
            self.pipe.unload_lora_weights()
        except Exception as exc:
            raise ModelLoadError(
                f"Could not apply the LoRA {lora.source!r}"
                f"{'' if weight_name is None else f' ({weight_name})'} to {self.checkpoint!r} "
                f"({type(exc).__name__}: {_first_line(exc)}); check that it was trained for "
                "this model."
            ) from exc
        log.info("fused LoRA %s (scale %s)", lora.source, lora.weight)

    def _quantize_fp8(self, text_encoder: bool) -> None:
        try:
            from torchao.quantization import (
                Float8DynamicActivationFloat8WeightConfig,
                PerRow,
                quantize_,
            )
        except ImportError as exc:
            raise ModelLoadError(
                f"--quantize fp8 needs torchao, which could not be imported "
                f"({type(exc).__name__}: {_first_line(exc)}); pip install torchao "
                "(or serve without --quantize fp8)."
            ) from exc
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        # Without offload, quantize on the GPU: quantize_(device=) moves one linear
        # layer at a time there and quantizes it in place (fast; the GPU never holds
        # the whole bf16 model). With offload the weights live on the CPU, and the GPU
        # may be too small for them unquantized: quantize them there.
        device = self.device if self.options.offload == "none" else None
        parts = ["transformer"] + (["text_encoder"] if text_encoder else [])
        for part in parts:
            try:
                quantize_(getattr(self.pipe, part), config, device=device)
            except Exception as exc:
                raise ModelLoadError(
                    f"Could not quantize the {part} to FP8 on {device or 'cpu'} "
                    f"({type(exc).__name__}: {_first_line(exc)}); "
                    + _advice(
                        exc,
                        "serve without --quantize fp8, or install the torchao "
                        "version made for the installed torch",
                    )
                    + "."
                ) from exc
        log.info(
            "quantized %s to FP8 (torchao, per row) on %s", " and ".join(parts), device or "cpu"
        )

    def _place(self) -> None:
        offload = self.options.offload
        try:
            if offload == "model":
                self.pipe.enable_model_cpu_offload(device=self.device)
            elif offload == "sequential":
                self.pipe.enable_sequential_cpu_offload(device=self.device)
            else:
                self.pipe.to(self.device)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not place the model on {self.device} with --offload {offload} "
                f"({type(exc).__name__}: {_first_line(exc)}); "
                + _advice(exc, "check --device and that torch can use that device")
                + "."
            ) from exc

    def _compile_and_warm_up(self) -> None:
        started = time.monotonic()
        max_images = min(self.spec.max_images, 1 if self.spec.family == "edit" else 3)
        try:
            self.pipe.transformer.compile_repeated_blocks(fullgraph=True)
            for (width, height, count, n), prompt in zip(
                WARMUP_SHAPES, WARMUP_PROMPTS, strict=True
            ):
                width, height = fit_output_size(
                    (width, height), width / height, self.spec.max_output_side
                )
                images = [
                    Image.new("RGB", (width - 64 * index, height), (127, 127, 127))
                    for index in range(min(count, max_images))
                ]
                job = EditJob(
                    images=images,
                    prompt=prompt,
                    seed=0,
                    steps=1,
                    true_cfg_scale=self.spec.effective_true_cfg_scale,
                    negative_prompt=self.spec.negative_prompt,
                    n=n,
                    width=width,
                    height=height,
                )
                self.run(job, lambda *_: None, lambda: False)
        except Exception as exc:
            raise ModelLoadError(
                f"The --compile warm-up failed ({type(exc).__name__}: {_first_line(exc)}); "
                + _advice(
                    exc,
                    "serve without --compile, or check that triton (on a GPU) and a C++ "
                    "compiler work with the installed torch",
                )
                + "."
            ) from exc
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

        width, height = output_size(job, self.spec.family, self.spec.max_output_side)
        generator = torch.Generator(device=self.device).manual_seed(job.seed)
        images: Any = job.images if self.spec.family == "edit-plus" else job.images[0]
        returned = False
        try:
            output = self.pipe(
                image=images,
                prompt=job.prompt,
                # Without true CFG (scale <= 1) a negative prompt has no use, and
                # diffusers would print a warning for every edit.
                negative_prompt=job.negative_prompt if job.true_cfg_scale > 1 else None,
                true_cfg_scale=job.true_cfg_scale,
                num_inference_steps=job.steps,
                num_images_per_prompt=job.n,
                height=height,
                width=width,
                generator=generator,
                callback_on_step_end=step_end,
            )
            returned = True
        except _Stop:
            raise Interrupted from None
        finally:
            if not returned:
                # diffusers calls maybe_free_model_hooks() only when __call__ returns:
                # after a cancel or an error, --offload model would otherwise keep the
                # transformer on the GPU (and stateful hooks would keep their state).
                # Without model offload it only resets those hooks.
                with contextlib.suppress(Exception):
                    self.pipe.maybe_free_model_hooks()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        return list(output.images)


def output_size(job: EditJob, family: Family, max_side: int) -> tuple[int, int]:
    """`(width, height)` of a job's results: its own size, or by default the size the
    pipeline itself would pick (~1 MP at the aspect of the first input for `edit`,
    the last for `edit-plus`), fitted into the bounds every request obeys (each side
    512 to min(2048, max_side)). The engine always passes it to the pipeline."""
    if job.width is not None and job.height is not None:
        return job.width, job.height
    image = job.images[-1] if family == "edit-plus" else job.images[0]
    aspect = image.width / image.height
    width, height = fit_output_size(pipeline_default_size(aspect), aspect, max_side)
    return job.width or width, job.height or height


def pipeline_default_size(aspect: float) -> tuple[int, int]:
    """The size QwenImageEdit(Plus)Pipeline picks without height/width: diffusers'
    own `calculate_dimensions(1024 * 1024, width / height)` (multiples of 32),
    floored to multiples of 16 (vae_scale_factor * 2) as `__call__` does."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        calculate_dimensions,
    )

    width, height = calculate_dimensions(DEFAULT_AREA, aspect)
    return (
        int(width) // SIDE_MULTIPLE * SIDE_MULTIPLE,
        int(height) // SIDE_MULTIPLE * SIDE_MULTIPLE,
    )


def fit_output_size(size: tuple[int, int], aspect: float, max_side: int) -> tuple[int, int]:
    """`size` unchanged when each side is within [512, min(2048, max_side)]; otherwise
    the largest size within those bounds, in multiples of 16, that keeps `aspect`
    as closely as the bounds allow (beyond 1:4 one side sits at each bound)."""
    low = MIN_SIDE
    high = max(low, min(MAX_SIDE, max_side) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    width, height = size
    if low <= width <= high and low <= height <= high:
        return width, height
    exact_width, exact_height = math.sqrt(DEFAULT_AREA * aspect), math.sqrt(DEFAULT_AREA / aspect)
    if max(exact_width, exact_height) > high:
        scale = high / max(exact_width, exact_height)
    elif min(exact_width, exact_height) < low:
        scale = low / min(exact_width, exact_height)
    else:
        scale = 1.0
    # Rounded first so that a side scaled onto a bound is exactly that bound.
    widths = _near_multiples(round(exact_width * scale, 6), low, high)
    heights = _near_multiples(round(exact_height * scale, 6), low, high)
    return min(
        ((w, h) for w in widths for h in heights),
        key=lambda pair: (abs(math.log(pair[0] / pair[1] / aspect)), -pair[0] * pair[1]),
    )


def _near_multiples(side: float, low: int, high: int) -> set[int]:
    """The multiples of 16 either side of `side`, within [low, high]."""
    below = math.floor(side / SIDE_MULTIPLE) * SIDE_MULTIPLE
    return {min(max(value, low), high) for value in (below, below + SIDE_MULTIPLE)}


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
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"--device {device!r} is not a device torch knows ({_first_line(exc)}); "
            "use cpu, cuda or cuda:N."
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(
                f"--device {device} asks for a CUDA GPU but torch sees none (no GPU, no "
                "driver or a CPU-only torch); use --device cpu or fix the CUDA installation."
            )
        if parsed.index is not None and parsed.index >= count:
            raise ModelLoadError(
                f"--device {device} does not exist: torch sees {count} CUDA GPU(s), "
                f"cuda:0 to cuda:{count - 1}."
            )
    if options.dtype == "auto":
        return device, torch.bfloat16 if parsed.type == "cuda" else torch.float32
    return device, getattr(torch, options.dtype)


def check_options(options: EngineOptions, device: str) -> None:
    """Refuse option combinations that cannot work, each in one sentence, before
    anything is loaded."""
    if options.compile and options.offload == "sequential":
        raise ModelLoadError(
            "--compile cannot be combined with --offload sequential (its per-layer hooks "
            "move weights inside the compiled blocks); use --offload model or none with "
            "--compile, or drop --compile."
        )
    if options.quantize == "fp8" and options.dtype not in ("auto", "bfloat16"):
        raise ModelLoadError(
            f"--quantize fp8 quantizes bfloat16 weights (torchao's per-row FP8), not "
            f"--dtype {options.dtype}; use --dtype bfloat16 (or auto on a GPU)."
        )
    on_cuda = device.startswith("cuda")
    if options.offload != "none" and not on_cuda:
        raise ModelLoadError(
            f"--offload {options.offload} moves weights between the CPU and a GPU but the "
            f"device is {device}; use --offload none there."
        )
    if options.quantize == "fp8":
        import torch

        if not on_cuda or not torch.cuda.is_available():
            raise ModelLoadError(
                f"--quantize fp8 needs a CUDA GPU of compute capability "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer; the device is "
                f"{device}."
            )
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise ModelLoadError(
                f"--quantize fp8 needs compute capability 8.9 or newer; {device} has "
                f"{capability[0]}.{capability[1]}."
            )
        if not options.compile:
            log.warning(
                "FP8 WITHOUT --compile IS SLOWER THAN BF16 (measured 0.518 s vs 0.396 s per "
                "forward on an H100): add --compile"
            )


def _advice(exc: BaseException, otherwise: str) -> str:
    """How to fix a start-up failure: out of memory has one answer wherever it happens."""
    if "out of memory" in str(exc).lower():
        return (
            "free the GPU or give it a smaller load: --offload model, --offload sequential "
            "or --quantize fp8"
        )
    return otherwise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else "no details"
