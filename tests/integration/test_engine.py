"""The diffusers engine on the demo checkpoint: the real pipeline, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from retouch.engine.base import EditJob, Interrupted
from retouch.engine.diffusers_engine import DiffusersEngine
from retouch.errors import ModelLoadError
from retouch.images import encode_png
from tests.support import retouch_cli

PROMPT = "put a red scarf on the cat"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo") / "checkpoint"
    result = retouch_cli("demo-model", str(directory))
    assert "random weights" in result.stdout
    return directory


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> DiffusersEngine:
    return DiffusersEngine(str(demo_dir), steps=2)


def job(seed: int = 3, steps: int = 2) -> EditJob:
    image = Image.new("RGB", (400, 480), (30, 120, 200))
    return EditJob(
        images=[image],
        prompt=PROMPT,
        seed=seed,
        steps=steps,
        true_cfg_scale=4.0,
        negative_prompt=" ",
        width=512,
        height=512,
    )


def test_demo_checkpoint_has_every_component(demo_dir: Path) -> None:
    index = json.loads((demo_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    for component in ["transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"]:
        assert component in index and (demo_dir / component).is_dir()
    size = sum(f.stat().st_size for f in demo_dir.rglob("*") if f.is_file())
    assert size < 20 * 1024 * 1024


def test_family_is_read_from_the_checkpoint(engine: DiffusersEngine) -> None:
    assert engine.family == "edit-plus" and engine.max_images == 3
    assert type(engine.pipe).__name__ == "QwenImageEditPlusPipeline"


def test_interrupt_stops_at_once_and_leaves_the_pipeline_reusable(
    engine: DiffusersEngine,
) -> None:
    steps: list[tuple[int, int]] = []
    with pytest.raises(Interrupted):
        engine.run(job(steps=5), lambda done, total: steps.append((done, total)), lambda: True)
    assert steps == [(1, 5)]


def test_output_equals_a_direct_diffusers_call(demo_dir: Path, engine: DiffusersEngine) -> None:
    import torch
    from diffusers import QwenImageEditPlusPipeline

    progress: list[tuple[int, int]] = []
    ours = engine.run(job(), lambda done, total: progress.append((done, total)), lambda: False)
    assert progress == [(1, 2), (2, 2)]
    assert len(ours) == 1 and ours[0].size == (512, 512)

    pipe = QwenImageEditPlusPipeline.from_pretrained(demo_dir)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(
        image=[Image.new("RGB", (400, 480), (30, 120, 200))],
        prompt=PROMPT,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=512,
        width=512,
        generator=torch.Generator(device="cpu").manual_seed(3),
    ).images[0]
    assert encode_png(ours[0]) == encode_png(direct)


def test_same_seed_same_image(engine: DiffusersEngine) -> None:
    first = engine.run(job(seed=11), lambda *_: None, lambda: False)
    second = engine.run(job(seed=11), lambda *_: None, lambda: False)
    assert encode_png(first[0]) == encode_png(second[0])


def test_missing_checkpoint_is_one_clear_sentence(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        DiffusersEngine(str(tmp_path / "nowhere"), family="edit-plus")
    message = str(info.value)
    assert "nowhere" in message and "--model" in message and "\n" not in message


def test_wrong_kind_of_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline checkpoint"):
        DiffusersEngine(str(tmp_path))
