"""The blocking client."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from retouch.client._common import (
    DEFAULT_MODEL,
    EVENTS_READ_TIMEOUT,
    MAX_EVENT_STREAM_FAILURES,
    POLL_FIRST,
    RETRY_STATUSES,
    USER_AGENT,
    EventParser,
    ImageInput,
    ImagePayload,
    ProgressCallback,
    ProgressTracker,
    RetryCallback,
    as_image_list,
    backoff,
    check_downloadable,
    edit_body,
    events_timeout,
    image_payload,
    is_event_stream,
    make_timeout,
    next_poll_delay,
    resolve_config,
    result_names,
    task_from_event,
    task_id_of,
    task_path,
    timeout_message,
)
from retouch.client._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    RetouchError,
    WaitTimeoutError,
    error_from_response,
)
from retouch.client._types import Task, Upload

MAX_POLL_FAILURES = 5


class _EventsUnsupported(Exception):
    """The server has no `GET /v1/tasks/{id}/events`."""


class Tasks:
    """`client.tasks`: one task by id."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def get(self, task_id: str) -> Task:
        """The task detail (`GET /v1/tasks/{id}`)."""
        return Task.from_dict(self._client._json("GET", task_path(task_id)))

    def cancel(self, task_id: str) -> Task:
        """Cancel (extension): a pending task at once, a running one within a step.
        A completed or failed task raises ConflictError."""
        return Task.from_dict(self._client._json("POST", task_path(task_id, "cancel")))

    def wait(
        self,
        task: Task | str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Task:
        """Same as `client.wait`."""
        return self._client.wait(task, timeout=timeout, on_progress=on_progress)


class Client:
    """A client of a Retouch (or any qwen-image-edit task API) server.

    `base_url` and `api_key` default to `RETOUCH_BASE_URL` and `RETOUCH_API_KEY`.
    `max_retries` (default 0) retries 429, 502 and 503 answers after the wait the
    server asks for (`Retry-After`, or its "retry after N seconds" hint; never longer
    than `max_retry_delay`) and connection failures with a growing pause; creates then
    carry a generated `Idempotency-Key`, so a retry never creates a task twice.
    `on_retry(error, seconds)` is called before each of those pauses.
    `events` and `uploads` say whether to use the server's task event stream and
    `POST /v1/uploads`: None (default) finds out on first use, False never uses them.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 0,
        max_retry_delay: float = 120.0,
        events: bool | None = None,
        uploads: bool | None = None,
        headers: Mapping[str, str] | None = None,
        on_retry: RetryCallback | None = None,
    ) -> None:
        config = resolve_config(base_url, api_key)
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.base_url = config.base_url
        self._api_key = config.api_key
        self.timeout = make_timeout(timeout)
        self.max_retries = max_retries
        self.max_retry_delay = max_retry_delay
        self.events = events
        self.uploads = uploads
        self.on_retry = on_retry
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=self.timeout,
            headers={"User-Agent": USER_AGENT, **(headers or {})},
        )
        self.tasks = Tasks(self)
        self._sleep = time.sleep  # tests may replace it

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    # -- the API ---------------------------------------------------------------

    def edit(
        self,
        prompt: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str = DEFAULT_MODEL,
        n: int | None = None,
        seed: int | None = None,
        negative_prompt: str | None = None,
        size: str | tuple[int, int] | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Create an edit task and return it (pending); `wait()` for the result.

        `images`: 1-3 of http(s) URLs (fetched by the server), local file paths, bytes
        or PIL images (uploaded, or sent as `data:` URIs where the server has no uploads).
        """
        urls = [self._image_url(image, i) for i, image in enumerate(as_image_list(images))]
        body = edit_body(
            prompt=prompt,
            image_urls=urls,
            model=model,
            n=n,
            seed=seed,
            negative_prompt=negative_prompt,
            size=size,
            callback_url=callback_url,
        )
        key = idempotency_key or (str(uuid.uuid4()) if self.max_retries else None)
        headers = {"Idempotency-Key": key} if key else None
        return Task.from_dict(
            self._json("POST", "/v1/images/generations", json=body, headers=headers)
        )

    def upload(self, image: ImageInput) -> Upload:
        """Upload one input image (`POST /v1/uploads`, extension); NotFoundError on a
        server without uploads."""
        payload = image_payload(image, 0)
        if isinstance(payload, str):
            raise ValueError("that image is a URL already: pass it to edit() as it is")
        return self._upload(payload)

    def wait(
        self,
        task: Task | str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Task:
        """Block until the task is completed, failed or cancelled and return it.

        Follows the server's event stream where it has one, else polls (every 0.5 s,
        backing off to 5 s while nothing changes). `on_progress(task)` is called for
        each new status or progress. WaitTimeoutError (a TimeoutError) after `timeout`
        seconds; the task goes on on the server.
        """
        task_id = task_id_of(task)
        tracker = ProgressTracker(on_progress)
        if isinstance(task, Task) and task.done:
            tracker.see(task)
            return task
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.events is not False:
            final = self._wait_events(task_id, timeout, deadline, tracker)
            if final is not None:
                return final
        return self._wait_polling(task_id, timeout, deadline, tracker)

    def download(
        self, task: Task | str, directory: str | Path = ".", *, stem: str | None = None
    ) -> list[Path]:
        """Save a completed task's results into `directory` (created if needed) as
        TASK_ID.png, or TASK_ID-1.png, TASK_ID-2.png… (`stem` replaces TASK_ID)."""
        if isinstance(task, str):
            task = self.tasks.get(task)
        urls = check_downloadable(task)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        names = result_names(task, stem)
        return [
            self.download_url(url, folder / name) for url, name in zip(urls, names, strict=True)
        ]

    def download_url(self, url: str, path: str | Path) -> Path:
        """Save one result link to `path`. Links are signed: no API key is sent."""
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        try:
            with self._http.stream("GET", url, follow_redirects=True) as response:
                if not response.is_success:
                    response.read()
                    raise error_from_response(response)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            partial.replace(target)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"downloading {url} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"downloading {url} failed: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return target

    def models(self) -> list[dict[str, Any]]:
        """`GET /v1/models` (extension): the models the key may use."""
        data = self._json("GET", "/v1/models").get("data")
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    def usage(self) -> dict[str, Any]:
        """`GET /v1/usage` (extension): credits, limits and task counts."""
        return self._json("GET", "/v1/usage")

    # -- internals ---------------------------------------------------------------

    def _auth(self, headers: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}", **(headers or {})}

    def _json(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        files: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        response = self._request(method, path, json=json, files=files, headers=headers)
        try:
            data = response.json()
        except ValueError:
            raise RetouchError(
                f"{method} {path}: the server answered {response.status_code} without JSON",
                status=response.status_code,
            ) from None
        if not isinstance(data, dict):
            raise RetouchError(f"{method} {path}: the server answered {data!r:.200}")
        return data

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        files: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        attempt = 0
        while True:
            error: RetouchError
            try:
                response = self._http.request(
                    method, path, json=json, files=files, headers=self._auth(headers)
                )
            except httpx.TimeoutException as exc:
                error = APITimeoutError(f"{method} {path} timed out: {exc}")
                error.__cause__ = exc
            except httpx.TransportError as exc:
                error = APIConnectionError(f"could not reach {self.base_url}: {exc}")
                error.__cause__ = exc
            else:
                if response.is_success:
                    return response
                error = error_from_response(response)
                if response.status_code not in RETRY_STATUSES:
                    raise error
            delay = self._retry_delay(error, attempt)
            if delay is None:
                raise error
            if self.on_retry is not None:
                self.on_retry(error, delay)
            self._sleep(delay)
            attempt += 1

    def _retry_delay(self, error: RetouchError, attempt: int) -> float | None:
        if attempt >= self.max_retries:
            return None
        if error.retry_after is None:
            return backoff(attempt)
        return error.retry_after if error.retry_after <= self.max_retry_delay else None

    def _image_url(self, image: ImageInput, index: int) -> str:
        payload = image_payload(image, index)
        if isinstance(payload, str):
            return payload
        if self.uploads is not False:
            try:
                return self._upload(payload).url
            except APIStatusError as exc:
                if self.uploads is not None or exc.status not in (404, 405):
                    raise
                self.uploads = False  # a server without uploads: data: URIs instead
        return payload.data_uri()

    def _upload(self, payload: ImagePayload) -> Upload:
        files = {"file": (payload.filename, payload.data, payload.content_type)}
        upload = Upload.from_dict(self._json("POST", "/v1/uploads", files=files))
        if self.uploads is None:
            self.uploads = True
        return upload

    def _wait_events(
        self, task_id: str, timeout: float | None, deadline: float | None, tracker: ProgressTracker
    ) -> Task | None:
        """Follow the event stream; None where the server has none, or it kept breaking."""
        failures = 0
        while failures < MAX_EVENT_STREAM_FAILURES:
            seen = tracker.seen
            try:
                final = self._follow_events(task_id, timeout, deadline, tracker)
            except _EventsUnsupported:
                if self.events:
                    raise RetouchError(
                        f"{self.base_url} has no task event stream (events=True was asked)"
                    ) from None
                self.events = False
                return None
            except (httpx.TransportError, APIConnectionError):
                final = None
            except APIStatusError as exc:
                if exc.status not in RETRY_STATUSES:
                    raise
                final = None
            if final is not None:
                if self.events is None:
                    self.events = True
                return final
            self._check_deadline(task_id, timeout, deadline, tracker)
            failures = 0 if tracker.seen > seen else failures + 1
            if failures:
                self._pause(backoff(failures - 1), deadline)
        return None

    def _follow_events(
        self, task_id: str, timeout: float | None, deadline: float | None, tracker: ProgressTracker
    ) -> Task | None:
        read = EVENTS_READ_TIMEOUT
        if deadline is not None:
            read = max(0.01, min(read, deadline - time.monotonic()))
        headers = self._auth({"Accept": "text/event-stream", "Cache-Control": "no-cache"})
        with self._http.stream(
            "GET",
            task_path(task_id, "events"),
            headers=headers,
            timeout=events_timeout(self.timeout, read),
        ) as response:
            if response.status_code in (404, 405) or (
                response.is_success and not is_event_stream(response)
            ):
                response.read()
                if response.status_code == 404:
                    tracker.see(self.tasks.get(task_id))  # NotFoundError for an unknown task
                raise _EventsUnsupported
            if not response.is_success:
                response.read()
                raise error_from_response(response)
            parser = EventParser()
            for line in response.iter_lines():
                event = parser.feed(line)
                task = task_from_event(event) if event is not None else None
                if task is not None:
                    tracker.see(task)
                    if task.done:
                        return task
                self._check_deadline(task_id, timeout, deadline, tracker)
        return None

    def _wait_polling(
        self, task_id: str, timeout: float | None, deadline: float | None, tracker: ProgressTracker
    ) -> Task:
        delay = POLL_FIRST
        failures = 0
        while True:
            try:
                task = self.tasks.get(task_id)
            except (APIConnectionError, APIStatusError) as exc:
                transient = not isinstance(exc, APIStatusError) or exc.status in RETRY_STATUSES
                failures += 1
                if not transient or failures >= MAX_POLL_FAILURES:
                    raise
            else:
                failures = 0
                if tracker.see(task):
                    delay = POLL_FIRST
                if task.done:
                    return task
            self._check_deadline(task_id, timeout, deadline, tracker)
            self._pause(delay, deadline)
            delay = next_poll_delay(delay)

    def _pause(self, seconds: float, deadline: float | None) -> None:
        """Sleep, but not past the deadline."""
        if deadline is not None:
            seconds = min(seconds, deadline - time.monotonic())
        self._sleep(max(0.0, seconds))

    @staticmethod
    def _check_deadline(
        task_id: str, timeout: float | None, deadline: float | None, tracker: ProgressTracker
    ) -> None:
        if timeout is not None and deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeoutError(
                timeout_message(task_id, timeout, tracker.last), task_id=task_id, task=tracker.last
            )
