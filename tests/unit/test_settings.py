"""Settings that would do nothing are refused at start-up, saying which flag
needs which; the --model settings apply to the built-in model without --model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from retouch.cli import main
from retouch.models import DEFAULT_MODELS_FILE, LoraSpec, load_models_file
from retouch.settings import Settings

MODELS = '[models.qwen-image-edit]\ncheckpoint = "demo"\n'


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(MODELS)
    return path


def refusal(**settings: Any) -> str:
    with pytest.raises(ValidationError) as raised:
        Settings(**settings)
    (error,) = raised.value.errors()
    assert error["loc"] == ()
    message: str = error["msg"].removeprefix("Value error, ")
    return message


@pytest.mark.parametrize(
    ("setting", "value", "flag"),
    [
        ("model_name", "fast", "--model-name"),
        ("family", "edit", "--family"),
        ("steps", 8, "--steps"),
        ("true_cfg_scale", 1.0, "--true-cfg-scale"),
        ("price", 2.0, "--price"),
        ("lora", "/loras/fast.safetensors", "--lora"),
        ("lora_weight", 0.5, "--lora-weight"),
        ("lora_steps", 4, "--lora-steps"),
        ("lora_true_cfg_scale", 1.0, "--lora-true-cfg-scale"),
        ("lora_weight_name", "a.safetensors", "--lora-weight-name"),
    ],
)
def test_model_settings_are_refused_with_a_models_file(
    models_file: Path, setting: str, value: object, flag: str
) -> None:
    assert refusal(models_file=models_file, **{setting: value}) == (
        f"{flag} describes the one model of --model (or of the built-in default), so it does "
        f"nothing with --models-file: set it per model in {models_file} instead "
        "([models.NAME] keys and its lora table)"
    )


def test_every_ignored_setting_is_named_at_once(models_file: Path) -> None:
    said = refusal(models_file=models_file, steps=8, lora="a/b", lora_steps=4)
    assert said.startswith("--steps, --lora, --lora-steps describe the one model of --model")
    assert "so they do nothing with --models-file: set them per model in" in said


def test_settings_at_their_defaults_go_with_a_models_file(models_file: Path) -> None:
    settings = Settings(
        models_file=models_file, family="auto", model_name="qwen-image-edit", lora_weight=1.0
    )
    assert [spec.checkpoint for spec in settings.model_specs()] == ["demo"]


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"lora_steps": 4}, "--lora-steps describes the --lora: add --lora or drop it"),
        (
            {"model": "demo", "lora_weight": 0.5, "lora_true_cfg_scale": 1.0},
            "--lora-weight, --lora-true-cfg-scale describe the --lora: add --lora or drop them",
        ),
        (
            {"model": "demo", "lora_weight_name": "a.safetensors"},
            "--lora-weight-name describes the --lora: add --lora or drop it",
        ),
        (
            {"quantize_text_encoder": True},
            "--quantize-text-encoder needs --quantize fp8 (it quantizes the text encoder too, "
            "besides the transformer)",
        ),
        (
            {"family": "edit"},
            "--family says which pipeline the checkpoint of --model needs, and there is no "
            "--model (the built-in model's family is in its models file): give --model too or "
            "drop --family",
        ),
        ({"model": "demo", "models_file": Path("m.toml")}, "give either --model or --models-file"),
    ],
)
def test_a_setting_missing_its_partner_is_refused(settings: dict[str, Any], said: str) -> None:
    assert refusal(**settings).startswith(said)


def test_every_problem_is_said_at_once() -> None:
    assert refusal(lora_steps=4, quantize_text_encoder=True) == (
        "--lora-steps describes the --lora: add --lora or drop it; "
        "--quantize-text-encoder needs --quantize fp8 (it quantizes the text encoder too, "
        "besides the transformer)"
    )


def test_partnered_settings_are_taken() -> None:
    Settings(quantize="fp8", quantize_text_encoder=True)
    Settings(quantize_text_encoder=False)
    Settings(model="demo", family="edit-plus")


def test_the_built_in_model_takes_the_model_settings() -> None:
    (default,) = load_models_file(DEFAULT_MODELS_FILE)
    lora = "/loras/lightning-8steps.safetensors"  # on the worker's host, not this one
    settings = Settings(
        model_name="fast",
        steps=20,
        true_cfg_scale=3.0,
        price=0.5,
        lora=lora,
        lora_weight=0.8,
        lora_steps=8,
        lora_true_cfg_scale=1.0,
    )
    [spec] = settings.model_specs()
    assert spec.checkpoint == default.checkpoint == "Qwen/Qwen-Image-Edit-2511"
    assert (spec.name, spec.steps, spec.true_cfg_scale, spec.price) == ("fast", 20, 3.0, 0.5)
    assert spec.lora == LoraSpec(source=lora, weight=0.8, steps=8, true_cfg_scale=1.0)
    assert (spec.effective_steps, spec.effective_true_cfg_scale) == (8, 1.0)
    # Everything else is the built-in model's.
    assert (spec.family, spec.max_images, spec.negative_prompt, spec.user_groups) == (
        default.family,
        default.max_images,
        default.negative_prompt,
        default.user_groups,
    )
    assert Settings(price=0).model_specs()[0].price == 0
    assert Settings(price=1e11).model_specs()[0].price == 1e11
    assert Settings(price=0.001).model_specs()[0].price == 0.001
    for price, said in [(1e13, r"from 0 to 1e\+11"), (float("inf"), "from 0"), (0.0001, "0.001")]:
        with pytest.raises(ValidationError, match=said):
            Settings(price=price)
    for name in ["qwen-image-edit", "team/edit:v2.1", "A" * 100]:
        assert Settings(model_name=name).model_specs()[0].name == name
    for name in ["a b", "", "-x", "A" * 101, "x\n"]:
        with pytest.raises(ValidationError, match="model_name"):
            Settings(model_name=name)


def test_variables_are_checked_like_flags(
    models_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RETOUCH_MODELS_FILE", str(models_file))
    monkeypatch.setenv("RETOUCH_STEPS", "8")
    assert refusal().startswith("--steps describes the one model of --model")


@pytest.mark.parametrize("command", ["serve", "worker", "bench"])
def test_the_commands_refuse_in_one_line(tmp_path: Path, command: str) -> None:
    result = CliRunner().invoke(
        main, [command, "--data-dir", str(tmp_path), "--lora-steps", "4", "--lora-weight", "2"]
    )
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last == (
        "Error: invalid settings: --lora-weight, --lora-steps describe the --lora: "
        "add --lora or drop them"
    )


def test_the_lora_file_flag_reaches_the_spec(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench", "--data-dir", str(tmp_path), "--model", "demo", "--lora", "a/b",
            "--lora-weight-name", "../x.safetensors",
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "The LoRA file name '../x.safetensors' must be a path inside 'a/b'" in result.output


def test_the_worker_refuses_an_ambiguous_lora_in_one_line(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("fast-4steps.safetensors", "fast-8steps.safetensors"):
        (loras / name).write_bytes(b"")
    result = CliRunner().invoke(
        main,
        ["worker", "--data-dir", str(tmp_path), "--model", "demo", "--lora", str(loras)],
    )
    assert result.exit_code == 1
    assert result.output == (
        f"retouch: The LoRA directory {str(loras)!r} holds several weight files "
        "(fast-4steps.safetensors, fast-8steps.safetensors): name the one to load with "
        "weight_name (--lora-weight-name FILE).\n"
    )
