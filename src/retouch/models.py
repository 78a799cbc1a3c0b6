"""Models are configuration: which checkpoint serves which API model name, with
what defaults, limits, price and audience. Read by the API (no torch) and the
worker alike."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Family = Literal["edit", "edit-plus"]
UserGroup = Literal["default", "vip"]

PIPELINE_CLASSES: dict[Family, str] = {
    "edit": "QwenImageEditPipeline",
    "edit-plus": "QwenImageEditPlusPipeline",
}
DEMO = "demo"
FIXTURE = "fixture"
DEFAULT_MODELS_FILE = Path(__file__).parent / "models.default.toml"


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
    source: str
    weight: float = Field(default=1.0, gt=0, le=4)
    steps: int | None = Field(default=None, ge=1, le=200)
    true_cfg_scale: float | None = Field(default=None, ge=1.0, le=20.0)


class _ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    family: Family = "edit-plus"
    steps: int | None = Field(default=None, ge=1, le=200)
    true_cfg_scale: float | None = Field(default=None, ge=1.0, le=20.0)
    negative_prompt: str | None = Field(default=" ", max_length=500)
    max_images: int | None = Field(default=None, ge=1, le=3)
    max_output_side: int = Field(default=2048, ge=512, le=2048)
    price: float = Field(default=1.0, ge=0)
    user_groups: list[UserGroup] = Field(default=["default", "vip"], min_length=1)
    lora: _LoraEntry | None = None

    def to_spec(self, name: str) -> ModelSpec:
        defaults = FAMILY_DEFAULTS[self.family]
        max_images = self.max_images or int(defaults["max_images"])
        if max_images > defaults["max_images"]:
            raise ValueError(f"the {self.family} family takes at most {defaults['max_images']}")
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
    """Read a local checkpoint's pipeline class; hub ids default to edit-plus
    (the worker checks the real class when it loads the weights)."""
    index = Path(checkpoint).expanduser() / "model_index.json"
    if checkpoint == DEMO or not index.is_file():
        return "edit-plus"
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        return "edit-plus"
    for family, pipeline in PIPELINE_CLASSES.items():
        if class_name == pipeline:
            return family
    return "edit-plus"


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
    return str(exc)
