"""A Python client for Retouch and any server of the qwen-image-edit task API.

```python
from retouch.client import Client

with Client("http://127.0.0.1:8000", "rt_...") as client:   # or RETOUCH_BASE_URL / RETOUCH_API_KEY
    task = client.edit("put a red scarf on the cat", images=["cat.jpg"])
    task = client.wait(task, on_progress=lambda t: print(t.status, t.progress))
    if task.succeeded:
        client.download(task, "out/")
```

`AsyncClient` is the same with `await`. Errors are `RetouchError` subclasses, one per
error `type` of the contract (`BadRequestError`, `RateLimitError`, …).
"""

from __future__ import annotations

from retouch.client._async import AsyncClient, AsyncTasks
from retouch.client._common import DEFAULT_MODEL, ImageInput, ProgressCallback, RetryCallback
from retouch.client._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    InsufficientQuotaError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    RetouchError,
    ServiceUnavailableError,
    UpstreamError,
    WaitTimeoutError,
)
from retouch.client._sync import Client, Tasks
from retouch.client._types import (
    TERMINAL_STATUSES,
    Task,
    TaskError,
    TaskInfo,
    TaskStatus,
    Upload,
    Usage,
)

__all__ = [
    "DEFAULT_MODEL",
    "TERMINAL_STATUSES",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncTasks",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConfigurationError",
    "ConflictError",
    "ImageInput",
    "InsufficientQuotaError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProgressCallback",
    "RateLimitError",
    "RequestTooLargeError",
    "RetouchError",
    "RetryCallback",
    "ServiceUnavailableError",
    "Task",
    "TaskError",
    "TaskInfo",
    "TaskStatus",
    "Tasks",
    "Upload",
    "UpstreamError",
    "Usage",
    "WaitTimeoutError",
]
