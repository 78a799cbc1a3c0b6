"""Images sent to the server itself (`POST /v1/uploads`, `data:` URIs) and the
task event stream (`GET /v1/tasks/{id}/events`), on a live server."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from PIL import Image

from retouch.api.schemas import MAX_IMAGE_URL_LENGTH
from retouch.engine.fixture import FixtureEngine
from retouch.janitor import Janitor
from tests.integration.conftest import MAX_REQUEST_BYTES, Api
from tests.integration.test_api import assert_error, create, edit, wait_status
from tests.support import MALFORMED_LINK_QUERIES, ImageHost, image_bytes, png_bytes


def upload(
    api: Api, data: bytes, name: str = "photo.png", key: str | None = None
) -> httpx.Response:
    with api.client(key) as client:
        return client.post("/v1/uploads", files={"file": (name, data, "application/octet-stream")})


def stored_uploads(api: Api) -> list[str]:
    """The ids of the uploads kept in the result storage."""
    folder = api.storage.root / "uploads"
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def multipart(data: bytes, boundary: str = "retouch-test") -> tuple[bytes, dict[str, str]]:
    """A `file` field as multipart/form-data, and its Content-Type header."""
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def events(api: Api, task_id: str) -> list[dict[str, Any]]:
    """Every `task` event of the stream, until the server ends it."""
    seen = []
    with api.client() as client, client.stream("GET", f"/v1/tasks/{task_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert kind == "task"
                seen.append(json.loads(line.removeprefix("data: ")))
    return seen


def test_an_upload_is_checked_kept_and_linked(api: Api) -> None:
    data = image_bytes(Image.new("RGB", (640, 480), (10, 200, 30)), "JPEG")
    response = upload(api, data, "cat.jpg")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "upload" and body["id"].startswith("up_")
    assert (body["width"], body["height"], body["bytes"]) == (640, 480, len(data))
    assert body["content_type"] == "image/jpeg"
    assert body["expires_at"] == int(api.clock.now().timestamp()) + 3600
    assert body["url"].startswith(f"{api.url}/v1/uploads/{body['id']}?expires=")
    fetched = httpx.get(body["url"])  # no key needed: the link is signed
    assert fetched.status_code == 200 and fetched.content == data
    assert fetched.headers["content-type"] == "image/jpeg"
    tampered = body["url"].replace("signature=", "signature=0")
    assert_error(httpx.get(tampered), 403, "permission_error", "signature")


def test_an_upload_link_is_refused_as_result_links_are(api: Api) -> None:
    """403 while the link is not one we signed or has expired, 404 once the file is
    gone: what `/v1/files` answers for result links."""
    body = upload(api, png_bytes()).json()
    link, path = body["url"], api.storage.root / "uploads" / body["id"]
    expires = re.search(r"expires=(\d+)", link)
    assert expires is not None
    later = link.replace(expires[0], f"expires={int(expires[1]) + 1}")
    assert_error(httpx.get(later), 403, "permission_error", "signature")
    api.clock.advance(3600)
    error = assert_error(httpx.get(link), 403, "permission_error", "expires")
    assert "expired" in error["message"]
    api.clock.advance(-1)
    assert httpx.get(link).status_code == 200
    path.unlink()
    error = assert_error(httpx.get(link), 404, "not_found_error", "upload_id")
    assert error["fallback_suggestion"] == "upload the image again"


@pytest.mark.parametrize(
    ("query", "param"),
    MALFORMED_LINK_QUERIES,
)
def test_malformed_upload_links_are_refused_not_500(api: Api, query: str, param: str) -> None:
    link = f"{api.url}/v1/uploads/up_{'0' * 24}?{query}"
    assert_error(httpx.get(link), 403, "permission_error", param)
    with api.client() as client:
        refused = client.post("/v1/images/generations", json=edit([link]))
    error = assert_error(refused, 400, "invalid_request_error", "image_urls[0]")
    if len(link) <= MAX_IMAGE_URL_LENGTH:  # a longer URL is refused by its length first
        assert "upload link is invalid" in error["message"]


def test_an_upload_past_the_size_limit_is_413_even_when_chunked(api: Api) -> None:
    body, headers = multipart(b"\0" * MAX_REQUEST_BYTES)

    def chunks() -> Iterator[bytes]:  # no Content-Length: only reading finds the size
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    with api.client() as client:
        declared = client.post("/v1/uploads", content=body, headers=headers)
        streamed = client.post("/v1/uploads", content=chunks(), headers=headers)
    assert_error(declared, 413, "request_too_large_error")
    assert_error(streamed, 413, "request_too_large_error")
    assert stored_uploads(api) == []


def test_uploads_check_the_key_before_reading_the_body(api: Api) -> None:
    body, headers = multipart(b"\0" * MAX_REQUEST_BYTES)
    for secret in ["", "rt_not-a-real-key"]:
        with api.client(secret) as client:
            for response in [
                client.post("/v1/uploads", content=iter([body]), headers=headers),  # 413 if read
                client.post("/v1/uploads", content=b"--x\r\nbroken", headers=headers),  # 400
            ]:
                assert_error(response, 401, "authentication_error")
                assert response.headers["www-authenticate"] == "Bearer"
    assert stored_uploads(api) == []


def test_uploads_refuse_what_an_input_image_may_not_be(api: Api) -> None:
    small = upload(api, png_bytes(size=(100, 100)))
    error = assert_error(small, 400, "invalid_request_error", "file")
    assert "100x100" in error["message"] and "384" in error["message"]
    assert_error(upload(api, b"hello, not an image"), 400, "invalid_request_error", "file")
    with api.client() as client:
        no_file = client.post("/v1/uploads", files={"other": ("a.png", png_bytes())})
        not_multipart = client.post("/v1/uploads", content=png_bytes())
    assert_error(no_file, 400, "invalid_request_error", "file")
    assert_error(not_multipart, 400, "invalid_request_error", "file")
    assert_error(upload(api, png_bytes(), key="rt_wrong"), 401, "authentication_error")
    with httpx.Client(base_url=api.url) as anonymous:
        missing = anonymous.post("/v1/uploads", files={"file": ("a.png", png_bytes())})
    assert_error(missing, 401, "authentication_error")


def test_an_uploaded_image_is_read_from_storage_not_fetched(api: Api) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.01))
    link = upload(api, png_bytes(color=(0, 0, 255))).json()["url"]
    # The same link on a host nobody can reach: only its path and signature matter.
    parts = urlsplit(link)
    unreachable = urlunsplit(parts._replace(netloc="uploads.invalid"))
    task = create(api, edit([unreachable]))
    done = wait_status(api, task["id"], "completed", "failed")
    assert done["status"] == "completed", done.get("error")


def test_expired_or_forged_upload_links_are_refused_at_submission(api: Api) -> None:
    link = upload(api, png_bytes()).json()["url"]
    forged = link.replace("signature=", "signature=ab")
    with api.client() as client:
        refused = client.post("/v1/images/generations", json=edit([forged]))
        assert_error(refused, 400, "invalid_request_error", "image_urls[0]")
        api.clock.advance(3600)
        expired = client.post("/v1/images/generations", json=edit([link]))
    error = assert_error(expired, 400, "invalid_request_error", "image_urls[0]")
    assert "expired" in error["message"]


def test_data_uris_become_uploads(api: Api) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.01))
    encoded = base64.b64encode(png_bytes(size=(512, 384))).decode()
    task = create(api, edit([f"data:image/png;base64,{encoded}"]))
    assert wait_status(api, task["id"], "completed", "failed")["status"] == "completed"
    stored = api.store.get_task(task["id"])
    assert stored is not None
    kept = stored.params.image_urls[0]
    assert kept.startswith(f"{api.url}/v1/uploads/up_") and len(kept) < 200


def test_bad_data_uris_are_400_naming_the_image(api: Api) -> None:
    small = base64.b64encode(png_bytes(size=(100, 100))).decode()
    good = f"data:image/png;base64,{base64.b64encode(png_bytes()).decode()}"
    cases = [
        ("data:image/png;base64,%%%not-base64", "malformed"),
        ("data:text/plain,hello", "data:image/<type>;base64"),
        (f"data:image/png;base64,{small}", "100x100"),
    ]
    with api.client() as client:
        for uri, reason in cases:
            response = client.post("/v1/images/generations", json=edit([good, uri]))
            error = assert_error(response, 400, "invalid_request_error", "image_urls[1]")
            assert reason in error["message"]
    assert api.store.usage(api.store.list_keys()[0].account_id).tasks["pending"] == 0
    # Every image is checked before any is kept: the good one was not stored either.
    assert stored_uploads(api) == []


def test_the_event_stream_follows_a_task_to_its_end(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.05, steps=8))
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    seen = events(api, task["id"])
    assert seen[0]["id"] == task["id"]
    progress = [event["progress"] for event in seen]
    assert progress == sorted(progress) and len(set(progress)) >= 3
    final = seen[-1]
    assert final["status"] == "completed" and len(final["results"]) == 1
    assert [event["status"] for event in seen[:-1]].count("completed") == 0


def test_the_event_stream_of_a_finished_task_is_one_event(api: Api) -> None:
    task = create(api, edit(["https://example.com/a.png"]))
    with api.client() as client:
        client.post(f"/v1/tasks/{task['id']}/cancel")
    assert [event["status"] for event in events(api, task["id"])] == ["cancelled"]


def test_the_event_stream_is_only_for_the_tasks_owner(api: Api) -> None:
    task = create(api, edit(["https://example.com/a.png"]))
    _key, other = api.store.create_key("mallory")
    with api.client(other) as client:
        assert_error(
            client.get(f"/v1/tasks/{task['id']}/events"), 404, "not_found_error", "task_id"
        )
    with api.client() as client:
        assert_error(
            client.get("/v1/tasks/task-unified-1-abcdefgh/events"),
            404,
            "not_found_error",
            "task_id",
        )


@pytest.mark.parametrize("change", ["revoke", "rotate"])
def test_an_event_stream_ends_once_its_key_stops_working(api: Api, change: str) -> None:
    """A stream opened with a key that is then revoked (or rotated to a new secret)
    ends with the 401 error body instead of going on to show the results."""
    key, secret = api.store.create_key("mallory")
    with api.client(secret) as client:
        created = client.post("/v1/images/generations", json=edit(["https://example.com/a.png"]))
        assert created.status_code == 200, created.text
        task_id = created.json()["id"]
        seen: list[tuple[str, dict[str, Any]]] = []
        with client.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            assert response.status_code == 200
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    seen.append((kind, json.loads(line.removeprefix("data: "))))
                    if len(seen) == 1:
                        if change == "revoke":
                            assert api.store.revoke_key(key.id)
                        else:
                            api.store.rotate_key(key.id)
    assert [kind for kind, _ in seen] == ["task", "error"]
    assert seen[0][1]["status"] == "pending"
    assert seen[1][1]["error"]["code"] == 401
    assert seen[1][1]["error"]["type"] == "authentication_error"


def test_the_janitor_deletes_uploads_as_old_as_results(api: Api) -> None:
    body = upload(api, png_bytes()).json()
    janitor = Janitor(
        api.store, api.storage, max_attempts=2, interval_seconds=60, upload_ttl_seconds=86400
    )
    folder = api.storage.root / "uploads"
    # What a crash in the middle of writing an upload leaves: a temporary file.
    (folder / ".tmp-crashed").write_bytes(b"half an upload")
    (folder / "README").write_text("not ours: left alone")
    assert janitor.purge_uploads() == 0
    api.clock.advance(86400 + 1)
    path = folder / body["id"]
    # Files carry the real time; age them as the fake clock says.
    stamp = api.clock.now().timestamp() - 86400 - 2
    for aged in (path, folder / ".tmp-crashed", folder / "README"):
        os.utime(aged, (stamp, stamp))
    assert janitor.purge_uploads() == 2
    assert sorted(p.name for p in folder.iterdir()) == ["README"]


def test_slow_event_readers_do_not_hold_up_the_server(api: Api, image_host: ImageHost) -> None:
    """Followers that never read their stream cost the server nothing but their
    connection: polls, creates and other streams go on at full speed."""
    api.start_worker(FixtureEngine(step_seconds=0.05, steps=20))
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    stalled = [httpx.Client(base_url=api.url, headers=api.client().headers) for _ in range(20)]
    streams = [
        client.stream("GET", f"/v1/tasks/{task['id']}/events").__enter__() for client in stalled
    ]
    try:
        assert all(stream.status_code == 200 for stream in streams)
        with api.client() as client:
            started = time.perf_counter()
            for _ in range(20):
                assert client.get(f"/v1/tasks/{task['id']}").status_code == 200
            polls = time.perf_counter() - started
            other = create(api, edit([image_host.add("/b.png", png_bytes())]))
        assert polls < 2.0, f"20 polls took {polls:.2f} s beside 20 stalled streams"
        # A reader that does read still sees its task through to the end.
        assert events(api, other["id"])[-1]["status"] == "completed"
    finally:
        for stream, client in zip(streams, stalled, strict=True):
            stream.close()
            client.close()
