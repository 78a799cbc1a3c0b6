"""One typed settings object, built at the entry point and passed down.

Every field can be set by a `RETOUCH_<FIELD>` environment variable and most by
a CLI flag of the same name; nothing here is read at import time.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "qwen-image-edit"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETOUCH_", extra="forbid")

    # Where everything lives in the embedded default.
    data_dir: Path = Field(default=Path("retouch-data"), description="Data directory.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in the data directory."
    )

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = Field(
        default=None,
        description="Base URL used in result links; default: the URL the request came in on.",
    )
    max_request_bytes: int = Field(default=1 << 20, ge=1024, description="Largest request body.")

    # The model and the engine.
    model: str = Field(
        default="demo",
        description="`demo`, `fixture`, a Hugging Face id or a local checkpoint directory.",
    )
    model_name: str = Field(default=DEFAULT_MODEL_NAME, description="API name of the model.")
    family: Literal["auto", "edit", "edit-plus"] = "auto"
    steps: int | None = Field(default=None, ge=1, le=200, description="Denoising steps.")
    true_cfg_scale: float | None = Field(default=None, ge=1.0, le=20.0)
    device: str | None = Field(default=None, description="Torch device; default cuda if present.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    price: float = Field(default=1.0, ge=0, description="Credits per image produced.")
    worker: bool = Field(default=True, description="Run the in-process worker.")

    # Tasks and results.
    result_ttl_seconds: int = Field(default=24 * 3600, ge=1)
    janitor_interval_seconds: float = Field(default=300.0, gt=0)
    lease_seconds: float = Field(default=60.0, gt=1)
    max_attempts: int = Field(default=2, ge=1, le=10)
    poll_interval_seconds: float = Field(default=0.2, gt=0)
    secret_key: str | None = Field(
        default=None, description="Signs result links; default: generated in the data directory."
    )

    # Fetching input images.
    allow_private_networks: bool = False
    fetch_timeout_seconds: float = Field(default=30.0, gt=0)
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'retouch.db').resolve()}"

    @property
    def results_dir(self) -> Path:
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
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32))
        return path.read_text().strip().encode()
