"""What the sync and the async client share: configuration, request bodies, input
images, the server-sent events parser, retry and polling delays, result names."""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, Union, cast
from urllib.parse import quote, urlsplit

import httpx

from retouch import __version__
from retouch.client._errors import ConfigurationError, RetouchError
from retouch.client._types import Task

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

DEFAULT_MODEL = "qwen-image-edit"
BASE_URL_ENV = "RETOUCH_BASE_URL"
API_KEY_ENV = "RETOUCH_API_KEY"
DEFAULT_TIMEOUT = 60.0
# The events stream sends a comment every 15 s; a read waiting much longer means it broke.
EVENTS_READ_TIMEOUT = 45.0
POLL_FIRST = 0.5
POLL_MAX = 5.0
POLL_FACTOR = 1.5
MAX_EVENT_STREAM_FAILURES = 3
USER_AGENT = f"retouch-client/{__version__}"

# An input image: an http(s) or data: URL (sent as is), a local file, bytes, or a PIL image.
ImageInput: TypeAlias = Union[str, "os.PathLike[str]", bytes, "PILImage"]
ProgressCallback: TypeAlias = Callable[[Task], object]
# Called before each retry with the error and the seconds about to be waited.
RetryCallback: TypeAlias = Callable[[RetouchError, float], object]

_SIGNATURES: tuple[tuple[bytes, int, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png", "png"),
    (b"\xff\xd8\xff", 0, "image/jpeg", "jpg"),
    (b"BM", 0, "image/bmp", "bmp"),
    (b"II*\x00", 0, "image/tiff", "tiff"),
    (b"MM\x00*", 0, "image/tiff", "tiff"),
    (b"WEBP", 8, "image/webp", "webp"),
    (b"GIF8", 0, "image/gif", "gif"),
)


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str


def resolve_config(base_url: str | None, api_key: str | None) -> Config:
    """Arguments win over `RETOUCH_BASE_URL` / `RETOUCH_API_KEY`; both are required."""
    url = (base_url or os.environ.get(BASE_URL_ENV) or "").strip()
    key = (api_key or os.environ.get(API_KEY_ENV) or "").strip()
    if not url:
        raise ConfigurationError(
            f"no server given: pass base_url= (e.g. http://127.0.0.1:8000) or set {BASE_URL_ENV}"
        )
    if not key:
        raise ConfigurationError(
            f"no API key given: pass api_key= or set {API_KEY_ENV} "
            "(`retouch keys create --name NAME` makes one)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(f"the base URL must be an http(s) URL, not {url!r}")
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return Config(url, key)


def make_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout if timeout is not None else DEFAULT_TIMEOUT)


def events_timeout(base: httpx.Timeout, read: float) -> httpx.Timeout:
    return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)


def task_path(task_id: str, *rest: str) -> str:
    if not task_id:
        raise ValueError("a task id is required")
    return "/".join(["/v1/tasks", quote(task_id, safe=""), *rest])


def task_id_of(task: Task | str) -> str:
    return task.id if isinstance(task, Task) else task


def edit_body(
    *,
    prompt: str,
    image_urls: list[str],
    model: str,
    n: int | None,
    seed: int | None,
    negative_prompt: str | None,
    size: str | tuple[int, int] | None,
    callback_url: str | None,
) -> dict[str, Any]:
    """The create request: the seed's fields, and the extensions only when given."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "image_urls": image_urls}
    if callback_url is not None:
        body["callback_url"] = callback_url
    if n is not None:
        body["n"] = n
    if seed is not None:
        body["seed"] = seed
    if negative_prompt is not None:
        body["negative_prompt"] = negative_prompt
    if size is not None:
        body["size"] = size if isinstance(size, str) else f"{size[0]}x{size[1]}"
    return body


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or several."""
    if isinstance(images, str | bytes | bytearray | os.PathLike) or is_pil_image(images):
        return [cast("ImageInput", images)]
    return list(cast("Sequence[ImageInput]", images))


def is_pil_image(value: object) -> bool:
    """Without importing PIL: an object can only be a PIL image if PIL is loaded."""
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


@dataclass(frozen=True)
class ImagePayload:
    """An input image to upload (or to send as a `data:` URI)."""

    data: bytes
    filename: str
    content_type: str

    def data_uri(self) -> str:
        encoded = base64.b64encode(self.data).decode("ascii")
        return f"data:{self.content_type};base64,{encoded}"


def is_url(value: str) -> bool:
    """An http(s) URL or a `data:` URI: sent to the server as is."""
    return value[:8].lower().startswith(("http://", "https://", "data:"))


def image_payload(image: ImageInput, index: int) -> str | ImagePayload:
    """A URL to send as is, or the bytes to upload. Reads files and encodes PIL images
    (blocking: the async client calls this in a thread)."""
    if isinstance(image, str) and is_url(image):
        return image
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
        content_type, ext = sniff(data)
        return ImagePayload(data, f"image-{index}.{ext}", content_type)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(image)!r} is neither an http(s) URL nor an existing file"
            )
        data = path.read_bytes()
        content_type, _ext = sniff(data)
        return ImagePayload(data, path.name, content_type)
    if is_pil_image(image):
        return ImagePayload(_encode_pil(image), f"image-{index}.png", "image/png")
    raise TypeError(
        "an image must be an http(s) URL, a file path, bytes or a PIL image, "
        f"not {type(image).__name__}"
    )


def _encode_pil(image: Any) -> bytes:
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sniff(data: bytes) -> tuple[str, str]:
    """Content type and file extension from the first bytes (the server checks again)."""
    for magic, offset, content_type, ext in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return content_type, ext
    return "application/octet-stream", "bin"


# -- server-sent events -------------------------------------------------------


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str


class EventParser:
    """The `text/event-stream` format, one line at a time (line endings removed)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # a comment: the keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None  # `id` and `retry` are not needed here


def task_from_event(event: ServerSentEvent) -> Task | None:
    import json

    if event.event not in ("task", "message") or not event.data:
        return None
    try:
        return Task.from_dict(json.loads(event.data))
    except (ValueError, RetouchError):
        return None


def is_event_stream(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("text/event-stream")


# -- retries, polling, progress -------------------------------------------------


RETRY_STATUSES = frozenset({429, 502, 503})


def backoff(attempt: int) -> float:
    """Wait before retry `attempt` (0-based) when the server named none."""
    return float(min(8.0, 0.5 * 2**attempt))


def next_poll_delay(delay: float) -> float:
    return min(POLL_MAX, delay * POLL_FACTOR)


class ProgressTracker:
    """Calls `on_progress` once for each new (status, progress)."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.last: Task | None = None
        self.seen = 0  # states received, changed or not

    def see(self, task: Task) -> bool:
        self.seen += 1
        changed = self.last is None or (self.last.status, self.last.progress) != (
            task.status,
            task.progress,
        )
        self.last = task
        if changed and self.callback is not None:
            self.callback(task)
        return changed


def result_names(task: Task, stem: str | None = None, suffix: str | None = None) -> list[str]:
    """File names of a task's results: STEM.png for one, STEM-1.png, STEM-2.png… for
    several; STEM defaults to the task id, the suffix to the link's own."""
    results = task.results or []
    base = stem or task.id
    names = []
    for index, url in enumerate(results, start=1):
        ext = suffix if suffix is not None else (Path(urlsplit(url).path).suffix or ".png")
        names.append(f"{base}{ext}" if len(results) == 1 else f"{base}-{index}{ext}")
    return names


def timeout_message(task_id: str, timeout: float, last: Task | None) -> str:
    state = f"still {last.status} ({last.progress}%)" if last is not None else "not finished"
    return f"task {task_id} is {state} after {timeout:g} s; it goes on on the server"


def check_downloadable(task: Task) -> list[str]:
    if not task.succeeded:
        raise RetouchError(f"task {task.id} is {task.status}: there are no results to download")
    if not task.results:
        raise RetouchError(f"task {task.id} is completed but lists no results")
    return task.results
