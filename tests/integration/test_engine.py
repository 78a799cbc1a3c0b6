"""The diffusers engine on the demo checkpoint: the real pipeline, on the CPU."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import threading
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from retouch.engine import demo
from retouch.engine.base import EditJob, Engine, EngineOptions, Interrupted
from retouch.engine.diffusers_engine import (
    DiffusersEngine,
    fit_output_size,
    output_size,
    pipeline_default_size,
)
from retouch.engine.loader import load_engine, load_engines
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


@pytest.fixture(scope="module")
def direct(demo_dir: Path) -> Any:
    """diffusers' own pipeline on the demo checkpoint, called without Retouch."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(demo_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def direct_edit(direct: Any, edit: EditJob) -> Image.Image:
    """What diffusers' own pipeline makes of `edit`, called as its documentation shows."""
    import torch

    return direct(
        image=edit.images,
        prompt=edit.prompt,
        negative_prompt=edit.negative_prompt,
        true_cfg_scale=edit.true_cfg_scale,
        num_inference_steps=edit.steps,
        height=edit.height,
        width=edit.width,
        generator=torch.Generator(device="cpu").manual_seed(edit.seed),
    ).images[0]


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


def test_output_equals_a_direct_diffusers_call(engine: DiffusersEngine, direct: Any) -> None:

    progress: list[tuple[int, int]] = []
    ours = engine.run(job(), lambda done, total: progress.append((done, total)), lambda: False)
    assert progress == [(1, 2), (2, 2)]
    assert len(ours) == 1 and ours[0].size == (512, 512)
    assert encode_png(ours[0]) == encode_png(direct_edit(direct, job()))


def test_without_true_cfg_the_negative_prompt_is_left_out_silently(
    engine: DiffusersEngine, direct: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A model served with true_cfg_scale <= 1 (a Lightning LoRA) gets no negative
    prompt: diffusers would ignore it and warn on every edit. The image is the one
    diffusers makes either way."""

    caplog.set_level(logging.INFO)
    no_cfg = replace(job(), true_cfg_scale=1.0, negative_prompt="blurry")
    ours = engine.run(no_cfg, lambda *_: None, lambda: False)
    assert [r.message for r in caplog.records if r.name.startswith("diffusers")] == []
    theirs = direct_edit(direct, replace(no_cfg, negative_prompt=None))
    assert encode_png(ours[0]) == encode_png(theirs)


def test_diffusers_and_transformers_log_through_the_process_handler(
    engine: DiffusersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Their warnings reach the root logger (JSON lines in a service), not a handler
    of their own writing raw lines to stderr."""
    caplog.set_level(logging.INFO)
    for name in ("diffusers.pipelines.probe", "transformers.models.probe"):
        logging.getLogger(name).warning("probe from %s", name)
        library = logging.getLogger(name.split(".")[0])
        assert library.propagate and not library.handlers
    assert [r.getMessage() for r in caplog.records if "probe" in r.getMessage()] == [
        "probe from diffusers.pipelines.probe",
        "probe from transformers.models.probe",
    ]


def test_without_a_size_an_ordinary_input_gets_the_pipelines_own_choice(
    engine: DiffusersEngine, direct: Any
) -> None:
    """Edit-Plus sizes the output after the last input (~1 MP at its aspect)."""
    import torch

    inputs = [Image.new("RGB", (400, 480), (30, 120, 200)), Image.new("RGB", (600, 400), (9, 9, 9))]
    no_size = EditJob(
        images=inputs, prompt=PROMPT, seed=5, steps=1, true_cfg_scale=4.0, negative_prompt=" "
    )
    ours = engine.run(no_size, lambda *_: None, lambda: False)[0]
    theirs = direct(
        image=inputs,
        prompt=PROMPT,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=1,
        generator=torch.Generator(device="cpu").manual_seed(5),
    ).images[0]
    assert ours.size == theirs.size == (1248, 832)
    assert encode_png(ours) == encode_png(theirs)


@pytest.mark.parametrize(
    ("input_size", "max_output_side", "expected"),
    [
        ((384, 3072), 2048, (512, 2048)),  # the pipeline alone: 352x2912
        ((1600, 900), 1024, (1024, 576)),  # the pipeline alone: 1376x768
    ],
)
def test_without_a_size_an_extreme_input_stays_within_the_bounds(
    demo_dir: Path,
    engine: DiffusersEngine,
    input_size: tuple[int, int],
    max_output_side: int,
    expected: tuple[int, int],
) -> None:
    model = (
        engine
        if max_output_side == engine.spec.max_output_side
        else DiffusersEngine(spec(demo_dir, max_output_side=max_output_side))
    )
    extreme = EditJob(
        images=[Image.new("RGB", input_size, (30, 120, 200))],
        prompt=PROMPT,
        seed=1,
        steps=1,
        true_cfg_scale=1.0,
    )
    [result] = model.run(extreme, lambda *_: None, lambda: False)
    assert result.size == expected
    assert all(512 <= side <= max_output_side and side % 16 == 0 for side in result.size)


def test_default_sizes_fit_the_bounds_and_are_otherwise_the_pipelines() -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    for max_side in [512, 1000, 1024, 1536, 2048]:
        high = max_side // 16 * 16
        for step in range(-300, 301):
            aspect = 2 ** (step / 50)  # 1:64 to 64:1
            pipeline_choice = calculate_dimensions(1024 * 1024, aspect)[:2]
            assert pipeline_default_size(aspect) == pipeline_choice
            width, height = fit_output_size(pipeline_choice, aspect, max_side)
            assert 512 <= width <= high and 512 <= height <= high, (aspect, max_side)
            assert width % 16 == 0 and height % 16 == 0
            if all(512 <= side <= high for side in pipeline_choice):
                assert (width, height) == pipeline_choice
            elif 512 / high <= aspect <= high / 512:
                # Scaled into the bounds: the aspect is kept to within a 16-pixel step.
                assert abs(math.log(width / height / aspect)) < math.log(1 + 16 / 512)
                assert high - max(width, height) <= 16 or min(width, height) - 512 <= 16
            else:  # beyond what the bounds allow: one side at each bound
                assert {width, height} == {512, high}
    # Edit sizes the output after the first input, Edit-Plus after the last.
    images = [Image.new("RGB", (600, 400)), Image.new("RGB", (400, 600))]
    plain = EditJob(images=images, prompt="p", seed=0, steps=1, true_cfg_scale=1.0)
    assert output_size(plain, "edit", 2048) == (1248, 832)
    assert output_size(plain, "edit-plus", 2048) == (832, 1248)
    sized = EditJob(
        images=images, prompt="p", seed=0, steps=1, true_cfg_scale=1.0, width=640, height=512
    )
    assert output_size(sized, "edit-plus", 2048) == (640, 512)


def test_same_seed_same_image(engine: DiffusersEngine) -> None:
    first = engine.run(job(seed=11), lambda *_: None, lambda: False)
    second = engine.run(job(seed=11), lambda *_: None, lambda: False)
    assert encode_png(first[0]) == encode_png(second[0])


def test_n_results_are_denoised_together_and_decoded_one_at_a_time(
    engine: DiffusersEngine,
) -> None:
    """The VAE decoder, the largest activations of an edit, never sees more than one
    image, so its memory does not grow with n."""
    seen: list[tuple[str, int]] = []
    hooks = [
        engine.pipe.vae.decoder.register_forward_pre_hook(
            lambda _module, args: seen.append(("vae decoder", args[0].shape[0]))
        ),
        engine.pipe.transformer.register_forward_pre_hook(
            lambda _module, _args, kwargs: seen.append(
                ("transformer", kwargs["hidden_states"].shape[0])
            ),
            with_kwargs=True,
        ),
    ]
    try:
        results = engine.run(replace(job(steps=1), n=3), lambda *_: None, lambda: False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(results) == 3 and len({encode_png(image) for image in results}) == 3
    assert [batch for part, batch in seen if part == "vae decoder"] == [1, 1, 1]
    assert {batch for part, batch in seen if part == "transformer"} == {3}


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineOptions(device="gpu"), "--device 'gpu' is not a device torch knows"),
        (EngineOptions(device="cuda:99"), "--device cuda:99"),
        (EngineOptions(device="cpu", dtype="float32", quantize="fp8"), "not --dtype float32"),
        (EngineOptions(dtype="float16", quantize="fp8"), "not --dtype float16"),
        (
            EngineOptions(device="cpu", compile=True, offload="sequential"),
            "--compile cannot be combined with --offload sequential",
        ),
    ],
)
def test_options_that_cannot_work_stop_start_up_with_one_sentence(
    demo_dir: Path, options: EngineOptions, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message) as info:
        DiffusersEngine(spec(demo_dir), options)
    assert "\n" not in str(info.value) and str(info.value).endswith(".")


@pytest.mark.parametrize("ending", ["cancelled", "failed"])
def test_a_run_that_does_not_return_puts_model_offload_back_in_place(
    demo_dir: Path, ending: str
) -> None:
    """diffusers re-installs the offload hooks (moving every model back to the CPU)
    only when __call__ returns; after a cancel or an error the engine does it. On
    the CPU the hooks are installed by hand: the engine refuses --offload there."""
    offloaded = DiffusersEngine(spec(demo_dir))
    offloaded.pipe.enable_model_cpu_offload(device="cpu")
    hooks = list(offloaded.pipe._all_hooks)

    def on_step(_done: int, _total: int) -> None:
        if ending == "failed":
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(Interrupted if ending == "cancelled" else RuntimeError):
        offloaded.run(job(steps=3), on_step, lambda: True)
    fresh = offloaded.pipe._all_hooks
    assert len(fresh) == len(hooks) and not any(new is old for new in fresh for old in hooks)
    # ... and the pipeline still works with them.
    [result] = offloaded.run(job(steps=1), lambda *_: None, lambda: False)
    assert result.size == (512, 512)


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


def test_a_lora_weight_name_picks_one_file_of_several(demo_dir: Path, tmp_path: Path) -> None:
    import torch

    folder = write_tiny_lora(demo_dir, tmp_path / "loras")  # pytorch_lora_weights.safetensors
    other = write_tiny_lora(demo_dir, tmp_path / "other", seed=7)
    (other / "pytorch_lora_weights.safetensors").rename(folder / "lightning-4step.safetensors")
    by_default = DiffusersEngine(spec(demo_dir, lora=LoraSpec(source=str(folder))))
    named = DiffusersEngine(
        spec(demo_dir, lora=LoraSpec(source=str(folder), weight_name="lightning-4step.safetensors"))
    )
    by_file = DiffusersEngine(
        spec(demo_dir, lora=LoraSpec(source=str(folder / "lightning-4step.safetensors")))
    )

    def weight(engine: DiffusersEngine) -> torch.Tensor:
        return engine.pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach()

    assert torch.equal(weight(named), weight(by_file))
    assert not torch.equal(weight(named), weight(by_default))
    with pytest.raises(ModelLoadError, match=r"\(missing.safetensors\)"):
        DiffusersEngine(
            spec(demo_dir, lora=LoraSpec(source=str(folder), weight_name="missing.safetensors"))
        )


@pytest.mark.parametrize("source", ["/nonexistent/lora.safetensors", "./lora.safetensors"])
def test_a_missing_lora_file_is_named_as_missing(demo_dir: Path, source: str) -> None:
    with pytest.raises(ModelLoadError, match=r"There is no LoRA file or folder at '"):
        DiffusersEngine(spec(demo_dir, lora=LoraSpec(source=source)))


def test_a_broken_lora_stops_loading_with_one_sentence(demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="Could not apply the LoRA"):
        DiffusersEngine(spec(demo_dir, lora=LoraSpec(source=str(tmp_path))))


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor: complex ops fall back to eager
def test_compile_warms_up_at_start_and_matches_eager(
    demo_dir: Path, engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import numpy as np
    from diffusers import QwenImageTransformer2DModel
    from torch._dynamo.utils import counters

    seen: list[tuple[int, ...]] = []
    forward = QwenImageTransformer2DModel.forward

    def recording(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(tuple(hidden_states.shape))
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(QwenImageTransformer2DModel, "forward", recording)
    compiled = DiffusersEngine(spec(demo_dir), EngineOptions(compile=True))
    block = compiled.pipe.transformer.transformer_blocks[0]
    assert getattr(block, "_compiled_call_impl", None) is not None
    # Warm-up covered several shapes: batch 1 at two token counts, and batch 2.
    warmed_up = set(seen)
    assert {shape[0] for shape in warmed_up} == {1, 2}
    assert len({shape[1] for shape in warmed_up if shape[0] == 1}) >= 2

    graphs = counters["stats"]["unique_graphs"]
    eager = np.asarray(engine.run(job(), lambda *_: None, lambda: False)[0], dtype=np.int16)
    fast = np.asarray(compiled.run(job(), lambda *_: None, lambda: False)[0], dtype=np.int16)
    assert np.abs(eager - fast).max() <= 2
    # A shape the warm-up did not run compiled nothing on the request.
    assert seen[-1] not in warmed_up
    assert counters["stats"]["unique_graphs"] == graphs
    # A LoRA variant's transformer beside it runs the same compiled code.
    lora = LoraSpec(source=str(write_tiny_lora(demo_dir, tmp_path / "lora")))
    DiffusersEngine(
        spec(demo_dir, lora=lora), EngineOptions(compile=True), components_of=compiled.pipe
    )
    assert counters["stats"]["unique_graphs"] == graphs


def test_entries_with_the_same_weights_share_one_pipeline(demo_dir: Path) -> None:
    """The same checkpoint (written two ways) at other defaults and limits: one
    pipeline, and each engine sizes its outputs by its own entry."""
    large = spec(demo_dir, max_output_side=768)
    small = replace(spec(demo_dir), name="small", checkpoint=f"{demo_dir}/", steps=4)
    small = replace(small, max_output_side=512, price=2.0)
    engines = load_engines([large, small], EngineOptions())
    one, other = engines[large.name], engines[small.name]
    assert isinstance(one, DiffusersEngine) and isinstance(other, DiffusersEngine)
    assert one.pipe is other.pipe
    assert (one.spec, other.spec) == (large, small)
    wide = EditJob(
        images=[Image.new("RGB", (1600, 900), (30, 120, 200))],
        prompt=PROMPT,
        seed=1,
        steps=1,
        true_cfg_scale=1.0,
    )
    sizes = [engine.run(wide, lambda *_: None, lambda: False)[0].size for engine in (one, other)]
    assert sizes == [(768, 512), (512, 512)]


def test_a_lora_variant_shares_all_but_its_transformer_and_changes_no_result(
    demo_dir: Path, tmp_path: Path
) -> None:
    lora = LoraSpec(source=str(write_tiny_lora(demo_dir, tmp_path / "lora")), steps=3)
    plain = spec(demo_dir)
    fast = replace(spec(demo_dir, lora=lora), name="fast")
    engines = load_engines([plain, fast], EngineOptions())
    one, other = engines[plain.name], engines[fast.name]
    assert isinstance(one, DiffusersEngine) and isinstance(other, DiffusersEngine)
    for component in ["text_encoder", "vae", "tokenizer", "processor"]:
        assert getattr(one.pipe, component) is getattr(other.pipe, component), component
    assert one.pipe.transformer is not other.pipe.transformer
    assert one.pipe.scheduler is not other.pipe.scheduler

    def png(engine: Engine) -> bytes:
        [result] = engine.run(job(steps=1), lambda *_: None, lambda: False)
        return encode_png(result)

    results = {entry.name: png(engines[entry.name]) for entry in (plain, fast)}
    assert results[plain.name] != results[fast.name]
    # Each as it would be on a worker of its own: byte for byte.
    for entry in (plain, fast):
        assert png(load_engine(entry, EngineOptions())) == results[entry.name]


def test_another_checkpoint_shares_nothing(demo_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(demo_dir, tmp_path / "copy")
    engines = load_engines([spec(demo_dir), replace(spec(copy), name="copy")], EngineOptions())
    one, other = engines["qwen-image-edit"], engines["copy"]
    assert isinstance(one, DiffusersEngine) and isinstance(other, DiffusersEngine)
    assert one.pipe is not other.pipe
    theirs = list(other.pipe.components.values())
    assert not any(mine is their for mine in one.pipe.components.values() for their in theirs)


def write_tiny_lora(demo_dir: Path, target: Path, seed: int = 0) -> Path:
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
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=generator)
    QwenImageEditPlusPipeline.save_lora_weights(
        target, transformer_lora_layers=get_peft_model_state_dict(transformer)
    )
    return target


def test_two_processes_building_the_demo_checkpoint_at_once_both_succeed(
    tmp_path: Path,
) -> None:
    """Two workers sharing a data directory, both finding no demo checkpoint."""
    target = tmp_path / "models" / "demo"
    builders = [
        subprocess.Popen(
            [sys.executable, "-m", "retouch", "demo-model", str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    for builder in builders:
        _, stderr = builder.communicate(timeout=240)
        assert builder.returncode == 0, stderr
    assert demo.is_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".demo.lock", "demo"]
    DiffusersEngine(spec(target))


def test_a_builder_that_loses_the_race_keeps_the_winners_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the lock (builders on two hosts of a shared file system) both build,
    and the rename of the second fails onto the first's complete checkpoint."""
    target = tmp_path / "demo"
    demo.build_demo_pipeline()  # imports done here: first imports in two threads can deadlock
    both_built = threading.Barrier(2, timeout=120)
    install = demo._install

    def install_together(staging: Path, directory: Path) -> None:
        both_built.wait()  # both have a finished copy before either renames
        install(staging, directory)

    monkeypatch.setattr(demo, "_build_lock", lambda _directory: nullcontext())
    monkeypatch.setattr(demo, "_install", install_together)
    errors: list[BaseException] = []

    def build() -> None:
        try:
            demo.ensure_demo_checkpoint(target)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert errors == []
    assert demo.is_complete(target)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_a_stale_demo_checkpoint_is_replaced_and_a_foreign_directory_refused(
    tmp_path: Path,
) -> None:
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / demo.COMPLETE_MARKER).write_text(json.dumps({"format": demo.DEMO_FORMAT - 1}))
    demo.ensure_demo_checkpoint(stale)
    assert demo.is_complete(stale) and (stale / "model_index.json").is_file()

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ModelLoadError, match="is not a Retouch demo checkpoint"):
        demo.ensure_demo_checkpoint(foreign)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"
    refused = retouch_cli("demo-model", str(foreign), check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "is not a Retouch demo checkpoint" in refused.stderr
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".photos.lock",
        ".stale.lock",
        "photos",
        "stale",
    ]
