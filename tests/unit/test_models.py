"""Models are configuration: the models file, the --model shortcut and the default."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
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
checkpoint = "Qwen/Qwen-Image-Edit-2509"

[models.qwen-image-edit-fast.lora]
source = "lightx2v/Qwen-Image-Lightning"
weight_name = "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
steps = 8
true_cfg_scale = 1.0
"""
LIGHTNING_8 = "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
LIGHTNING_4 = "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"

HubCache = Callable[..., Path]


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    """An empty Hugging Face cache (laid out as the hub's) and a way to add a
    cached repository: `hub_cache("org/name", {"file": "text"})`."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    # huggingface_hub reads HF_HUB_CACHE once, at import (a subprocess test checks the variable).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))

    def add(repo_id: str, files: dict[str, str]) -> Path:
        return _cache_repo(root, repo_id, files)

    return add


def _cache_repo(root: Path, repo_id: str, files: dict[str, str]) -> Path:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    return snapshot


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
        source="lightx2v/Qwen-Image-Lightning",
        steps=8,
        true_cfg_scale=1.0,
        weight_name=LIGHTNING_8,
    )
    assert (fast.effective_steps, fast.effective_true_cfg_scale) == (8, 1.0)
    assert (fast.steps, fast.true_cfg_scale) == (40, 4.0)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[models.x]\nfamily = 'edit'", "checkpoint"),
        ("[models.x]\ncheckpoint = 'a/b'\nfamily = 'inpaint'", "family"),
        ("[models.x]\ncheckpoint = 'a/b'\nfamily = 'edit'\nmax_images = 3", "x.max_images"),
        ("[models.x]\ncheckpoint = 'a/b'\nprice = inf", "x.price: the price must be from 0"),
        ("[models.x]\ncheckpoint = 'a/b'\nprice = nan", "x.price: the price must be from 0"),
        ("[models.x]\ncheckpoint = 'a/b'\nprice = 100000000001", "to 1e+11 credits"),
        ("[models.x]\ncheckpoint = 'a/b'\nprice = 0.0005", "multiple of 0.001"),
        ("[models.'has space']\ncheckpoint = 'a/b'", "models.'has space': a model name"),
        ("[models.'']\ncheckpoint = 'a/b'", "models.'': a model name"),
        ("[models.'-x']\ncheckpoint = 'a/b'", "starting with a letter or digit"),
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


def test_settings_pass_the_lora_file_name(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    (loras / "Qwen-Image-Edit-2509").mkdir(parents=True)
    for name in (LIGHTNING_4, LIGHTNING_8):
        (loras / name).write_bytes(b"")
    settings = Settings(model="demo", lora=str(loras), lora_weight_name=LIGHTNING_4, lora_steps=4)
    [spec] = settings.model_specs()
    assert spec.lora == LoraSpec(source=str(loras), steps=4, weight_name=LIGHTNING_4)


# -- LoRA files ----------------------------------------------------------------------


def lora_dir(tmp_path: Path, *names: str) -> Path:
    directory = tmp_path / "lora"
    directory.mkdir()
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


def models_with_lora(tmp_path: Path, source: str, weight_name: str | None = None) -> Path:
    entry = {"source": source} | ({"weight_name": weight_name} if weight_name else {})
    table = ", ".join(f"{key} = {json.dumps(value)}" for key, value in entry.items())
    return write(tmp_path, f'[models.fast]\ncheckpoint = "demo"\nlora = {{ {table} }}\n')


def test_a_lora_directory_with_several_files_needs_their_name(tmp_path: Path) -> None:
    directory = lora_dir(tmp_path, "fast-8steps.safetensors", "fast-4steps.safetensors")
    # From a models file: the entry, the files and the key to set, in one line.
    with pytest.raises(ModelsFileError) as info:
        load_models_file(models_with_lora(tmp_path, str(directory)))
    said = str(info.value)
    assert "models.fast.lora" in said and "Value error" not in said and "\n" not in said
    assert "(fast-4steps.safetensors, fast-8steps.safetensors)" in said
    assert "weight_name" in said
    # From the command line: the same sentence, naming the flag.
    with pytest.raises(ModelsFileError, match="several weight files") as info:
        Settings(model="demo", lora=str(directory), lora_steps=8).model_specs()
    assert "--lora-weight-name" in str(info.value)
    # Named, it is taken.
    [spec] = load_models_file(models_with_lora(tmp_path, str(directory), "fast-8steps.safetensors"))
    assert spec.lora is not None and spec.lora.weight_name == "fast-8steps.safetensors"


@pytest.mark.parametrize(
    "names",
    [
        ["only.safetensors"],
        # What diffusers picks without hesitation: the standard name, and no
        # scheduler, optimizer or checkpoint files.
        ["pytorch_lora_weights.safetensors", "other.safetensors"],
        ["lora.safetensors", "optimizer.safetensors", "checkpoint-500.safetensors", "x.json"],
        [],
    ],
)
def test_an_unambiguous_lora_directory_needs_no_name(tmp_path: Path, names: list[str]) -> None:
    directory = lora_dir(tmp_path, *names)
    [spec] = load_models_file(models_with_lora(tmp_path, str(directory)))
    assert spec.lora == LoraSpec(source=str(directory))


def test_a_named_lora_file_must_be_in_its_directory(tmp_path: Path) -> None:
    directory = lora_dir(tmp_path, "a.safetensors", "b.safetensors")
    with pytest.raises(ModelsFileError) as info:
        load_models_file(models_with_lora(tmp_path, str(directory), "c.safetensors"))
    assert "has no file 'c.safetensors' (it holds a.safetensors, b.safetensors)" in str(info.value)


def test_a_lora_file_path_works_as_before(tmp_path: Path) -> None:
    directory = lora_dir(tmp_path, "a.safetensors", "b.safetensors")
    path = str(directory / "a.safetensors")
    [spec] = Settings(model="demo", lora=path).model_specs()
    assert spec.lora == LoraSpec(source=path)
    [spec] = load_models_file(models_with_lora(tmp_path, path, "a.safetensors"))
    assert spec.lora == LoraSpec(source=path, weight_name="a.safetensors")
    with pytest.raises(ModelsFileError, match="is a file, so it names its weights already"):
        load_models_file(models_with_lora(tmp_path, path, "b.safetensors"))


@pytest.mark.parametrize("weight_name", ["/abs/lora.safetensors", "../lora.safetensors", " "])
def test_a_lora_file_name_stays_inside_its_source(tmp_path: Path, weight_name: str) -> None:
    with pytest.raises(ModelsFileError, match="must be a path inside"):
        load_models_file(models_with_lora(tmp_path, "/loras/fast", weight_name))


def test_a_lora_path_missing_here_is_left_to_the_worker(tmp_path: Path) -> None:
    # An API replica has no weights; the worker that loads them reports a missing path.
    [spec] = load_models_file(models_with_lora(tmp_path, "/loras/absent", "a.safetensors"))
    assert spec.lora == LoraSpec(source="/loras/absent", weight_name="a.safetensors")


def test_a_hugging_face_lora_needs_its_file_named(tmp_path: Path, hub_cache: HubCache) -> None:
    # diffusers cannot choose offline, and online takes the first of several.
    with pytest.raises(ModelsFileError) as info:
        load_models_file(models_with_lora(tmp_path, "lightx2v/Qwen-Image-Lightning"))
    said = str(info.value)
    assert "is a Hugging Face repository: name the file to load with weight_name" in said
    assert "local cache" not in said
    # What the cache holds is offered.
    hub_cache("lightx2v/Qwen-Image-Lightning", {LIGHTNING_8: "", LIGHTNING_4: "", "README.md": ""})
    with pytest.raises(ModelsFileError) as info:
        Settings(model="demo", lora="lightx2v/Qwen-Image-Lightning").model_specs()
    assert f"(in the local cache: {LIGHTNING_4}, {LIGHTNING_8})" in str(info.value)
    [spec] = Settings(
        model="demo", lora="lightx2v/Qwen-Image-Lightning", lora_weight_name=LIGHTNING_8
    ).model_specs()
    assert spec.lora == LoraSpec(source="lightx2v/Qwen-Image-Lightning", weight_name=LIGHTNING_8)


# -- --family auto ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checkpoint", "family"),
    [
        ("Qwen/Qwen-Image-Edit", "edit"),
        ("Qwen/Qwen-Image-Edit-2509", "edit-plus"),
        ("Qwen/Qwen-Image-Edit-2511", "edit-plus"),
        ("someone/qwen-image-edit", "edit"),
        ("someone/Qwen-Image-Edit-Finetune", "edit-plus"),
        ("/models/Qwen-Image-Edit", "edit"),  # not on this host: by name
        ("/models/Qwen-Image-Edit-2509/", "edit-plus"),
    ],
)
def test_auto_family_goes_by_name_when_no_model_index_is_here(
    hub_cache: HubCache, checkpoint: str, family: str
) -> None:
    [spec] = Settings(model=checkpoint).model_specs()
    assert spec.family == family
    assert spec.max_images == (1 if family == "edit" else 3)
    assert spec.steps == (50 if family == "edit" else 40)


@pytest.mark.parametrize(
    ("checkpoint", "class_name", "family"),
    [
        ("Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", "edit"),
        # The cached index wins over the name, both ways.
        ("someone/Qwen-Image-Edit", "QwenImageEditPlusPipeline", "edit-plus"),
        ("someone/my-retouch-model", "QwenImageEditPipeline", "edit"),
        # Not a Qwen edit pipeline: the name, then edit-plus (the worker refuses it by class).
        ("someone/Some-Edit", "FluxPipeline", "edit"),
        ("someone/other", "FluxPipeline", "edit-plus"),
    ],
)
def test_auto_family_reads_a_cached_hub_model_index(
    hub_cache: HubCache, checkpoint: str, class_name: str, family: str
) -> None:
    hub_cache(checkpoint, {"model_index.json": json.dumps({"_class_name": class_name})})
    assert model_shortcut("qwen-image-edit", checkpoint).family == family


def test_auto_family_survives_an_unreadable_index(tmp_path: Path, hub_cache: HubCache) -> None:
    hub_cache("someone/broken", {"model_index.json": "{not json"})
    hub_cache("someone/listed", {"model_index.json": "[1, 2]"})
    assert model_shortcut("x", "someone/broken").family == "edit-plus"
    assert model_shortcut("x", "someone/listed").family == "edit-plus"
    (tmp_path / "model_index.json").write_text("{not json")
    assert model_shortcut("x", str(tmp_path)).family == "edit-plus"


def test_auto_family_follows_the_hf_hub_cache_variable(tmp_path: Path) -> None:
    """Where the cache is comes from HF_HUB_CACHE, read as huggingface_hub reads it."""
    _cache_repo(
        tmp_path,
        "someone/classic",
        {"model_index.json": json.dumps({"_class_name": "QwenImageEditPipeline"})},
    )
    code = (
        "from retouch.settings import Settings\n"
        "print(Settings(model='someone/classic').model_specs()[0].family)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == "edit"


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


def test_names_prices_and_limits_at_their_edges_are_accepted(tmp_path: Path) -> None:
    text = (
        "[models.'team/edit:v2.1']\ncheckpoint = 'a/b'\nprice = 100000000000\n"
        "[models.free]\ncheckpoint = 'a/b'\nprice = 0\nfamily = 'edit'\nmax_images = 1\n"
        "[models.cheap]\ncheckpoint = 'a/b'\nprice = 0.001\n"
    )
    specs = load_models_file(write(tmp_path, text))
    assert [(spec.name, spec.price) for spec in specs] == [
        ("team/edit:v2.1", 1e11),
        ("free", 0.0),
        ("cheap", 0.001),
    ]
