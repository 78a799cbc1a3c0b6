"""Turn `--model` into a loaded engine."""

from __future__ import annotations

from retouch.engine.base import Engine
from retouch.settings import Settings

DEMO_STEPS = 8


def load_engine(settings: Settings) -> Engine:
    """`fixture`, `demo`, a local checkpoint directory or a Hugging Face id."""
    if settings.model == "fixture":
        from retouch.engine.fixture import FixtureEngine

        return FixtureEngine(default_steps=settings.steps or 4)

    from retouch.engine.diffusers_engine import DiffusersEngine

    if settings.model == "demo":
        from retouch.engine.demo import ensure_demo_checkpoint

        checkpoint = ensure_demo_checkpoint(settings.models_dir / "demo")
        return DiffusersEngine(
            str(checkpoint),
            family="edit-plus",
            device=settings.device,
            dtype=settings.dtype,
            steps=settings.steps or DEMO_STEPS,
            true_cfg_scale=settings.true_cfg_scale,
        )
    return DiffusersEngine(
        settings.model,
        family=settings.family,
        device=settings.device,
        dtype=settings.dtype,
        steps=settings.steps,
        true_cfg_scale=settings.true_cfg_scale,
    )
