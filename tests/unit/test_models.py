"""Models are configuration: the models file, the --model shortcut and the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from retouch.models import (
    DEFAULT_MODELS_FILE,
    LoraSpec,
    ModelsFileError,
    ModelSpec,
    load_models_file,
    model_shortcut,
)
from retouch.settings import Settings

TWO_MODELS = """
[models.qwen-image-edit]
checkpoint = "Qwen/Qwen-Image-Edit-2511"

[models.qwen-image-edit-classic]
checkpoint = "/models/Qwen-Image-Edit"
family = "edit"
price = 0.5
user_groups = ["vip"]
max_output_side = 1024

[models.qwen-image-edit-fast]
checkpoint = "Qwen/Qwen-Image-Edit-2511"
lora = { source = "lightx2v/Qwen-Image-Lightning", steps = 8, true_cfg_scale = 1.0 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_the_default_models_file_serves_2511() -> None:
    [spec] = load_models_file(DEFAULT_MODELS_FILE)
    assert spec == ModelSpec(
        name="qwen-image-edit",
        checkpoint="Qwen/Qwen-Image-Edit-2511",
        family="edit-plus",
        steps=40,
        true_cfg_scale=4.0,
        negative_prompt=" ",
        max_images=3,
        max_output_side=2048,
        price=1.0,
        user_groups=("default", "vip"),
    )
    assert Settings().model_specs() == [spec]


def test_a_models_file_with_family_defaults_and_a_lora(tmp_path: Path) -> None:
    plus, classic, fast = load_models_file(write(tmp_path, TWO_MODELS))
    assert (plus.family, plus.steps, plus.max_images) == ("edit-plus", 40, 3)
    assert (classic.family, classic.steps, classic.max_images) == ("edit", 50, 1)
    assert (classic.price, classic.user_groups, classic.max_output_side) == (0.5, ("vip",), 1024)
    assert fast.lora == LoraSpec(
        source="lightx2v/Qwen-Image-Lightning", steps=8, true_cfg_scale=1.0
    )
    assert (fast.effective_steps, fast.effective_true_cfg_scale) == (8, 1.0)
    assert (fast.steps, fast.true_cfg_scale) == (40, 4.0)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[models.x]\nfamily = 'edit'", "checkpoint"),
        ("[models.x]\ncheckpoint = 'a/b'\nfamily = 'inpaint'", "family"),
        ("[models.x]\ncheckpoint = 'a/b'\nfamily = 'edit'\nmax_images = 3", "at most 1"),
        ("[models.x]\ncheckpoint = 'a/b'\nmax_output_side = 4096", "max_output_side"),
        ("[models.x]\ncheckpoint = 'a/b'\nuser_groups = ['gold']", "user_groups"),
        ("[models.x]\ncheckpoint = 'a/b'\nsteeps = 4", "steeps"),
        ("[models]", "models"),
        ("models = [", "Cannot read"),
    ],
)
def test_invalid_models_files_say_where(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ModelsFileError) as info:
        load_models_file(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_the_model_shortcut_reads_a_local_checkpoints_family(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    spec = model_shortcut("qwen-image-edit", str(tmp_path))
    assert (spec.family, spec.steps, spec.max_images) == ("edit", 50, 1)
    demo = model_shortcut("qwen-image-edit", "demo", steps=3, price=2)
    assert (demo.family, demo.steps, demo.price) == ("edit-plus", 3, 2)


def test_settings_build_the_shortcut_with_a_lora() -> None:
    settings = Settings(model="demo", lora="/loras/fast", lora_steps=4, lora_true_cfg_scale=1.0)
    [spec] = settings.model_specs()
    assert spec.checkpoint == "demo" and spec.effective_steps == 4
    assert spec.lora == LoraSpec(source="/loras/fast", steps=4, true_cfg_scale=1.0)


def test_model_and_models_file_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match="either"):
        Settings(model="demo", models_file=write(tmp_path, TWO_MODELS)).model_specs()


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("fetch_ports", "80,70000", "70000 is no TCP port (1-65535)"),
        ("callback_ports", "0", "0 is no TCP port (1-65535)"),
        ("public_url", "retouch.example.com", "must be an http or https URL"),
        ("public_url", "ftp://retouch.example.com", "must be an http or https URL"),
        ("public_url", "https:///v1", "has no host"),
        ("public_url", "https://retouch.example.com/?a=1", "takes no query or fragment"),
        ("secret_key", "s" * 31, "too short (31 characters; at least 32)"),
        ("storage", "s3:///prefix", "names no bucket"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_why(
    field: str, value: str, said: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(**{field: value})
    (error,) = raised.value.errors()
    assert error["loc"] == (field,) and said in error["msg"]


def test_settings_at_the_edges_are_taken() -> None:
    settings = Settings(
        fetch_ports="1,65535",
        callback_ports="any",
        public_url="http://10.0.0.5:8000/retouch",
        secret_key="s" * 32,
        storage="s3://bucket",
    )
    assert settings.allowed_fetch_ports == frozenset({1, 65535})
    assert settings.signing_key() == b"s" * 32
