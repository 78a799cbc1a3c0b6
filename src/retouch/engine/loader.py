"""Turn model specs into loaded engines."""

from __future__ import annotations

from retouch.engine.base import Engine, EngineOptions
from retouch.models import FIXTURE, ModelSpec
from retouch.settings import Settings


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


def load_engines(specs: list[ModelSpec], options: EngineOptions) -> dict[str, Engine]:
    return {spec.name: load_engine(spec, options) for spec in specs}
