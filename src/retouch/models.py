"""Models are configuration: which checkpoint serves which API model name, with
what defaults, limits, price and audience. Read by the API (no torch) and the
worker alike."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

Family = Literal["edit", "edit-plus"]
UserGroup = Literal["default", "vip"]

PIPELINE_CLASSES: dict[Family, str] = {
    "edit": "QwenImageEditPipeline",
    "edit-plus": "QwenImageEditPlusPipeline",
}
DEMO = "demo"
FIXTURE = "fixture"
DEFAULT_MODELS_FILE = Path(__file__).parent / "models.default.toml"
# What clients send as `model` (the tasks.model column holds 100 characters).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}")
# n (up to 6) times a price stays within what one ledger entry holds (1e12 credits).
MAX_PRICE = 1e11


def check_price(price: float) -> float:
    """Credits per image: from 0 to MAX_PRICE, in whole thousandths (the ledger's unit)."""
    if not 0 <= price <= MAX_PRICE:  # NaN too
        raise ValueError(f"the price must be from 0 to {MAX_PRICE:.0e} credits, not {price}")
    if abs(round(price * 1000) - price * 1000) > 1e-6:
        raise ValueError(f"the price must be a multiple of 0.001 credit, not {price}")
    return price


Price = Annotated[float, AfterValidator(check_price)]


class ModelsFileError(Exception):
    """The models file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA fused into the model, with the settings it was trained for
    (e.g. Lightning: 4 or 8 steps at true_cfg_scale 1)."""

    source: str
    weight: float = 1.0
    steps: int | None = None
    true_cfg_scale: float | None = None
    # The file to load from a directory or Hugging Face repository (diffusers'
    # `weight_name`), e.g. "Qwen-Image-Edit-2509/…-Lightning-8steps-V1.0-bf16.safetensors".
    weight_name: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    checkpoint: str
    family: Family = "edit-plus"
    steps: int = 40
    true_cfg_scale: float = 4.0
    negative_prompt: str | None = " "
    max_images: int = 3
    max_output_side: int = 2048
    price: float = 1.0
    user_groups: tuple[UserGroup, ...] = ("default", "vip")
    lora: LoraSpec | None = None

    @property
    def effective_steps(self) -> int:
        return self.lora.steps if self.lora and self.lora.steps else self.steps

    @property
    def effective_true_cfg_scale(self) -> float:
        if self.lora and self.lora.true_cfg_scale is not None:
            return self.lora.true_cfg_scale
        return self.true_cfg_scale


# The model cards' recommended settings per family; true CFG needs a negative prompt.
FAMILY_DEFAULTS: dict[Family, dict[str, int | float]] = {
    "edit": {"steps": 50, "true_cfg_scale": 4.0, "max_images": 1},
    "edit-plus": {"steps": 40, "true_cfg_scale": 4.0, "max_images": 3},
}
DEMO_STEPS = 8


class _LoraEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0, le=4)
    steps: int | None = Field(default=None, ge=1, le=200)
    true_cfg_scale: float | None = Field(default=None, ge=1.0, le=20.0)
    weight_name: str | None = None

    @model_validator(mode="after")
    def _one_file(self) -> Self:
        problem = lora_problem(self.source, self.weight_name)
        if problem:
            raise ValueError(problem)
        return self


class _ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    family: Family = "edit-plus"
    steps: int | None = Field(default=None, ge=1, le=200)
    true_cfg_scale: float | None = Field(default=None, ge=1.0, le=20.0)
    negative_prompt: str | None = Field(default=" ", max_length=500)
    max_images: int | None = Field(default=None, ge=1, le=3)
    max_output_side: int = Field(default=2048, ge=512, le=2048)
    price: Price = 1.0
    user_groups: list[UserGroup] = Field(default=["default", "vip"], min_length=1)
    lora: _LoraEntry | None = None

    def to_spec(self, name: str) -> ModelSpec:
        defaults = FAMILY_DEFAULTS[self.family]
        max_images = self.max_images or int(defaults["max_images"])
        if max_images > defaults["max_images"]:
            raise ValueError(
                f"models.{name}.max_images: the {self.family} family takes at most "
                f"{defaults['max_images']} image(s), not {max_images}"
            )
        return ModelSpec(
            name=name,
            checkpoint=self.checkpoint,
            family=self.family,
            steps=self.steps or int(defaults["steps"]),
            true_cfg_scale=self.true_cfg_scale or float(defaults["true_cfg_scale"]),
            negative_prompt=self.negative_prompt,
            max_images=max_images,
            max_output_side=self.max_output_side,
            price=self.price,
            user_groups=tuple(self.user_groups),
            lora=LoraSpec(**self.lora.model_dump()) if self.lora else None,
        )


class _ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, _ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> Self:
        for name in self.models:
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"models.{name!r}: a model name is 1-100 letters, digits and . _ - : / "
                    "(what clients send as `model`), starting with a letter or digit"
                )
        return self


def load_models_file(path: Path) -> list[ModelSpec]:
    """Parse and check a models file; any problem is one `ModelsFileError`."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelsFileError(f"Cannot read the models file {path}: {exc}") from None
    try:
        parsed = _ModelsFile.model_validate(data)
        return [entry.to_spec(name) for name, entry in parsed.models.items()]
    except (ValidationError, ValueError) as exc:
        raise ModelsFileError(f"The models file {path} is not valid: {_one_line(exc)}") from None


def model_shortcut(
    name: str,
    checkpoint: str,
    family: Family | Literal["auto"] = "auto",
    steps: int | None = None,
    true_cfg_scale: float | None = None,
    price: float | None = None,
    lora: LoraSpec | None = None,
) -> ModelSpec:
    """The one model that `serve --model ID_OR_DIR` serves."""
    if checkpoint == FIXTURE:
        chosen: Family = "edit-plus"
        spec = ModelSpec(name=name, checkpoint=checkpoint, steps=4, negative_prompt=None)
    else:
        chosen = family if family != "auto" else _family_of(checkpoint)
        defaults = FAMILY_DEFAULTS[chosen]
        spec = ModelSpec(
            name=name,
            checkpoint=checkpoint,
            family=chosen,
            steps=DEMO_STEPS if checkpoint == DEMO else int(defaults["steps"]),
            true_cfg_scale=float(defaults["true_cfg_scale"]),
            max_images=int(defaults["max_images"]),
        )
    return replace(
        spec,
        steps=steps or spec.steps,
        true_cfg_scale=true_cfg_scale or spec.true_cfg_scale,
        price=spec.price if price is None else price,
        lora=lora,
    )


def _family_of(checkpoint: str) -> Family:
    """The family of `--family auto`: the pipeline class in the checkpoint's
    model_index.json (a local directory's, or a Hugging Face id's in the local
    cache), else the name (`…-Edit` is the one-image pipeline), else edit-plus.
    Nothing is downloaded; the worker checks the real class when it loads."""
    if checkpoint == DEMO:
        return "edit-plus"
    index = Path(checkpoint).expanduser() / "model_index.json"
    if not index.is_file() and is_hub_id(checkpoint):
        snapshot = cached_snapshot(checkpoint)
        if snapshot is not None:
            index = snapshot / "model_index.json"
    return _family_in(index) or _family_by_name(checkpoint)


def _family_in(index: Path) -> Family | None:
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    for family, pipeline in PIPELINE_CLASSES.items():
        if class_name == pipeline:
            return family
    return None


def _family_by_name(checkpoint: str) -> Family:
    """Qwen/Qwen-Image-Edit (and copies named like it) is the one-image
    pipeline; -2509, -2511 and anything else default to edit-plus."""
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    return "edit" if name.lower().endswith("-edit") else "edit-plus"


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_hub_id(source: str) -> bool:
    """`org/name` that is not an existing local path (as diffusers decides)."""
    return (
        _HUB_ID.fullmatch(source) is not None
        and not source.endswith(_WEIGHT_SUFFIXES)
        and not Path(source).exists()
    )


def cached_snapshot(repo_id: str) -> Path | None:
    """The Hugging Face cache's snapshot of `repo_id` at `main`, if there is one
    (the layout of https://huggingface.co/docs/huggingface_hub/guides/manage-cache);
    reads no network."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - installed with tokenizers
        return None
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / revision
    return snapshot if revision and snapshot.is_dir() else None


def lora_problem(source: str, weight_name: str | None) -> str | None:
    """Why this LoRA cannot be loaded unambiguously, or None.

    A directory or Hugging Face repository may hold several weight files (e.g.
    Lightning's 4- and 8-step variants); diffusers would load the first one it
    lists and only warn, so the steps preset could belong to another file.
    Checked on what is here: a path that does not exist on this host (an API
    replica without the weights) passes, and the worker's load reports it."""
    if weight_name is not None:
        parts = PurePosixPath(weight_name).parts
        if not weight_name.strip() or weight_name.startswith(("/", "\\")) or ".." in parts:
            return (
                f"The LoRA file name {weight_name!r} must be a path inside {source!r} "
                "(e.g. lora.safetensors or a-folder/lora.safetensors)."
            )
    path = Path(source).expanduser()
    if path.is_file():
        if weight_name is not None and weight_name != path.name:
            return (
                f"The LoRA {source!r} is a file, so it names its weights already: drop its "
                f"weight_name {weight_name!r} (--lora-weight-name), or give the directory "
                "as the source."
            )
        return None
    if path.is_dir():
        candidates = _lora_candidates(sorted(p.name for p in path.iterdir() if p.is_file()))
        if weight_name is None and len(candidates) > 1:
            return (
                f"The LoRA directory {source!r} holds several weight files "
                f"({', '.join(candidates)}): name the one to load with weight_name "
                "(--lora-weight-name FILE)."
            )
        if weight_name is not None and not (path / weight_name).is_file():
            held = ", ".join(candidates) or "no .safetensors file"
            return (
                f"The LoRA directory {source!r} has no file {weight_name!r} (it holds {held}); "
                "fix weight_name (--lora-weight-name)."
            )
        return None
    if is_hub_id(source) and weight_name is None:
        snapshot = cached_snapshot(source)
        cached = []
        if snapshot is not None:
            cached = _lora_candidates(
                sorted(
                    p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
                )
            )
        hint = f" (in the local cache: {', '.join(cached)})" if cached else ""
        return (
            f"The LoRA {source!r} is a Hugging Face repository: name the file to load with "
            f"weight_name (--lora-weight-name FILE){hint}: a repository may hold several "
            "(e.g. 4- and 8-step variants), and offline (HF_HUB_OFFLINE=1) diffusers cannot "
            "choose."
        )
    return None


def _lora_candidates(names: list[str]) -> list[str]:
    """The .safetensors files diffusers would choose among (its
    `_best_guess_weight_name`): no scheduler, optimizer or checkpoint files, and
    only the standard pytorch_lora_weights.safetensors if there is one."""
    found = [
        name
        for name in names
        if name.endswith(".safetensors")
        and not any(word in name for word in ("scheduler", "optimizer", "checkpoint"))
    ]
    standard = [name for name in found if name.endswith("pytorch_lora_weights.safetensors")]
    return standard or found


def check_lora(lora: LoraSpec) -> None:
    """Raise `ModelsFileError` with one sentence if the LoRA is ambiguous."""
    problem = lora_problem(lora.source, lora.weight_name)
    if problem:
        raise ModelsFileError(problem)


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            (f"{'.'.join(str(part) for part in error['loc'])}: " if error["loc"] else "")
            + error["msg"].removeprefix("Value error, ")
            for error in exc.errors()
        )
    return str(exc)
