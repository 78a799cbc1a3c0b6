"""The diffusers engine on the demo checkpoint: the real pipeline, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from retouch.engine import diffusers_engine
from retouch.engine.base import EditJob, EngineOptions, Interrupted
from retouch.engine.diffusers_engine import DiffusersEngine
from retouch.errors import InvalidInputError, ModelLoadError
from retouch.images import encode_png
from retouch.models import LoraSpec, ModelSpec
from retouch.prompts import PromptTokenCounter
from retouch.worker import check_prompt
from tests.support import retouch_cli

PROMPT = "put a red scarf on the cat"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo") / "checkpoint"
    result = retouch_cli("demo-model", str(directory))
    assert "random weights" in result.stdout
    return directory


def spec(demo_dir: Path, **changes: object) -> ModelSpec:
    return ModelSpec(name="qwen-image-edit", checkpoint=str(demo_dir), steps=2, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> DiffusersEngine:
    return DiffusersEngine(spec(demo_dir))


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


def test_the_configured_family_is_loaded(engine: DiffusersEngine) -> None:
    assert type(engine.pipe).__name__ == "QwenImageEditPlusPipeline"


def test_a_family_that_does_not_match_the_checkpoint_is_refused(demo_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="set family = 'edit-plus'"):
        DiffusersEngine(spec(demo_dir, family="edit", max_images=1))


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
        DiffusersEngine(spec(tmp_path / "nowhere"))
    message = str(info.value)
    assert "nowhere" in message and "--model" in message and "\n" not in message


def test_wrong_kind_of_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline checkpoint"):
        DiffusersEngine(spec(tmp_path))


def test_prompt_tokens_are_counted_alike_by_the_api_and_the_engine(
    demo_dir: Path, engine: DiffusersEngine
) -> None:
    counter = PromptTokenCounter(demo_dir.parent)
    model = spec(demo_dir)
    for prompt in ["put a red scarf on the cat", "é" * 1500]:
        assert counter.count(model, prompt) == engine.count_tokens(prompt)
    long_prompt = "é" * 1500  # 1500 characters, more than 2000 tokens
    assert (counter.count(model, long_prompt) or 0) > 2000
    with pytest.raises(InvalidInputError) as info:
        check_prompt(engine, long_prompt)
    assert info.value.param == "prompt" and "2000" in info.value.message
    check_prompt(engine, "x" * 2000)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineOptions(device="cpu", offload="model"), "--offload model"),
        (EngineOptions(device="cpu", offload="sequential"), "--offload sequential"),
        (EngineOptions(device="cpu", quantize="fp8"), "--quantize fp8 needs a CUDA GPU"),
    ],
)
def test_gpu_only_options_explain_themselves_on_the_cpu(
    demo_dir: Path, options: EngineOptions, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        DiffusersEngine(spec(demo_dir), options)


def test_a_lora_is_fused_and_brings_its_own_preset(
    demo_dir: Path, engine: DiffusersEngine, tmp_path: Path
) -> None:
    lora_dir = write_tiny_lora(demo_dir, tmp_path / "lora")
    preset = LoraSpec(source=str(lora_dir), steps=3, true_cfg_scale=1.0)
    with_lora = DiffusersEngine(spec(demo_dir, lora=preset))
    assert (with_lora.spec.effective_steps, with_lora.spec.effective_true_cfg_scale) == (3, 1.0)
    base = engine.run(job(), lambda *_: None, lambda: False)[0]
    edited = with_lora.run(job(), lambda *_: None, lambda: False)[0]
    assert encode_png(base) != encode_png(edited)


def test_a_broken_lora_stops_loading_with_one_sentence(demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="Could not apply the LoRA"):
        DiffusersEngine(spec(demo_dir, lora=LoraSpec(source=str(tmp_path))))


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor: complex ops fall back to eager
def test_compile_warms_up_at_start_and_matches_eager(
    demo_dir: Path, engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diffusers_engine, "WARMUP_SIZE", (512, 512))
    compiled = DiffusersEngine(spec(demo_dir), EngineOptions(compile=True))
    block = compiled.pipe.transformer.transformer_blocks[0]
    assert getattr(block, "_compiled_call_impl", None) is not None
    import numpy as np

    eager = np.asarray(engine.run(job(), lambda *_: None, lambda: False)[0], dtype=np.int16)
    fast = np.asarray(compiled.run(job(), lambda *_: None, lambda: False)[0], dtype=np.int16)
    assert np.abs(eager - fast).max() <= 2


def write_tiny_lora(demo_dir: Path, target: Path) -> Path:
    """A rank-4 LoRA on the demo transformer's attention, saved the diffusers way."""
    import torch
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(demo_dir / "transformer")
    transformer.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False
        )
    )
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    QwenImageEditPlusPipeline.save_lora_weights(
        target, transformer_lora_layers=get_peft_model_state_dict(transformer)
    )
    return target
