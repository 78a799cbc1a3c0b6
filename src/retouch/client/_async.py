"""The asyncio client: the same API as `Client`, awaited."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
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


class AsyncTasks:
    """`client.tasks`: one task by id."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def get(self, task_id: str) -> Task:
        """The task detail (`GET /v1/tasks/{id}`)."""
        return Task.from_dict(await self._client._json("GET", task_path(task_id)))

    async def cancel(self, task_id: str) -> Task:
        """Cancel (extension); a completed or failed task raises ConflictError."""
        return Task.from_dict(await self._client._json("POST", task_path(task_id, "cancel")))

    async def wait(
        self,
        task: Task | str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Task:
        """Same as `client.wait`."""
        return await self._client.wait(task, timeout=timeout, on_progress=on_progress)


class AsyncClient:
    """The asyncio twin of `retouch.client.Client` (same arguments, same behaviour)."""

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
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self.timeout,
            headers={"User-Agent": USER_AGENT, **(headers or {})},
        )
        self.tasks = AsyncTasks(self)
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests may replace it

    # -- lifecycle ------------------------------------------------------------

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient(base_url={self.base_url!r})"

    # -- the API ---------------------------------------------------------------

    async def edit(
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
        """Create an edit task and return it (pending); see `Client.edit`."""
        urls = [await self._image_url(image, i) for i, image in enumerate(as_image_list(images))]
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
        data = await self._json("POST", "/v1/images/generations", json=body, headers=headers)
        return Task.from_dict(data)

    async def upload(self, image: ImageInput) -> Upload:
        """Upload one input image (`POST /v1/uploads`, extension)."""
        payload = await asyncio.to_thread(image_payload, image, 0)
        if isinstance(payload, str):
            raise ValueError("that image is a URL already: pass it to edit() as it is")
        return await self._upload(payload)

    async def wait(
        self,
        task: Task | str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Task:
        """Until the task is completed, failed or cancelled; see `Client.wait`."""
        task_id = task_id_of(task)
        tracker = ProgressTracker(on_progress)
        if isinstance(task, Task) and task.done:
            tracker.see(task)
            return task
        try:
            async with asyncio.timeout(timeout) as scope:
                if self.events is not False:
                    final = await self._wait_events(task_id, tracker)
                    if final is not None:
                        return final
                return await self._wait_polling(task_id, tracker)
        except TimeoutError:
            if timeout is None or not scope.expired():
                raise
            raise WaitTimeoutError(
                timeout_message(task_id, timeout, tracker.last), task_id=task_id, task=tracker.last
            ) from None

    async def download(
        self, task: Task | str, directory: str | Path = ".", *, stem: str | None = None
    ) -> list[Path]:
        """Save a completed task's results; see `Client.download`."""
        if isinstance(task, str):
            task = await self.tasks.get(task)
        urls = check_downloadable(task)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        names = result_names(task, stem)
        return [
            await self.download_url(url, folder / name)
            for url, name in zip(urls, names, strict=True)
        ]

    async def download_url(self, url: str, path: str | Path) -> Path:
        """Save one result link to `path`. Links are signed: no API key is sent."""
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        try:
            async with self._http.stream("GET", url, follow_redirects=True) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
                with partial.open("wb") as out:
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
            partial.replace(target)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"downloading {url} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"downloading {url} failed: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return target

    async def models(self) -> list[dict[str, Any]]:
        """`GET /v1/models` (extension)."""
        data = (await self._json("GET", "/v1/models")).get("data")
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    async def usage(self) -> dict[str, Any]:
        """`GET /v1/usage` (extension)."""
        return await self._json("GET", "/v1/usage")

    # -- internals ---------------------------------------------------------------

    def _auth(self, headers: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}", **(headers or {})}

    async def _json(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        files: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        response = await self._request(method, path, json=json, files=files, headers=headers)
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

    async def _request(
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
                response = await self._http.request(
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
            await self._sleep(delay)
            attempt += 1

    def _retry_delay(self, error: RetouchError, attempt: int) -> float | None:
        if attempt >= self.max_retries:
            return None
        if error.retry_after is None:
            return backoff(attempt)
        return error.retry_after if error.retry_after <= self.max_retry_delay else None

    async def _image_url(self, image: ImageInput, index: int) -> str:
        payload = await asyncio.to_thread(image_payload, image, index)
        if isinstance(payload, str):
            return payload
        if self.uploads is not False:
            try:
                return (await self._upload(payload)).url
            except APIStatusError as exc:
                if self.uploads is not None or exc.status not in (404, 405):
                    raise
                self.uploads = False  # a server without uploads: data: URIs instead
        return payload.data_uri()

    async def _upload(self, payload: ImagePayload) -> Upload:
        files = {"file": (payload.filename, payload.data, payload.content_type)}
        upload = Upload.from_dict(await self._json("POST", "/v1/uploads", files=files))
        if self.uploads is None:
            self.uploads = True
        return upload

    async def _wait_events(self, task_id: str, tracker: ProgressTracker) -> Task | None:
        failures = 0
        while failures < MAX_EVENT_STREAM_FAILURES:
            seen = tracker.seen
            try:
                final = await self._follow_events(task_id, tracker)
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
            failures = 0 if tracker.seen > seen else failures + 1
            if failures:
                await self._sleep(backoff(failures - 1))
        return None

    async def _follow_events(self, task_id: str, tracker: ProgressTracker) -> Task | None:
        headers = self._auth({"Accept": "text/event-stream", "Cache-Control": "no-cache"})
        async with self._http.stream(
            "GET",
            task_path(task_id, "events"),
            headers=headers,
            timeout=events_timeout(self.timeout, EVENTS_READ_TIMEOUT),
        ) as response:
            if response.status_code in (404, 405) or (
                response.is_success and not is_event_stream(response)
            ):
                await response.aread()
                if response.status_code == 404:
                    tracker.see(await self.tasks.get(task_id))  # NotFoundError: unknown task
                raise _EventsUnsupported
            if not response.is_success:
                await response.aread()
                raise error_from_response(response)
            parser = EventParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                task = task_from_event(event) if event is not None else None
                if task is not None:
                    tracker.see(task)
                    if task.done:
                        return task
        return None

    async def _wait_polling(self, task_id: str, tracker: ProgressTracker) -> Task:
        delay = POLL_FIRST
        failures = 0
        while True:
            try:
                task = await self.tasks.get(task_id)
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
            await self._sleep(delay)
            delay = next_poll_delay(delay)
