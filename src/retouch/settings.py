"""One typed settings object, built at the entry point and passed down.

Every field can be set by a `RETOUCH_<FIELD>` environment variable and most by
a CLI flag of the same name; nothing here is read at import time.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from retouch.accounts import DEFAULT_CREDITS, MAX_CREDITS, GroupLimits, Limits
from retouch.api.schemas import url_problem
from retouch.models import (
    DEFAULT_MODELS_FILE,
    MODEL_NAME,
    LoraSpec,
    ModelSpec,
    Price,
    check_lora,
    load_models_file,
    model_shortcut,
)

DEFAULT_MODEL_NAME = "qwen-image-edit"
MIN_SECRET_KEY_LENGTH = 32

# Settings that describe the one model served without --models-file (--model,
# or the built-in model); a models file sets these per model instead.
ONE_MODEL_SETTINGS = (
    "model_name", "family", "steps", "true_cfg_scale", "price",
    "lora", "lora_weight", "lora_steps", "lora_true_cfg_scale", "lora_weight_name",
)  # fmt: skip
# Settings that describe the --lora.
LORA_SETTINGS = ("lora_weight", "lora_steps", "lora_true_cfg_scale", "lora_weight_name")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETOUCH_", extra="forbid")

    # Where everything lives in the embedded default.
    data_dir: Path = Field(default=Path("retouch-data"), description="Data directory.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in the data directory."
    )
    db_pool_size: int = Field(
        default=10,
        ge=1,
        le=200,
        description="PostgreSQL connections each process keeps open; at busy moments it "
        "opens up to 48 more and closes them again (mind the server's max_connections).",
    )

    # HTTP server.
    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    public_url: str | None = Field(
        default=None,
        description="Base URL of result links (set it behind a proxy or when serving beyond "
        "loopback); default: the URL a request came in on (for a callback: the URL its task "
        "was created through).",
    )
    max_request_bytes: int = Field(
        default=42 << 20,
        ge=1024,
        description="Largest request body (room for three 10 MB images as data: URIs).",
    )

    # The models and the engine.
    model: str | None = Field(
        default=None,
        description="Serve one model: `demo` (tiny, random weights), a Hugging Face id or a "
        "local checkpoint directory; default: the built-in models file (Qwen-Image-Edit-2511).",
    )
    models_file: Path | None = Field(
        default=None,
        description="TOML file mapping API model names to checkpoints, each with its own "
        "settings (so --model-name, --family, --steps, --true-cfg-scale, --price and --lora* "
        "are refused with it).",
    )
    model_name: str = Field(
        default=DEFAULT_MODEL_NAME,
        pattern=f"^{MODEL_NAME.pattern}$",
        description="API name of the model that --model (or the built-in default) serves.",
    )
    family: Literal["auto", "edit", "edit-plus"] = Field(
        default="auto",
        description="Pipeline family of --model: `edit` (QwenImageEditPipeline, one image), "
        "`edit-plus` (QwenImageEditPlusPipeline, 1-3 images) or `auto`: the pipeline class in "
        "the checkpoint's model_index.json (a local directory's, or a Hugging Face id's in the "
        "local cache), else by name (`…/Qwen-Image-Edit`: edit), else edit-plus.",
    )
    steps: int | None = Field(
        default=None,
        ge=1,
        le=200,
        description="Denoising steps of --model (or the built-in default); default: its own.",
    )
    true_cfg_scale: float | None = Field(
        default=None,
        ge=1.0,
        le=20.0,
        description="True CFG scale of --model (or the built-in default); default: its own.",
    )
    device: str | None = Field(
        default=None, description="Torch device, e.g. `cuda:0`; default: cuda if present, else cpu."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights dtype; `auto`: bfloat16 on CUDA, float32 on CPU."
    )
    offload: Literal["none", "model", "sequential"] = Field(
        default="none",
        description="CPU offload for small GPUs: `model` (whole components, small slowdown) or "
        "`sequential` (layer by layer, least memory, slow).",
    )
    compile: bool = Field(
        default=False,
        description="Compile the transformer's repeated block (paid by a warm-up at start-up).",
    )
    quantize: Literal["none", "fp8"] = Field(
        default="none",
        description="`fp8`: torchao float8 dynamic quantization (per row) of the transformer; "
        "needs a CUDA GPU of compute capability 8.9+; use with --compile.",
    )
    quantize_text_encoder: bool = Field(
        default=False, description="Also quantize the text encoder (needs --quantize fp8)."
    )
    lora: str | None = Field(
        default=None,
        description="LoRA (file, directory or Hugging Face id) fused into --model (or the "
        "built-in default).",
    )
    lora_weight: float = Field(default=1.0, gt=0, le=4, description="Scale of the --lora.")
    lora_steps: int | None = Field(
        default=None, ge=1, le=200, description="Steps the --lora was trained for (e.g. 4 or 8)."
    )
    lora_true_cfg_scale: float | None = Field(
        default=None, ge=1.0, le=20.0, description="True CFG scale for the --lora (e.g. 1.0)."
    )
    lora_weight_name: str | None = Field(
        default=None,
        description="The file to load from a --lora directory or Hugging Face repository, "
        "e.g. `Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors`; "
        "needed for a Hugging Face id, and for a directory holding several .safetensors files.",
    )
    price: Price | None = Field(
        default=None,
        description="Credits per image produced by --model (or the built-in default); default 1.",
    )
    worker: bool = Field(default=True, description="Run the in-process worker.")
    worker_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="`retouch worker`: serve /healthz, /readyz and /metrics on this port.",
    )
    shutdown_grace_seconds: float = Field(
        default=60.0,
        ge=0,
        description="On SIGTERM a worker claims nothing more and lets its running task "
        "finish for up to this long, then hands it back to the queue.",
    )

    # Tasks and results.
    storage: str | None = Field(
        default=None,
        description="Where results go: a local directory, or `s3://BUCKET/PREFIX` "
        "(credentials from the usual AWS environment and files); default: DATA_DIR/results.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store (SeaweedFS, MinIO, R2); default: AWS S3.",
    )
    s3_region: str | None = Field(
        default=None, description="S3 region; default: from the AWS configuration."
    )
    result_ttl_seconds: int = Field(
        default=24 * 3600, ge=1, description="How long result links (and files) live."
    )
    janitor_interval_seconds: float = Field(
        default=300.0, gt=0, description="How often expired result files are deleted."
    )
    lease_seconds: float = Field(
        default=60.0,
        gt=1,
        description="Lease of a running task, renewed every third of it; a task whose "
        "worker stays silent for 1.5 times this long returns to the queue.",
    )
    max_attempts: int = Field(
        default=2, ge=1, le=10, description="Runs of a task whose worker died before it fails."
    )
    poll_interval_seconds: float = Field(
        default=0.2, gt=0, description="How often an idle worker looks for work."
    )
    secret_key: str | None = Field(
        default=None,
        description="Signs result links, uploads and callbacks (environment only; at least "
        "32 characters); default: generated once into the data directory.",
    )

    # Accounts, credits and limits.
    admin_token: str | None = Field(
        default=None,
        description="Bearer token of the admin API under /admin/v1 (environment only); "
        "unset: the admin API is off.",
    )
    default_credits: float = Field(
        default=DEFAULT_CREDITS,
        ge=0,
        le=MAX_CREDITS,
        description="Credits a new account starts with.",
    )
    requests_per_minute: int = Field(
        default=60, ge=1, description="Task creations per minute of a `default` account."
    )
    requests_per_minute_vip: int = Field(
        default=600, ge=1, description="Task creations per minute of a `vip` account."
    )
    max_concurrent_tasks: int = Field(
        default=10, ge=1, description="Unfinished tasks a `default` account may have."
    )
    max_concurrent_tasks_vip: int = Field(
        default=50, ge=1, description="Unfinished tasks a `vip` account may have."
    )
    max_queued_tasks: int = Field(
        default=1000, ge=1, description="Unfinished tasks server-wide; beyond it, 503."
    )
    vip_priority_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Head start of vip tasks in the queue; a default task waits at most "
        "this long behind vip tasks submitted after it.",
    )

    # Fetching input images.
    allow_private_networks: bool = Field(
        default=False,
        description="Let image URLs reach loopback and private addresses (intranets, tests).",
    )
    fetch_ports: str = Field(
        default="80,443",
        pattern=r"^(any|\d{1,5}(,\d{1,5})*)$",
        description="Ports image URLs may use: comma-separated, or `any`.",
    )
    fetch_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Time allowed to download one input image."
    )
    max_image_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Largest input image download."
    )

    # Callbacks.
    callback_timeout_seconds: float = Field(
        default=10.0, gt=0, le=60, description="Time a callback receiver has to answer."
    )
    callback_retry_delays: str = Field(
        default="1,2,4",
        pattern=r"^(\d+(\.\d+)?(,\d+(\.\d+)?)*)?$",
        description="Seconds before each retry of a failed callback (empty: no retries).",
    )
    callback_ports: str = Field(
        default="443",
        pattern=r"^(any|\d{1,5}(,\d{1,5})*)$",
        description="Ports callback URLs may use: comma-separated, or `any`.",
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("fetch_ports", "callback_ports")
    @classmethod
    def _port_list(cls, value: str) -> str:
        if value != "any":
            for port in value.split(","):
                if not 1 <= int(port) <= 65535:
                    raise ValueError(f"{port} is no TCP port (1-65535)")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None:
            problem = url_problem(value, ("http", "https"))
            if problem:
                raise ValueError(f"{problem}; e.g. https://retouch.example.com")
            parts = urlsplit(value)
            if parts.query or parts.fragment:
                raise ValueError(f"{value!r}: a base URL takes no query or fragment")
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: str | None) -> str | None:
        # It signs result links, uploads and callbacks: as strong as the one generated.
        if value is not None and len(value) < MIN_SECRET_KEY_LENGTH:
            raise ValueError(
                f"too short ({len(value)} characters; at least {MIN_SECRET_KEY_LENGTH}): "
                "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return value

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("s3://"):
            bucket = value.removeprefix("s3://").partition("/")[0]
            if not bucket:
                raise ValueError(f"{value!r} names no bucket: use s3://BUCKET[/PREFIX]")
        return value

    @model_validator(mode="after")
    def _settings_fit_together(self) -> Self:
        """A setting that would do nothing is refused, never silently ignored."""
        problems = []
        if self.model and self.models_file:
            problems.append("give either --model or --models-file, not both")
        elif self.models_file:
            ignored = [name for name in ONE_MODEL_SETTINGS if self._is_set(name)]
            if ignored:
                one = len(ignored) == 1
                problems.append(
                    f"{_flags(ignored)} the one model of --model (or of the built-in "
                    f"default), so {'it does' if one else 'they do'} nothing with "
                    f"--models-file: set {'it' if one else 'them'} per model in "
                    f"{self.models_file} instead ([models.NAME] keys and its lora table)"
                )
        else:
            if not self.model and self.family != "auto":
                problems.append(
                    "--family says which pipeline the checkpoint of --model needs, and there is "
                    "no --model (the built-in model's family is in its models file): give "
                    "--model too or drop --family"
                )
            orphans = [name for name in LORA_SETTINGS if self._is_set(name)]
            if orphans and not self.lora:
                them = "it" if len(orphans) == 1 else "them"
                problems.append(f"{_flags(orphans)} the --lora: add --lora or drop {them}")
        if self.quantize_text_encoder and self.quantize == "none":
            problems.append(
                "--quantize-text-encoder needs --quantize fp8 (it quantizes the text encoder "
                "too, besides the transformer)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _is_set(self, name: str) -> bool:
        """Set to something other than its default (by a flag or a variable)."""
        return bool(getattr(self, name) != type(self).model_fields[name].default)

    def model_specs(self) -> list[ModelSpec]:
        """The models this server serves: --models-file, else --model, else the
        built-in models file, whose one model takes the --model settings (--steps,
        --lora…) as --model would."""
        if self.models_file:
            return load_models_file(self.models_file)
        lora = None
        if self.lora:
            lora = LoraSpec(
                source=self.lora,
                weight=self.lora_weight,
                steps=self.lora_steps,
                true_cfg_scale=self.lora_true_cfg_scale,
                weight_name=self.lora_weight_name,
            )
            check_lora(lora)
        if self.model:
            return [
                model_shortcut(
                    self.model_name,
                    self.model,
                    family=self.family,
                    steps=self.steps,
                    true_cfg_scale=self.true_cfg_scale,
                    price=self.price,
                    lora=lora,
                )
            ]
        (default,) = load_models_file(DEFAULT_MODELS_FILE)  # the built-in file has one model
        return [
            replace(
                default,
                name=self.model_name,
                steps=self.steps or default.steps,
                true_cfg_scale=self.true_cfg_scale or default.true_cfg_scale,
                price=default.price if self.price is None else self.price,
                lora=lora,
            )
        ]

    @property
    def limits(self) -> Limits:
        return Limits(
            default=GroupLimits(self.requests_per_minute, self.max_concurrent_tasks),
            vip=GroupLimits(self.requests_per_minute_vip, self.max_concurrent_tasks_vip),
            max_queued_tasks=self.max_queued_tasks,
            vip_priority_seconds=self.vip_priority_seconds,
        )

    @property
    def allowed_fetch_ports(self) -> frozenset[int] | None:
        return _ports(self.fetch_ports)

    @property
    def allowed_callback_ports(self) -> frozenset[int] | None:
        return _ports(self.callback_ports)

    @property
    def callback_retry_schedule(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.callback_retry_delays.split(",") if s)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'retouch.db').resolve()}"

    @property
    def results_dir(self) -> Path:
        if self.storage and not self.storage.startswith("s3://"):
            return Path(self.storage).expanduser()
        return self.data_dir / "results"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def signing_key(self) -> bytes:
        """The secret that signs result links, created once per data directory."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # Written aside, then linked into place: readers never see it half-written.
            staging = path.with_name(f".secret-{secrets.token_hex(6)}")
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
            try:
                os.link(staging, path)
            except FileExistsError:
                pass  # another process created it first; use theirs
            finally:
                staging.unlink()
        return path.read_text().strip().encode()


def _flags(names: list[str]) -> str:
    """`--a describes` or `--a, --b describe`."""
    flags = ", ".join("--" + name.replace("_", "-") for name in names)
    return f"{flags} {'describes' if len(names) == 1 else 'describe'}"


def _ports(spec: str) -> frozenset[int] | None:
    """`any`, or a comma-separated list of ports."""
    if spec == "any":
        return None
    return frozenset(int(port) for port in spec.split(","))
