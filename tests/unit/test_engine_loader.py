"""Which entries of a models file share a pipeline, or its components: planned
before anything is loaded (the loading itself: tests/integration/test_engine.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retouch.engine.base import EngineOptions
from retouch.engine.loader import PipelinePlan, describe_sharing, plan_pipelines
from retouch.errors import ModelLoadError
from retouch.models import load_models_file

MODELS = """
[models.qwen-image-edit]
checkpoint = "{checkpoint}"

[models.qwen-image-edit-vip]
checkpoint = "{checkpoint}/"
steps = 50
max_output_side = 1024
price = 2.0
user_groups = ["vip"]

[models.qwen-image-edit-fast]
checkpoint = "{checkpoint}"
max_images = 2
max_output_side = 1024
lora = {{ source = "lightx2v/Lightning", weight_name = "8steps.safetensors", steps = 8 }}

[models.qwen-image-edit-faster]
checkpoint = "{checkpoint}"
lora = {{ source = "lightx2v/Lightning", weight_name = "8steps.safetensors", steps = 4 }}

[models.qwen-image-edit-strong]
checkpoint = "{checkpoint}"
lora = {{ source = "lightx2v/Lightning", weight_name = "8steps.safetensors", weight = 2.0 }}

[models.qwen-image-edit-single]
checkpoint = "{checkpoint}"
family = "edit"

[models.qwen-image-edit-2511]
checkpoint = "Qwen/Qwen-Image-Edit-2511"
"""


def plans(tmp_path: Path, offload: str = "none") -> list[PipelinePlan]:
    checkpoint = tmp_path / "Qwen-Image-Edit-2509"
    checkpoint.mkdir()
    models = tmp_path / "models.toml"
    models.write_text(MODELS.format(checkpoint=checkpoint))
    return plan_pipelines(load_models_file(models), EngineOptions(offload=offload))  # type: ignore[arg-type]


def summary(plan: PipelinePlan) -> tuple[list[str], str | None, bool]:
    return [spec.name for spec in plan.specs], plan.relative, plan.borrows


def test_entries_share_what_their_weights_have_in_common(tmp_path: Path) -> None:
    planned = plans(tmp_path)
    assert [summary(plan) for plan in planned] == [
        # Defaults, limits, price, user groups and the LoRA's steps change no weight.
        (["qwen-image-edit", "qwen-image-edit-vip"], None, False),
        (["qwen-image-edit-fast", "qwen-image-edit-faster"], "qwen-image-edit", True),
        # Another LoRA scale is other weights; another family another pipeline class.
        (["qwen-image-edit-strong"], "qwen-image-edit", True),
        (["qwen-image-edit-single"], None, False),
        (["qwen-image-edit-2511"], None, False),
    ]
    assert describe_sharing(planned, EngineOptions()) == (
        "qwen-image-edit-vip shares its pipeline with qwen-image-edit; "
        "qwen-image-edit-fast shares the text encoder and VAE of qwen-image-edit; "
        "qwen-image-edit-faster shares its pipeline with qwen-image-edit-fast; "
        "qwen-image-edit-strong shares the text encoder and VAE of qwen-image-edit"
    )


def test_a_shared_pipeline_is_built_for_the_widest_bounds_of_its_entries(tmp_path: Path) -> None:
    """The compile warm-up runs on the spec it is built for: then no entry's
    image count or output side recompiles on a request."""
    _, fast, *_ = plans(tmp_path)
    first, other = fast.specs
    assert (first.max_output_side, first.max_images) == (1024, 2)
    assert (other.max_output_side, other.max_images) == (2048, 3)
    assert (fast.build_spec.max_output_side, fast.build_spec.max_images) == (2048, 3)
    assert fast.build_spec.name == first.name and fast.build_spec.lora == first.lora


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_with_offload_pipelines_of_one_checkpoint_share_no_components(
    tmp_path: Path, offload: str
) -> None:
    """Model offload chains its hooks per pipeline: a component shared by two would
    carry one pipeline's hooks only, and the other's transformer would stay on the
    GPU through the VAE decode. Entries with the same weights still share one."""
    planned = plans(tmp_path, offload)
    assert [summary(plan)[2] for plan in planned] == [False] * 5
    assert [len(plan.specs) for plan in planned] == [2, 2, 1, 1, 1]
    assert describe_sharing(planned, EngineOptions(offload=offload)).split("; ")[1] == (  # type: ignore[arg-type]
        "qwen-image-edit-fast loads a text encoder and VAE of its own beside "
        f"qwen-image-edit's (with --offload {offload} pipelines share no components)"
    )


def test_a_missing_checkpoint_stops_the_plan_before_anything_loads(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS.format(checkpoint=tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="nowhere"):
        plan_pipelines(load_models_file(models), EngineOptions())
