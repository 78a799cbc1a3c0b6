"""Turn model specs into loaded engines."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from retouch.engine.base import Engine, EngineOptions
from retouch.models import FIXTURE, Family, ModelSpec
from retouch.settings import Settings

if TYPE_CHECKING:
    from retouch.engine.diffusers_engine import DiffusersEngine

log = logging.getLogger(__name__)


def engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        models_dir=settings.models_dir,
        device=settings.device,
        dtype=settings.dtype,
        offload=settings.offload,
        compile=settings.compile,
        quantize=settings.quantize,
        quantize_text_encoder=settings.quantize_text_encoder,
    )


def load_engine(spec: ModelSpec, options: EngineOptions) -> Engine:
    """`fixture`, `demo`, a local checkpoint directory or a Hugging Face id."""
    if spec.checkpoint == FIXTURE:
        from retouch.engine.fixture import FixtureEngine

        return FixtureEngine()
    from retouch.engine.diffusers_engine import DiffusersEngine

    return DiffusersEngine(spec, options)


@dataclass(frozen=True)
class Weights:
    """What makes a pipeline's weights; entries that agree on it share one."""

    checkpoint: str
    family: Family
    lora: tuple[str, float, str | None] | None

    @property
    def base(self) -> tuple[str, Family]:
        """What pipelines that differ only in their LoRA have in common."""
        return self.checkpoint, self.family


@dataclass(frozen=True)
class PipelinePlan:
    """One pipeline to build and the entries (at least one) that run on it."""

    specs: tuple[ModelSpec, ...]
    # The first entry of an earlier plan of the same checkpoint and family (another
    # LoRA, or none), and whether this pipeline uses that one's text encoder, VAE,
    # tokenizer and processor (with --offload none only).
    relative: str | None = None
    borrows: bool = False

    @property
    def build_spec(self) -> ModelSpec:
        """The first entry, widened to the largest image count and output side of
        them all: the compile warm-up then covers every entry on the pipeline."""
        first = self.specs[0]
        return replace(
            first,
            max_images=max(spec.max_images for spec in self.specs),
            max_output_side=max(spec.max_output_side for spec in self.specs),
        )


def load_engines(specs: list[ModelSpec], options: EngineOptions) -> dict[str, Engine]:
    """One engine per entry, each honouring its own spec (defaults, limits, output
    size); entries with the same weights share one pipeline, and with --offload none
    pipelines of one checkpoint and family share all but the transformer and the
    scheduler. Keyed by name, in the order of `specs`."""
    fixtures = [spec for spec in specs if spec.checkpoint == FIXTURE]
    engines = {spec.name: load_engine(spec, options) for spec in fixtures}
    plans = plan_pipelines([spec for spec in specs if spec not in fixtures], options)
    built: dict[str, DiffusersEngine] = {}
    for plan in plans:
        engines.update(_load_plan(plan, options, built))
    description = describe_sharing(plans, options)
    if description:
        log.info("shared weights: %s", description)
    return {spec.name: engines[spec.name] for spec in specs}


def _load_plan(
    plan: PipelinePlan, options: EngineOptions, built: dict[str, DiffusersEngine]
) -> dict[str, Engine]:
    """Build the plan's pipeline (recorded in `built` under its first entry's
    name) and put an engine of each entry on it."""
    from retouch.engine.diffusers_engine import DiffusersEngine

    lender = built[plan.relative].pipe if plan.borrows and plan.relative else None
    builder = DiffusersEngine(plan.build_spec, options, components_of=lender)
    built[plan.specs[0].name] = builder
    return {
        spec.name: builder if spec == builder.spec else DiffusersEngine(spec, options, on=builder)
        for spec in plan.specs
    }


def plan_pipelines(specs: list[ModelSpec], options: EngineOptions) -> list[PipelinePlan]:
    """Group `specs` (no fixtures) by their weights, in the order of their first
    entries. Checkpoints are resolved first, so a missing one stops start-up
    before anything is loaded."""
    groups: dict[Weights, list[ModelSpec]] = {}
    for spec in specs:
        groups.setdefault(weights_of(spec, options), []).append(spec)
    firsts: dict[tuple[str, Family], str] = {}
    plans = []
    for weights, members in groups.items():
        relative = firsts.setdefault(weights.base, members[0].name)
        if relative == members[0].name:
            plans.append(PipelinePlan(tuple(members)))
        else:
            plans.append(PipelinePlan(tuple(members), relative, options.offload == "none"))
    return plans


def weights_of(spec: ModelSpec, options: EngineOptions) -> Weights:
    """Everything that changes the weights: the checkpoint (a directory however it
    is written), the family, and the LoRA's file and scale. Its steps and CFG
    preset do not."""
    from retouch.engine.diffusers_engine import resolve_checkpoint

    checkpoint = resolve_checkpoint(spec.checkpoint, options.models_dir)
    lora = spec.lora
    return Weights(
        checkpoint=_place_of(checkpoint),
        family=spec.family,
        lora=None if lora is None else (_place_of(lora.source), lora.weight, lora.weight_name),
    )


def describe_sharing(plans: list[PipelinePlan], options: EngineOptions) -> str:
    """Which entries share what, e.g. "qwen-image-edit-fast shares the text
    encoder and VAE of qwen-image-edit"; empty when nothing is shared."""
    notes = []
    for plan in plans:
        first = plan.specs[0].name
        if plan.relative and plan.borrows:
            notes.append(f"{first} shares the text encoder and VAE of {plan.relative}")
        elif plan.relative:
            notes.append(
                f"{first} loads a text encoder and VAE of its own beside {plan.relative}'s "
                f"(with --offload {options.offload} pipelines share no components)"
            )
        notes += [f"{spec.name} shares its pipeline with {first}" for spec in plan.specs[1:]]
    return "; ".join(notes)


def _place_of(source: str) -> str:
    """A local path as one absolute name; anything else (a Hugging Face id) as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
