"""`retouch.client` against a live server, store and worker (fixture engine): no
part of the server is mocked."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from retouch.accounts import GroupLimits, Limits
from retouch.client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
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
    Task,
    UpstreamError,
    WaitTimeoutError,
)
from retouch.client._errors import error_from_response, retry_after_seconds
from retouch.engine.fixture import FixtureEngine
from tests.integration.conftest import Api
from tests.support import ImageHost, free_port, png_bytes

PROMPT = "make it blue"
COLOR = (200, 80, 40)


def client(api: Api, **options: Any) -> Client:
    return Client(api.url, api.secret, timeout=10, **options)


def async_client(api: Api, **options: Any) -> AsyncClient:
    return AsyncClient(api.url, api.secret, timeout=10, **options)


def record_paths(http: httpx.Client | httpx.AsyncClient) -> list[httpx.Request]:
    """Every request the client sends (an httpx event hook: nothing is replaced)."""
    sent: list[httpx.Request] = []
    if isinstance(http, httpx.AsyncClient):

        async def remember_async(request: httpx.Request) -> None:
            sent.append(request)

        http.event_hooks = {"request": [remember_async]}
    else:
        http.event_hooks = {"request": [sent.append]}
    return sent


def expected_green_blue(color: tuple[int, int, int]) -> tuple[float, float]:
    """The fixture engine's output: the inverted input, 25 % tinted (the tint's red
    comes from the seed, its green and blue are 64 and 128)."""
    return 0.75 * (255 - color[1]) + 0.25 * 64, 0.75 * (255 - color[2]) + 0.25 * 128


def assert_result_of(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", size)
        pixel = image.convert("RGB").getpixel((5, 5))
    assert isinstance(pixel, tuple)
    for got, want in zip(pixel[1:], expected_green_blue(color), strict=True):
        assert abs(got - want) <= 2, (pixel, color)


# -- edits, waiting, downloads -----------------------------------------------------


def test_an_edit_of_a_url_followed_by_events_and_downloaded(
    api: Api, image_host: ImageHost, tmp_path: Path
) -> None:
    # 4 steps of 0.25 s: the stream (which looks every 0.25 s) sees them rise.
    api.start_worker(FixtureEngine(step_seconds=0.25))
    url = image_host.add("/cat.png", png_bytes((640, 480), COLOR))
    seen: list[Task] = []
    with client(api) as retouch:
        sent = record_paths(retouch._http)
        task = retouch.edit(PROMPT, [url], n=2, size="512x512", negative_prompt="blur")
        assert task.status == "pending" and task.results is None
        assert task.usage is not None and task.usage.credits_reserved == 3.0  # 1.5 x 2
        assert task.task_info is not None and task.task_info.can_cancel
        final = retouch.wait(task, timeout=20, on_progress=seen.append)
        assert retouch.events is True
        assert [r.url.path for r in sent][-1] == f"/v1/tasks/{task.id}/events"
        assert final.status == "completed" and final.done and final.succeeded
        assert final.progress == 100 and final.results is not None and len(final.results) == 2
        progress = [t.progress for t in seen]
        assert progress == sorted(progress) and progress[-1] == 100 and len(set(progress)) >= 3
        assert seen[-1] is final
        paths = retouch.download(final, tmp_path / "out")
        assert paths == [tmp_path / "out" / f"{task.id}-{i}.png" for i in (1, 2)]
        for path in paths:
            assert_result_of(path, COLOR, (512, 512))
        # A result link needs no key: the key is never sent to it.
        downloads = [r for r in sent if r.url.path.startswith("/v1/files/")]
        assert downloads and all("authorization" not in r.headers for r in downloads)
        assert retouch.tasks.get(task.id).raw == final.raw


@pytest.mark.parametrize("kind", ["bytes", "path", "pil"])
def test_local_images_are_uploaded(api: Api, tmp_path: Path, kind: str) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.01))
    data = png_bytes((600, 400), COLOR)
    image: Any
    if kind == "bytes":
        image = data
    elif kind == "path":
        image = tmp_path / "photo.png"
        image.write_bytes(data)
    else:
        image = Image.new("RGB", (600, 400), COLOR)
    with client(api) as retouch:
        sent = record_paths(retouch._http)
        task = retouch.edit(PROMPT, image, size="512x512")  # one image, not in a list
        assert retouch.uploads is True
        assert [r.url.path for r in sent] == ["/v1/uploads", "/v1/images/generations"]
        final = retouch.wait(task.id, timeout=20)
        assert final.succeeded, final
        (path,) = retouch.download(final, tmp_path, stem="edited")
        assert path == tmp_path / "edited.png"
        assert_result_of(path, COLOR, (512, 512))


def test_an_upload_and_several_kinds_of_image_in_one_edit(
    api: Api, image_host: ImageHost, tmp_path: Path
) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.01))
    local = tmp_path / "b.png"
    local.write_bytes(png_bytes((512, 512), (0, 0, 0)))
    with client(api) as retouch:
        upload = retouch.upload(png_bytes((640, 480), COLOR))
        assert (upload.width, upload.height, upload.content_type) == (640, 480, "image/png")
        assert upload.id.startswith("up_") and upload.url.startswith(api.url)
        url = image_host.add("/c.png", png_bytes())
        final = retouch.wait(
            retouch.edit(PROMPT, [upload.url, str(local), url], size="512x512"), timeout=20
        )
        assert final.succeeded, final
        (path,) = retouch.download(final, tmp_path)
        assert_result_of(path, COLOR, (512, 512))  # the first image is the upload


def test_data_uris_when_told_not_to_upload(api: Api, tmp_path: Path) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.01))
    with client(api, uploads=False) as retouch:
        sent = record_paths(retouch._http)
        task = retouch.edit(PROMPT, [png_bytes((512, 512), COLOR)], size="512x512")
        assert [r.url.path for r in sent] == ["/v1/images/generations"]
        assert b'"data:image/png;base64,' in sent[0].content
        final = retouch.wait(task, timeout=20)
        assert final.succeeded, final
        assert_result_of(retouch.download(final, tmp_path)[0], COLOR, (512, 512))


def test_a_server_without_uploads_gets_data_uris(api: Api) -> None:
    api.service.uploads = None  # no /v1/uploads (404), and no data: URIs either
    with client(api) as retouch:
        sent = record_paths(retouch._http)
        with pytest.raises(BadRequestError) as refused:
            retouch.edit(PROMPT, png_bytes())
        assert retouch.uploads is False  # detected: the next image goes as a data: URI at once
        assert [r.url.path for r in sent] == ["/v1/uploads", "/v1/images/generations"]
        assert refused.value.param == "image_urls" and "data: URIs" in refused.value.message
        with pytest.raises(BadRequestError):
            retouch.edit(PROMPT, png_bytes())
        assert [r.url.path for r in sent][2:] == ["/v1/images/generations"]


def test_wait_by_polling(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.3))
    url = image_host.add("/cat.png", png_bytes())
    seen: list[Task] = []
    with client(api, events=False) as retouch:
        sent = record_paths(retouch._http)
        task = retouch.edit(PROMPT, url, size="512x512")
        final = retouch.wait(task, timeout=20, on_progress=seen.append)
        assert final.succeeded and final.progress == 100
        paths = {r.url.path for r in sent}
        assert paths == {"/v1/images/generations", f"/v1/tasks/{task.id}"}
        progress = [t.progress for t in seen]
        assert progress == sorted(progress) and progress[-1] == 100
        assert len(seen) == len({(t.status, t.progress) for t in seen})  # once per change
        assert len(seen) >= 3  # pending or processing, more progress, completed


def test_wait_gives_up_after_its_timeout(api: Api, image_host: ImageHost) -> None:
    url = image_host.add("/cat.png", png_bytes())  # no worker: the task stays pending
    for events in (None, False):
        with client(api, events=events) as retouch:
            task = retouch.edit(PROMPT, url)
            started = time.monotonic()
            with pytest.raises(WaitTimeoutError) as timed_out:
                retouch.wait(task, timeout=0.4)
            assert 0.35 < time.monotonic() - started < 3
            assert isinstance(timed_out.value, TimeoutError)
            assert timed_out.value.task_id == task.id
            assert timed_out.value.task is not None and timed_out.value.task.status == "pending"
            assert "still pending" in str(timed_out.value)
            retouch.tasks.cancel(task.id)


def test_cancel_and_wait_for_a_cancelled_task(api: Api, image_host: ImageHost) -> None:
    url = image_host.add("/cat.png", png_bytes())
    with client(api) as retouch:
        task = retouch.edit(PROMPT, url)
        cancelled = retouch.tasks.cancel(task.id)
        assert cancelled.status == "cancelled" and cancelled.done and not cancelled.succeeded
        assert retouch.tasks.cancel(task.id).status == "cancelled"  # a no-op
        assert retouch.wait(task.id, timeout=5).status == "cancelled"
        assert retouch.wait(cancelled) is cancelled  # already final: no request
        with pytest.raises(RetouchError, match="is cancelled: there are no results"):
            retouch.download(cancelled, ".")


def test_a_failed_task_carries_its_error(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.01))
    url = image_host.add("/tiny.png", png_bytes((200, 180)))
    with client(api) as retouch:
        final = retouch.wait(retouch.edit(PROMPT, url), timeout=20)
    assert final.status == "failed" and final.error is not None
    assert final.error.param == "image_urls[0]" and final.error.code == 400
    assert "200x180" in str(final.error)


# -- errors ------------------------------------------------------------------------


def test_every_error_maps_to_its_class(api: Api, image_host: ImageHost) -> None:
    url = image_host.add("/cat.png", png_bytes())
    with Client(api.url, "rt_not-a-key") as stranger, pytest.raises(AuthenticationError) as e401:
        stranger.tasks.get("task-unified-1-abcdefgh")
    assert (e401.value.status, e401.value.type, e401.value.code) == (
        401,
        "authentication_error",
        401,
    )
    with client(api) as retouch:
        with pytest.raises(NotFoundError) as e404:
            retouch.tasks.get("task-unified-1-abcdefgh")
        assert (e404.value.status, e404.value.type) == (404, "not_found_error")
        with pytest.raises(NotFoundError):  # through the event stream's 404
            retouch.wait("task-unified-1-abcdefgh", timeout=5)
        assert retouch.events is None  # an unknown task says nothing about the server
        with pytest.raises(BadRequestError) as e400:
            retouch.edit(PROMPT, url, size="100x100")
        assert (e400.value.status, e400.value.param) == (400, "size")
        assert "(param: size)" in str(e400.value)
        with pytest.raises(PermissionDeniedError) as e403:
            retouch.edit(PROMPT, url, model="qwen-image-edit-single")
        assert (e403.value.status, e403.value.param) == (403, "model")
        with pytest.raises(NotFoundError) as unknown_model:
            retouch.edit(PROMPT, url, model="no-such-model")
        assert unknown_model.value.param == "model" and unknown_model.value.fallback_suggestion
        # The suggestion (the model served) is in the message already: said once.
        assert str(unknown_model.value) == f"{unknown_model.value.message} (param: model)"
        assert unknown_model.value.fallback_suggestion in unknown_model.value.message
        noise = Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3))
        with (
            client(api, uploads=False) as inline,
            pytest.raises(RequestTooLargeError) as e413,  # a 64 KB body limit
        ):
            inline.edit(PROMPT, noise)
        assert e413.value.type == "request_too_large_error"
        first = retouch.edit(PROMPT, url, idempotency_key="order-1")
        assert retouch.edit(PROMPT, url, idempotency_key="order-1").id == first.id
        with pytest.raises(ConflictError) as e409:
            retouch.edit("another prompt", url, idempotency_key="order-1")
        assert e409.value.type == "conflict_error"
        available = retouch.usage()["credits"]["available"]
        api.store.grant("alice", 1 - available)  # 1 credit left; a task reserves 1.5
        with pytest.raises(InsufficientQuotaError) as e402:
            retouch.edit(PROMPT, url)
        assert (e402.value.status, e402.value.type) == (402, "insufficient_quota_error")
        api.store.grant("alice", 10)
        api.service.limits = Limits(max_queued_tasks=1)
        with pytest.raises(ServiceUnavailableError) as e503:
            retouch.edit(PROMPT, url)
        assert e503.value.status == 503 and e503.value.retry_after is not None
        retouch.tasks.cancel(first.id)
        api.start_worker(FixtureEngine(step_seconds=0.01))
        done = retouch.wait(retouch.edit(PROMPT, url, size="512x512"), timeout=20)
        with pytest.raises(ConflictError):
            retouch.tasks.cancel(done.id)  # completed


def test_an_unreachable_server_is_a_connection_error() -> None:
    with (
        Client(f"http://127.0.0.1:{free_port()}", "rt_x", timeout=2) as retouch,
        pytest.raises(APIConnectionError, match="could not reach"),
    ):
        retouch.tasks.get("task-unified-1-abcdefgh")


def test_statuses_without_the_seeds_body_still_map() -> None:
    cases = {
        500: InternalServerError,
        502: UpstreamError,
        503: ServiceUnavailableError,
        504: InternalServerError,
        418: RetouchError,
    }
    for status, cls in cases.items():
        error = error_from_response(httpx.Response(status, text="<html>proxy</html>"))
        assert type(error) is cls or (cls is RetouchError and isinstance(error, cls))
        assert error.status == status and error.type is None and "proxy" in error.message
    typed = error_from_response(
        httpx.Response(422, json={"error": {"type": "rate_limit_error", "message": "slow"}})
    )
    assert isinstance(typed, RateLimitError)


def test_retry_hints_are_read_from_the_header_or_the_suggestion() -> None:
    assert retry_after_seconds(httpx.Headers({"Retry-After": "7"}), None) == 7
    assert retry_after_seconds(httpx.Headers(), "retry after 20 seconds") == 20
    assert retry_after_seconds(httpx.Headers(), "retry after 1 second") == 1
    assert retry_after_seconds(httpx.Headers(), "try again later") is None
    dated = retry_after_seconds(
        httpx.Headers({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), None
    )
    assert dated == 0


def test_configuration_comes_from_arguments_or_the_environment(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RETOUCH_BASE_URL", raising=False)
    monkeypatch.delenv("RETOUCH_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="RETOUCH_BASE_URL"):
        Client(api_key="k")
    with pytest.raises(ConfigurationError, match="RETOUCH_API_KEY"):
        AsyncClient(base_url=api.url)
    with pytest.raises(ConfigurationError, match="http"):
        Client("ftp://example.com", "k")
    monkeypatch.setenv("RETOUCH_BASE_URL", api.url + "/v1/")
    monkeypatch.setenv("RETOUCH_API_KEY", api.secret)
    with Client() as retouch:
        assert retouch.base_url == api.url
        assert retouch.usage()["credits"]["available"] == 100
        assert [model["id"] for model in retouch.models()] == ["qwen-image-edit"]


# -- rate limits and retries -----------------------------------------------------------


def test_a_rate_limit_is_raised_or_waited_out(api: Api, image_host: ImageHost) -> None:
    url = image_host.add("/cat.png", png_bytes())
    api.service.limits = Limits(default=GroupLimits(1, 100))
    with client(api) as retouch:
        retouch.edit(PROMPT, url)
        with pytest.raises(RateLimitError) as limited:
            retouch.edit(PROMPT, url)
        assert limited.value.retry_after == 60
        assert limited.value.fallback_suggestion == "retry after 60 seconds"
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the server's clock moves instead of ours
        slept.append(seconds)
        api.clock.advance(seconds)

    retried: list[tuple[type, float]] = []
    on_retry = lambda error, seconds: retried.append((type(error), seconds))  # noqa: E731
    with client(api, max_retries=2, on_retry=on_retry) as retouch:
        retouch._sleep = sleep
        sent = record_paths(retouch._http)
        task = retouch.edit(PROMPT, url)
        assert slept == [60] and retried == [(RateLimitError, 60)]
        keys = {r.headers.get("idempotency-key") for r in sent}
        assert len(sent) == 2 and len(keys) == 1 and None not in keys  # one generated key
        assert retouch.tasks.get(task.id).status == "pending"
    with client(api, max_retries=2, max_retry_delay=30) as retouch:
        retouch._sleep = sleep
        with pytest.raises(RateLimitError):  # asks for longer than we would wait
            retouch.edit(PROMPT, url)
        assert slept == [60]
    with api.client() as http:
        assert http.get("/v1/usage").json()["tasks"]["pending"] == 2


# -- the asyncio client -------------------------------------------------------------


def test_the_async_client(api: Api, image_host: ImageHost, tmp_path: Path) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.02))
    url = image_host.add("/cat.png", png_bytes((640, 480), COLOR))

    async def scenario() -> None:
        seen: list[Task] = []
        async with async_client(api) as retouch:
            task = await retouch.edit(PROMPT, [url, png_bytes()], size="512x512", seed=0)
            assert retouch.uploads is True
            final = await retouch.wait(task, timeout=20, on_progress=seen.append)
            assert retouch.events is True and final.succeeded
            progress = [t.progress for t in seen]
            assert progress == sorted(progress) and progress[-1] == 100
            (path,) = await retouch.download(final, tmp_path)
            assert_result_of(path, COLOR, (512, 512))
            assert (await retouch.tasks.get(task.id)).status == "completed"
            with pytest.raises(ConflictError):
                await retouch.tasks.cancel(task.id)
            with pytest.raises(NotFoundError):
                await retouch.wait("task-unified-1-abcdefgh", timeout=5)
            assert (await retouch.usage())["object"] == "usage"
        async with async_client(api, events=False) as retouch:
            image = Image.new("RGB", (512, 512), COLOR)
            final = await retouch.tasks.wait(await retouch.edit(PROMPT, image), timeout=20)
            assert final.succeeded and retouch.events is False
        async with AsyncClient(api.url, "rt_nope") as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.tasks.get(task.id)

    asyncio.run(scenario())


def test_the_async_client_times_out_and_retries(api: Api, image_host: ImageHost) -> None:
    url = image_host.add("/cat.png", png_bytes())
    api.service.limits = Limits(default=GroupLimits(1, 100))

    async def scenario() -> None:
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            api.clock.advance(seconds)

        async with async_client(api, max_retries=1) as retouch:
            retouch._sleep = sleep
            first = await retouch.edit(PROMPT, url)
            second = await retouch.edit(PROMPT, url)
            assert slept == [60] and second.id != first.id
            with pytest.raises(RateLimitError) as limited:
                retouch.max_retries = 0
                await retouch.edit(PROMPT, url)
            assert limited.value.retry_after == 60
            for events in (None, False):
                retouch.events = events
                started = time.monotonic()
                with pytest.raises(WaitTimeoutError) as timed_out:
                    await retouch.wait(first.id, timeout=0.3)
                assert time.monotonic() - started < 3
                assert timed_out.value.task is not None
                assert timed_out.value.task.status == "pending"
            await retouch.tasks.cancel(first.id)
            await retouch.tasks.cancel(second.id)

    asyncio.run(scenario())


def test_the_package_exports_the_clients_lazily() -> None:
    import retouch

    assert retouch.Client is Client and retouch.AsyncClient is AsyncClient
    code = "import sys, retouch; print('httpx' in sys.modules)"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"  # `import retouch` stays light
