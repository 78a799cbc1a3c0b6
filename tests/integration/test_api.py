"""The HTTP API over a real server, store and worker (fixture engine)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy.exc import DataError

from retouch.api.schemas import QwenImageEditRequest
from retouch.api.service import TaskService
from retouch.clock import FakeClock
from retouch.engine.fixture import FixtureEngine
from retouch.errors import InvalidRequestError
from retouch.netguard import UrlRules
from retouch.storage import LocalResultStorage
from retouch.store import Store
from retouch.tasks import TaskStatus
from tests.integration.conftest import MAX_REQUEST_BYTES, SPEC, Api
from tests.support import MALFORMED_LINK_QUERIES, ImageHost, png_bytes, wait_for

GENERATIONS = "/v1/images/generations"


def edit(image_urls: list[str], **extra: Any) -> dict[str, Any]:
    return {"model": "qwen-image-edit", "prompt": "make it blue", "image_urls": image_urls, **extra}


def create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    with api.client() as client:
        response = client.post(GENERATIONS, json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def task_detail(api: Api, task_id: str) -> dict[str, Any]:
    with api.client() as client:
        response = client.get(f"/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_status(api: Api, task_id: str, *statuses: str, timeout: float = 20) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (d := task_detail(api, task_id))["status"] in statuses and d,
            timeout=timeout,
            what=f"{task_id} to become {statuses}",
        )
    )


def assert_error(
    response: httpx.Response, status: int, type_: str, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == status and error["type"] == type_
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) <= {"code", "message", "type", "param", "fallback_suggestion"}
    assert error.get("param") == param
    assert "Traceback" not in response.text
    return dict(error)


# -- the happy path ------------------------------------------------------


def test_create_returns_the_seeds_task_object(api: Api) -> None:
    body = create(api, edit(["https://example.com/cat.png"], n=2))
    assert re.fullmatch(rf"task-unified-{body['created']}-[a-z0-9]{{8}}", body["id"])
    assert body == {
        "created": int(api.clock.now().timestamp()),
        "id": body["id"],
        "model": "qwen-image-edit",
        "object": "image.generation.task",
        "progress": 0,
        "status": "pending",
        "task_info": {"can_cancel": True, "estimated_time": 30},
        "type": "image",
        "usage": {"billing_rule": "per_call", "credits_reserved": 3.0, "user_group": "default"},
    }


def test_curl_style_form_content_type_is_read_as_json(api: Api) -> None:
    with api.client() as client:
        response = client.post(
            GENERATIONS,
            content=b'{"model":"qwen-image-edit","prompt":"x","image_urls":["http://a.b/c.png"]}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 200 and response.json()["status"] == "pending"


def test_edit_runs_to_completion_with_downloadable_results(api: Api, image_host: ImageHost) -> None:
    engine = FixtureEngine(step_seconds=0.05, steps=10)
    api.start_worker(engine)
    first = image_host.add("/cat.png", png_bytes((640, 480), (10, 200, 30)))
    second = image_host.add("/ref", png_bytes((400, 400)), **{"Content-Type": "text/plain"})
    task = create(api, edit([first, second], n=2, seed=5, size="512x768"))
    seen: list[int] = []
    done = wait_for(
        lambda: (
            (d := task_detail(api, task["id"]), seen.append(d["progress"]))[0]["status"]
            == "completed"
            and d
        ),
        interval=0.01,
    )
    assert seen == sorted(seen), "progress never goes backwards"
    assert any(0 < p < 100 for p in seen), "progress was reported while denoising"
    assert done["progress"] == 100 and done["task_info"] == {
        "can_cancel": False,
        "estimated_time": 0,
    }
    assert len(done["results"]) == 2
    for link in done["results"]:
        assert link.startswith(api.url)
        download = httpx.get(link)  # no API key
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/png"
        image = Image.open(__import__("io").BytesIO(download.content))
        assert image.size == (512, 768)
    assert image_host.requests.count("/cat.png") == 1


def test_estimate_uses_queue_and_recent_runs(api: Api, image_host: ImageHost) -> None:
    url = image_host.add("/a.png", png_bytes())
    first = create(api, edit([url]))
    api.clock.advance(1)
    second = create(api, edit([url]))
    assert second["task_info"]["estimated_time"] == 2 * first["task_info"]["estimated_time"]


# -- cancellation ----------------------------------------------------------


def test_cancel_pending_is_immediate(api: Api) -> None:
    task = create(api, edit(["https://example.com/a.png"]))
    with api.client() as client:
        response = client.post(f"/v1/tasks/{task['id']}/cancel")
        again = client.post(f"/v1/tasks/{task['id']}/cancel")
    assert response.status_code == again.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["task_info"]["can_cancel"] is False
    assert task_detail(api, task["id"])["status"] == "cancelled"


def test_cancel_running_stops_within_one_step(api: Api, image_host: ImageHost) -> None:
    engine = FixtureEngine(step_seconds=0.1, steps=200)
    api.start_worker(engine)
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    wait_for(lambda: task_detail(api, task["id"])["progress"] >= 2)
    with api.client() as client:
        response = client.post(f"/v1/tasks/{task['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["task_info"]["can_cancel"] is False
    progress_at_cancel = response.json()["progress"]
    done = wait_status(api, task["id"], "cancelled", timeout=5)
    # One step is 0.5 % here: the run stopped within a step of the request.
    assert done["progress"] <= progress_at_cancel + 1
    assert "results" not in done
    # The worker is free for the next task.
    engine.steps = 2
    nxt = create(api, edit([image_host.url("/a.png")]))
    wait_status(api, nxt["id"], "completed")


def test_cancel_a_completed_task_conflicts(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine())
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    wait_status(api, task["id"], "completed")
    with api.client() as client:
        response = client.post(f"/v1/tasks/{task['id']}/cancel")
    assert_error(response, 409, "conflict_error", "task_id")


# -- failures inside the task ---------------------------------------------


def test_bad_input_image_fails_the_task_naming_the_url(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine())
    good = image_host.add("/good.png", png_bytes())
    small = image_host.add("/small.png", png_bytes((200, 180)))
    task = create(api, edit([good, small]))
    failed = wait_status(api, task["id"], "failed")
    assert failed["error"]["param"] == "image_urls[1]"
    assert failed["error"]["type"] == "invalid_request_error"
    assert "200x180" in failed["error"]["message"]
    assert failed["task_info"]["can_cancel"] is False


@pytest.mark.parametrize(
    ("path", "status", "body", "reason"),
    [
        ("/missing.png", 404, b"", "HTTP 404"),
        ("/page.png", 200, b"<html>hello</html>", "not an image"),
        ("/empty.png", 200, b"", "empty"),
    ],
)
def test_unfetchable_inputs_fail_with_the_reason(
    api: Api, image_host: ImageHost, path: str, status: int, body: bytes, reason: str
) -> None:
    api.start_worker(FixtureEngine())
    if path != "/missing.png":
        image_host.add(path, body, status=status)
    task = create(api, edit([image_host.url(path)]))
    failed = wait_status(api, task["id"], "failed")
    assert failed["error"]["param"] == "image_urls[0]" and reason in failed["error"]["message"]


def test_private_addresses_are_refused_by_default(api: Api, image_host: ImageHost) -> None:
    worker = api.start_worker(FixtureEngine())
    worker.fetcher.guard.allow_private_networks = False
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    failed = wait_status(api, task["id"], "failed")
    assert "non-public address" in failed["error"]["message"]
    assert image_host.requests == [], "no connection reached the private address"


def test_engine_error_fails_the_task_and_the_worker_goes_on(
    api: Api, image_host: ImageHost
) -> None:
    engine = FixtureEngine(fail_with=RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    api.start_worker(engine)
    url = image_host.add("/a.png", png_bytes())
    task = create(api, edit([url]))
    failed = wait_status(api, task["id"], "failed")
    assert failed["error"]["code"] == 500
    assert "ran out of memory" in failed["error"]["message"]
    assert "Traceback" not in failed["error"]["message"]
    engine.fail_with = None
    healthy = create(api, edit([url]))
    wait_status(api, healthy["id"], "completed")


# -- links ----------------------------------------------------------------


def test_links_expire_and_the_janitor_deletes_the_files(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine())
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    link = wait_status(api, task["id"], "completed")["results"][0]
    assert httpx.get(link).status_code == 200
    result_dir = api.storage.root / task["id"]
    assert result_dir.is_dir()
    api.clock.advance(24 * 3600 - 1)
    assert httpx.get(link).status_code == 200
    assert api.janitor().purge_expired_results() == 0
    api.clock.advance(1)
    assert_error(httpx.get(link), 403, "permission_error", "expires")
    assert api.janitor().purge_expired_results() == 1
    assert not result_dir.exists()


def test_tampered_links_are_refused(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine())
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    link = wait_status(api, task["id"], "completed")["results"][0]
    later = re.sub(r"expires=(\d+)", lambda m: f"expires={int(m[1]) + 86400}", link)
    sibling = re.sub(r"/0-([0-9a-f]{8})\.png", r"/1-\1.png", link)
    assert sibling != link
    for bad in [later, sibling, link[:-2] + "00", link.split("?")[0]]:
        assert_error(httpx.get(bad), 403, "permission_error", "signature")


def test_result_and_upload_links_answer_head_as_get_without_the_body(
    api: Api, image_host: ImageHost
) -> None:
    """RFC 9110: a general-purpose server answers HEAD; link checkers ask it first."""
    api.start_worker(FixtureEngine())
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    link = wait_status(api, task["id"], "completed")["results"][0]
    with api.client() as client:
        uploaded = client.post(
            "/v1/uploads", files={"file": ("a.png", png_bytes(), "image/png")}
        ).json()["url"]
    for url in (link, uploaded):
        got, head = httpx.get(url), httpx.head(url)
        assert got.status_code == head.status_code == 200
        assert head.content == b"" and got.content
        assert head.headers["content-length"] == str(len(got.content))
        assert head.headers["content-type"] == got.headers["content-type"]
        forged = httpx.head(url.replace("signature=", "signature=0"))
        assert forged.status_code == 403 and forged.content == b""


@pytest.mark.parametrize(
    ("query", "param"),
    MALFORMED_LINK_QUERIES,
)
def test_malformed_result_links_are_403_like_forged_ones(api: Api, query: str, param: str) -> None:
    link = f"{api.url}/v1/files/task-unified-1767225600-abcd1234/0-0123abcd.png?{query}"
    assert_error(httpx.get(link), 403, "permission_error", param)


# -- errors at the door ---------------------------------------------------


def test_missing_and_invalid_keys_are_401(api: Api) -> None:
    task = create(api, edit(["https://example.com/a.png"]))
    for secret in ["", "rt_not-a-real-key"]:
        with api.client(secret) as client:
            for response in [
                client.post(GENERATIONS, json=edit(["https://example.com/a.png"])),
                client.get(f"/v1/tasks/{task['id']}"),
                client.post(f"/v1/tasks/{task['id']}/cancel"),
            ]:
                assert_error(response, 401, "authentication_error")
                assert response.headers["www-authenticate"] == "Bearer"


def test_revoked_key_is_401_at_once(api: Api) -> None:
    key, secret = api.store.create_key("bob")
    with api.client(secret) as client:
        assert client.post(GENERATIONS, json=edit(["https://a.example/a.png"])).status_code == 200
        api.store.revoke_key(key.id)
        assert_error(
            client.post(GENERATIONS, json=edit(["https://a.example/a.png"])),
            401,
            "authentication_error",
        )


def test_authentication_is_checked_before_the_body(api: Api) -> None:
    def oversized() -> Any:  # chunked: only reading it finds it too large (413)
        for _ in range(MAX_REQUEST_BYTES // 1024 + 2):
            yield b" " * 1024

    for secret in ["", "rt_not-a-real-key"]:
        with api.client(secret) as client:
            for response in [
                client.post(GENERATIONS, content=b"not json"),
                client.post(GENERATIONS, content=oversized()),
                client.post(GENERATIONS, content=b"{}", headers={"Idempotency-Key": "k" * 256}),
            ]:
                assert_error(response, 401, "authentication_error")
                assert response.headers["www-authenticate"] == "Bearer"


def test_another_keys_task_is_404_exactly_like_a_missing_one(api: Api) -> None:
    task = create(api, edit(["https://example.com/a.png"]))
    _key, other = api.store.create_key("mallory")
    fake_id = task["id"][:-8] + "zzzzzzzz"
    with api.client(other) as client:
        theirs = client.get(f"/v1/tasks/{task['id']}")
        cancel = client.post(f"/v1/tasks/{task['id']}/cancel")
    with api.client() as client:
        missing = client.get(f"/v1/tasks/{fake_id}")
    assert_error(theirs, 404, "not_found_error", "task_id")
    assert_error(cancel, 404, "not_found_error", "task_id")
    assert_error(missing, 404, "not_found_error", "task_id")
    normalise = {"error": {**theirs.json()["error"], "message": "x"}}
    assert normalise == {"error": {**missing.json()["error"], "message": "x"}}
    assert theirs.json()["error"]["message"].replace(task["id"], "ID") == missing.json()["error"][
        "message"
    ].replace(fake_id, "ID")
    assert task_detail(api, task["id"])["status"] == "pending"


def test_unknown_model_is_404_with_a_suggestion(api: Api) -> None:
    with api.client() as client:
        response = client.post(GENERATIONS, json={**edit(["https://a.b/c.png"]), "model": "dall-e"})
    error = assert_error(response, 404, "not_found_error", "model")
    assert error["fallback_suggestion"] == "qwen-image-edit"


@pytest.mark.parametrize(
    ("content", "param", "fragment"),
    [
        (b"", None, "empty"),
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b"[" * 50_000, None, "nested too deeply"),  # json.loads raises RecursionError
        (b'{"prompt": ' + b"[" * 50_000, None, "nested too deeply"),
        (b'{"model": "qwen-image-edit", "prompt": "x"}', "image_urls", "required"),
        (b'{"model": 5, "prompt": "x", "image_urls": ["http://a.b/c"]}', "model", "string"),
        (b'{"model": "qwen-image-edit", "prompt": "x", "image_urls": []}', "image_urls", "1-3"),
    ],
)
def test_bad_bodies_are_400_naming_the_parameter(
    api: Api, content: bytes, param: str | None, fragment: str
) -> None:
    with api.client() as client:
        response = client.post(GENERATIONS, content=content)
    error = assert_error(response, 400, "invalid_request_error", param)
    assert fragment in error["message"]


def test_oversized_body_is_413(api: Api) -> None:
    huge = edit(["https://a.b/c.png"], negative_prompt="x" * MAX_REQUEST_BYTES)
    with api.client() as client:
        declared = client.post(GENERATIONS, json=huge)

        def chunks() -> Any:
            for _ in range(MAX_REQUEST_BYTES // 1024 + 2):
                yield b" " * 1024

        streamed = client.post(GENERATIONS, content=chunks())
    assert_error(declared, 413, "request_too_large_error")
    assert_error(streamed, 413, "request_too_large_error")


def test_unknown_route_and_wrong_method(api: Api) -> None:
    with api.client() as client:
        missing = client.get("/v1/nothing-here")
        wrong = client.delete(GENERATIONS)
    assert_error(missing, 404, "not_found_error")
    assert_error(wrong, 405, "invalid_request_error")
    assert wrong.headers["allow"] == "POST"


def test_a_wrong_method_names_every_method_the_path_serves(api: Api) -> None:
    """A path served by one route per method: `Allow` lists them all (Starlette alone
    names only the first route's)."""
    with api.client() as client:
        for method, path, allowed in [
            ("TRACE", "/admin/v1/accounts", "GET, POST"),
            ("DELETE", "/admin/v1/accounts/alice", "GET, PATCH"),
            ("PUT", "/v1/tasks/task-unified-1-abcdefgh", "GET"),
            ("GET", "/v1/uploads", "POST"),
        ]:
            answer = client.request(method, path)
            error = assert_error(answer, 405, "invalid_request_error")
            assert answer.headers["allow"] == allowed, (method, path)
            assert error["message"].endswith(f"allowed: {allowed}")


def test_create_answers_where_the_task_is(api: Api) -> None:
    with api.client() as client:
        body = edit(["https://example.com/a.png"])
        first = client.post(GENERATIONS, json=body, headers={"Idempotency-Key": "k-1"})
        again = client.post(GENERATIONS, json=body, headers={"Idempotency-Key": "k-1"})
        task_id = first.json()["id"]
        assert first.headers["location"] == again.headers["location"] == f"/v1/tasks/{task_id}"
        assert client.get(first.headers["location"]).json()["id"] == task_id


def test_internal_errors_are_500_without_a_traceback(api: Api) -> None:
    with api.store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE tasks RENAME TO hidden_tasks")
    try:
        with api.client() as client:
            response = client.get("/v1/tasks/task-unified-1-abcdefgh")
    finally:
        with api.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE hidden_tasks RENAME TO tasks")
    error = assert_error(response, 500, "internal_server_error")
    assert error["message"] == "Internal server error"
    assert "tasks" not in response.text and "sql" not in response.text.lower()


def test_polls_stay_fast_while_the_engine_runs(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine(step_seconds=0.2, steps=50))
    task = create(api, edit([image_host.add("/a.png", png_bytes())]))
    wait_status(api, task["id"], "processing")
    timings = []
    with api.client() as client:
        for _ in range(30):
            start = time.perf_counter()
            assert client.get(f"/v1/tasks/{task['id']}").status_code == 200
            timings.append(time.perf_counter() - start)
    assert sorted(timings)[len(timings) // 2] < 0.25
    assert task_detail(api, task["id"])["status"] == TaskStatus.PROCESSING.value


def test_openapi_uses_the_seed_names_and_documents_extensions(api: Api) -> None:
    spec = httpx.get(f"{api.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ["QwenImageEditRequest", "ImageGenerationResponse", "TaskDetail", "TaskInfo",
                 "Usage", "ErrorResponse"]:  # fmt: skip
        assert name in schemas
    assert "HTTPValidationError" not in schemas
    assert schemas["QwenImageEditRequest"]["required"] == ["model", "prompt", "image_urls"]
    assert "cancelled" in schemas["TaskDetail"]["properties"]["status"]["enum"]
    create_op = spec["paths"]["/v1/images/generations"]["post"]
    assert create_op["operationId"] == "createQwenImageEditGeneration"
    assert "422" not in create_op["responses"]
    assert {"400", "401", "402", "404", "409", "413", "429", "503"} <= set(create_op["responses"])
    assert [p["name"] for p in create_op["parameters"]] == ["Idempotency-Key"]
    assert "/v1/usage" in spec["paths"]
    assert spec["paths"]["/v1/tasks/{task_id}"]["get"]["operationId"] == "getTaskDetail"
    assert "/v1/tasks/{task_id}/cancel" in spec["paths"]
    assert "bearerAuth" in spec["components"]["securitySchemes"]
    # What API tools need to generate valid requests and to follow a created task.
    request = schemas["QwenImageEditRequest"]["properties"]
    assert request["model"]["enum"] == sorted(api.service.models)
    assert request["prompt_extend"]["const"] is False and request["watermark"]["const"] is False
    assert request["image_urls"]["items"]["format"] == "uri"
    assert request["callback_url"]["anyOf"][0]["format"] == "uri"
    created = create_op["responses"]["200"]
    assert "Location" in created["headers"]
    assert {link["operationId"]: link["parameters"] for link in created["links"].values()} == {
        operation: {"task_id": "$response.body#/id"}
        for operation in ("getTaskDetail", "cancelTask", "streamTaskEvents", "redeliverCallback")
    }


# -- models ---------------------------------------------------------------


def test_models_are_listed_with_limits_and_price(api: Api) -> None:
    _key, vip = api.store.create_key("vera", user_group="vip")
    with api.client() as client:
        default_view = client.get("/v1/models").json()
    with api.client(vip) as client:
        vip_view = client.get("/v1/models").json()
    assert default_view["object"] == "list"
    assert [m["id"] for m in default_view["data"]] == ["qwen-image-edit"]
    assert [m["id"] for m in vip_view["data"]] == ["qwen-image-edit", "qwen-image-edit-single"]
    single = vip_view["data"][1]
    assert single == {
        "id": "qwen-image-edit-single",
        "object": "model",
        "family": "edit",
        "max_images": 1,
        "max_output_side": 1024,
        "price_per_image": 1.0,
        "user_groups": ["vip"],
        "defaults": {"steps": 40, "true_cfg_scale": 4.0, "negative_prompt": " "},
        "lora": None,
    }
    with api.client("") as client:
        assert_error(client.get("/v1/models"), 401, "authentication_error")


def test_a_model_outside_the_users_group_is_403(api: Api) -> None:
    with api.client() as client:
        response = client.post(
            GENERATIONS, json={**edit(["https://a.b/c.png"]), "model": "qwen-image-edit-single"}
        )
    assert_error(response, 403, "permission_error", "model")


def test_per_model_limits_are_enforced_at_the_door(api: Api) -> None:
    _key, vip = api.store.create_key("vera", user_group="vip")
    single = {"model": "qwen-image-edit-single"}
    with api.client(vip) as client:
        two_images = client.post(
            GENERATIONS, json={**edit(["https://a.b/1", "https://a.b/2"]), **single}
        )
        too_big = client.post(
            GENERATIONS, json={**edit(["https://a.b/1"], size="1040x512"), **single}
        )
        fits = client.post(GENERATIONS, json={**edit(["https://a.b/1"], size="1024x512"), **single})
    assert (
        "at most 1 image"
        in assert_error(two_images, 400, "invalid_request_error", "image_urls")["message"]
    )
    assert "1024" in assert_error(too_big, 400, "invalid_request_error", "size")["message"]
    assert fits.status_code == 200


def test_inputs_of_the_next_task_are_fetched_while_the_engine_runs(
    api: Api, image_host: ImageHost
) -> None:
    engine = FixtureEngine(step_seconds=0.1, steps=10)
    api.start_worker(engine)
    first = create(api, edit([image_host.add("/one.png", png_bytes())]))
    wait_status(api, first["id"], "processing")
    second = create(api, edit([image_host.add("/two.png", png_bytes())]))
    wait_for(lambda: "/two.png" in image_host.requests, timeout=5)
    # The second task's image arrived while the first was still on the engine.
    assert task_detail(api, first["id"])["status"] == "processing"
    assert engine.runs == 1
    wait_status(api, second["id"], "completed")
    assert task_detail(api, first["id"])["status"] == "completed"


# -- callbacks ------------------------------------------------------------


def test_callback_state_and_redelivery(api: Api, image_host: ImageHost) -> None:
    api.start_worker(FixtureEngine())
    hook = "https://hooks.example.com/retouch"
    task = create(api, edit([image_host.add("/a.png", png_bytes())], callback_url=hook))
    assert task_detail(api, task["id"])["callback"]["status"] in ("waiting", "pending")
    done = wait_status(api, task["id"], "completed")
    assert done["callback"] == {"status": "pending", "attempts": 0, "last_status_code": None}
    first = api.store.latest_delivery(task["id"])
    with api.client() as client:
        response = client.post(f"/v1/tasks/{task['id']}/callback/redeliver")
    assert response.status_code == 200 and response.json()["id"] == task["id"]
    second = api.store.latest_delivery(task["id"])
    assert first is not None and second is not None and first.id != second.id
    assert second.url == hook


def test_redelivery_refusals(api: Api) -> None:
    hook = "https://hooks.example.com/retouch"
    pending = create(api, edit(["https://a.example/a.png"], callback_url=hook))
    plain = create(api, edit(["https://a.example/a.png"]))
    api.store.request_cancel(plain["id"], api.store.find_active_key(api.secret).id)  # type: ignore[union-attr]
    _key, other = api.store.create_key("mallory")
    with api.client() as client:
        too_early = client.post(f"/v1/tasks/{pending['id']}/callback/redeliver")
        no_hook = client.post(f"/v1/tasks/{plain['id']}/callback/redeliver")
    with api.client(other) as client:
        not_yours = client.post(f"/v1/tasks/{pending['id']}/callback/redeliver")
    assert_error(too_early, 409, "conflict_error", "task_id")
    assert_error(no_hook, 400, "invalid_request_error", "task_id")
    assert_error(not_yours, 404, "not_found_error", "task_id")


def test_urls_are_checked_by_their_look_at_submission(store: Store, clock: FakeClock) -> None:
    strict = TaskService(
        store,
        LocalResultStorage(Path("unused"), b"k", clock),
        clock,
        [SPEC],
        image_rules=UrlRules.for_images(frozenset({80, 443})),
        callback_rules=UrlRules.for_callbacks(frozenset({443})),
    )
    key = store.create_key("alice")[0]
    good = "https://example.com/a.png"
    for changes, param, reason in [
        ({"image_urls": [good, "http://192.168.1.20/a.png"]}, "image_urls[1]", "private"),
        ({"image_urls": ["http://example.com:22/a.png"]}, "image_urls[0]", "port 22"),
        ({"callback_url": "https://10.0.0.1/hook"}, "callback_url", "private"),
        ({"callback_url": "https://hooks.example.com:8443/"}, "callback_url", "port 8443"),
        ({"callback_url": "https://user@hooks.example.com/"}, "callback_url", "user name"),
    ]:
        request = QwenImageEditRequest.model_validate({**edit([good]), **changes})
        with pytest.raises(InvalidRequestError) as info:
            strict.create(key, request)
        assert info.value.param == param and reason in info.value.message
    assert (
        store.queue_position(
            strict.create(key, QwenImageEditRequest.model_validate(edit([good])))[0]
        )
        == 0
    )


# -- what no route should meet ---------------------------------------------


def test_ids_no_task_can_have_are_404_on_every_backend(api: Api) -> None:
    """A NUL character (PostgreSQL cannot even compare it) or an id longer than the
    column is an unknown task like any other, not a database error."""
    too_long = "task-unified-" + "1" * 60
    with api.client() as client, api.admin() as admin:
        for path in ("/v1/tasks/a%00b", "/v1/tasks/a%00b/events"):
            assert_error(client.get(path), 404, "not_found_error")
        for path in (f"/v1/tasks/{too_long}", f"/v1/tasks/{too_long}/events"):
            assert_error(client.get(path), 404, "not_found_error", "task_id")
        for action in ("cancel", "callback/redeliver"):
            assert_error(client.post(f"/v1/tasks/a%00b/{action}"), 404, "not_found_error")
            refused = client.post(f"/v1/tasks/{too_long}/{action}")
            assert_error(refused, 404, "not_found_error", "task_id")
        assert_error(admin.get("/admin/v1/accounts/a%00b"), 404, "not_found_error")
        # In a query: an account no one has, and a parameter no route reads.
        refused = admin.get("/admin/v1/keys?account=a%00b")
        assert_error(refused, 404, "not_found_error", "account")
        assert client.get("/v1/models?x=%00").status_code == 200


@pytest.mark.parametrize(
    "host", ["h" + "a" * 2100 + ".example", "evil.example/path", "a b", "x:port", "[zz]"]
)
def test_a_host_header_that_names_no_host_is_refused(api: Api, host: str) -> None:
    """Links are built on the Host a request came through (no public URL set): one that
    is no host cannot reach a link, or a column, on either backend."""
    with api.client() as client:
        created = client.post(
            GENERATIONS, json=edit(["https://example.com/a.png"]), headers={"Host": host}
        )
        assert_error(created, 400, "invalid_request_error", "Host")
        assert client.get("/v1/usage").json()["tasks"]["pending"] == 0


@pytest.mark.parametrize(
    "host", ["localhost", "retouch_api:8000", "127.0.0.1:8000", "[::1]:8000", "api.example.com"]
)
def test_host_names_addresses_and_ports_are_accepted(api: Api, host: str) -> None:
    with api.client() as client:
        created = client.post(
            GENERATIONS, json=edit(["https://example.com/a.png"]), headers={"Host": host}
        )
    assert created.status_code == 200, created.text
    task = api.store.get_task(created.json()["id"])
    assert task is not None and task.base_url == f"http://{host}/"


def test_a_value_the_database_refuses_is_a_400_not_a_500(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks above keep such values out; should one get through, the database's
    refusal of it as data is the client's error, in the seed's body, and no traceback."""

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise DataError("SELECT", {}, ValueError("text fields cannot contain NUL (0x00) bytes"))

    monkeypatch.setattr(api.store, "get_task", refuse)
    with api.client() as client:
        refused = client.get("/v1/tasks/task-unified-1767225600-abcd1234")
    error = assert_error(refused, 400, "invalid_request_error")
    assert "cannot store" in error["message"] and "NUL" in error["message"]
