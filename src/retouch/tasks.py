"""The task: its states, its identity and the parameters of one edit."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

_ID_ALPHABET = string.ascii_lowercase + string.digits
MAX_SEED = 2**31 - 1  # 2147483647, the provider's documented upper bound


class TaskStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
MAX_TASK_ID_LENGTH = 64  # the tasks.id column


def new_task_id(created: int) -> str:
    """`task-unified-<created unix seconds>-<8 of [a-z0-9]>`, as the seed shows."""
    suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    return f"task-unified-{created}-{suffix}"


@dataclass(frozen=True)
class EditParams:
    """What the client asked for, after validation. Stored with the task."""

    prompt: str
    image_urls: list[str]
    callback_url: str | None = None
    n: int = 1
    seed: int | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "image_urls": list(self.image_urls),
            "callback_url": self.callback_url,
            "n": self.n,
            "seed": self.seed,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EditParams:
        return cls(
            prompt=data["prompt"],
            image_urls=list(data["image_urls"]),
            callback_url=data.get("callback_url"),
            n=int(data.get("n") or 1),
            seed=data.get("seed"),
            negative_prompt=data.get("negative_prompt"),
            width=data.get("width"),
            height=data.get("height"),
        )


@dataclass(frozen=True)
class TaskError:
    """Why a task failed: the seed's error fields, shown on the task detail."""

    code: int
    type: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class Task:
    id: str
    key_id: str
    account_id: str
    model: str
    status: TaskStatus
    progress: int
    params: EditParams
    created_at: datetime
    user_group: str
    credits_reserved: float
    attempts: int = 0
    cancel_requested: bool = False
    started_at: datetime | None = None
    run_started_at: datetime | None = None  # its current run on the engine, if begun
    finished_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    error: TaskError | None = None
    result_keys: list[str] = field(default_factory=list)
    results_expire_at: datetime | None = None
    # Its place in the queue: `created_at`, earlier for vip tasks.
    priority_at: datetime | None = None
    # The address it was created through (for its callback's links), if it matters.
    base_url: str | None = None

    @property
    def created(self) -> int:
        return int(self.created_at.timestamp())

    @property
    def queue_order(self) -> tuple[datetime, str]:
        """Pending tasks are claimed in this order (vip ones with their head start)."""
        return (self.priority_at or self.created_at, self.id)

    @property
    def can_cancel(self) -> bool:
        return not self.status.is_terminal and not self.cancel_requested
