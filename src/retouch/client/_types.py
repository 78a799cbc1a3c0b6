"""What the client returns: the task detail and an upload, parsed leniently (fields a
server adds are kept in `raw`, fields it leaves out get neutral defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from retouch.client._errors import RetouchError

TaskStatus = Literal["pending", "processing", "completed", "failed", "cancelled"]
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


def _int(value: Any, default: int | None = None) -> int | None:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    return default


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class TaskInfo:
    can_cancel: bool
    estimated_time: int | None
    queue_position: int | None = None  # shown when a server reports it
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskInfo:
        return cls(
            can_cancel=bool(data.get("can_cancel", False)),
            estimated_time=_int(data.get("estimated_time")),
            queue_position=_int(data.get("queue_position")),
            raw=data,
        )


@dataclass
class Usage:
    billing_rule: str
    credits_reserved: float
    user_group: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        reserved = data.get("credits_reserved")
        return cls(
            billing_rule=_str(data.get("billing_rule")) or "per_call",
            credits_reserved=float(reserved) if isinstance(reserved, int | float) else 0.0,
            user_group=_str(data.get("user_group")) or "default",
            raw=data,
        )


@dataclass
class TaskError:
    """Why a failed task failed (extension)."""

    code: int | None
    message: str
    type: str | None
    param: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskError:
        return cls(
            code=_int(data.get("code")),
            message=_str(data.get("message")) or "the task failed",
            type=_str(data.get("type")),
            param=_str(data.get("param")),
        )

    def __str__(self) -> str:
        return self.message + (f" (param: {self.param})" if self.param else "")


@dataclass
class Task:
    """The task detail (`GET /v1/tasks/{id}`); a create answer has no results yet."""

    id: str
    status: str
    progress: int
    created: int
    model: str
    results: list[str] | None = None
    error: TaskError | None = None
    usage: Usage | None = None
    task_info: TaskInfo | None = None
    callback: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: Any) -> Task:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise RetouchError(f"the server answered something that is not a task: {data!r:.200}")
        results = data.get("results")
        error = data.get("error")
        usage = data.get("usage")
        info = data.get("task_info")
        callback = data.get("callback")
        return cls(
            id=data["id"],
            status=_str(data.get("status")) or "pending",
            progress=_int(data.get("progress"), 0) or 0,
            created=_int(data.get("created"), 0) or 0,
            model=_str(data.get("model")) or "",
            results=[r for r in results if isinstance(r, str)]
            if isinstance(results, list)
            else None,
            error=TaskError.from_dict(error) if isinstance(error, dict) else None,
            usage=Usage.from_dict(usage) if isinstance(usage, dict) else None,
            task_info=TaskInfo.from_dict(info) if isinstance(info, dict) else None,
            callback=callback if isinstance(callback, dict) else None,
            raw=data,
        )

    @property
    def done(self) -> bool:
        """Completed, failed or cancelled: the status will not change any more."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "completed"


@dataclass
class Upload:
    """An uploaded input image (`POST /v1/uploads`, extension): `url` goes into
    `image_urls` on the same server until `expires_at`."""

    id: str
    url: str
    expires_at: int | None
    bytes: int | None
    content_type: str | None
    width: int | None
    height: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: Any) -> Upload:
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            raise RetouchError(
                f"the server answered something that is not an upload: {data!r:.200}"
            )
        return cls(
            id=_str(data.get("id")) or "",
            url=data["url"],
            expires_at=_int(data.get("expires_at")),
            bytes=_int(data.get("bytes")),
            content_type=_str(data.get("content_type")),
            width=_int(data.get("width")),
            height=_int(data.get("height")),
            raw=data,
        )
