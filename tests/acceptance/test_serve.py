"""A real `retouch serve --model demo` process, driven over HTTP like a user would."""

from __future__ import annotations

import io
import shlex
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support import ImageHost, ServeProcess, demo_serve_args, png_bytes, retouch_cli, wait_for

pytestmark = pytest.mark.acceptance

STEPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve") / "data"


@pytest.fixture(scope="module")
def keys(data_dir: Path) -> dict[str, str]:
    made = {
        name: retouch_cli(
            "keys", "create", "--name", name, "--data-dir", str(data_dir)
        ).stdout.strip()
        for name in ("alice", "bob")
    }
    listing = retouch_cli("keys", "list", "--data-dir", str(data_dir)).stdout
    assert "alice" in listing and "bob" in listing
    for secret in made.values():
        assert secret.startswith("rt_") and secret not in listing
    return made


@pytest.fixture(scope="module")
def server(data_dir: Path, keys: dict[str, str]) -> Iterator[ServeProcess]:
    process = ServeProcess(data_dir, *demo_serve_args(STEPS))
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    image_host = ImageHost()
    image_host.add("/cat.png", png_bytes((640, 480), (220, 120, 40)))
    yield image_host
    image_host.close()


def client(server: ServeProcess, secret: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=10
    )


def submit(server: ServeProcess, secret: str, host: ImageHost) -> dict[str, Any]:
    with client(server, secret) as http:
        response = http.post(
            "/v1/images/generations",
            json={
                "model": "qwen-image-edit",
                "prompt": "replace the background",
                "image_urls": [host.url("/cat.png")],
                "size": "512x512",
            },
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_the_admin_hint_tells_how_to_create_a_key(server: ServeProcess) -> None:
    assert "retouch keys create --name" in server.log()


def follow_the_hint(server: ServeProcess) -> str:
    """Run the key-creating command `retouch serve` printed; the new secret."""
    lines = server.log().splitlines()
    command = lines[lines.index("No API key exists yet. Create one (and its account) with:") + 1]
    words = shlex.split(command.strip())
    assert words[:4] == ["retouch", "keys", "create", "--name"]
    return retouch_cli(*words[1:]).stdout.strip()


@pytest.mark.parametrize("where", ["data-dir", "database-url"])
def test_the_key_the_hint_creates_works_on_that_server(
    tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    """The hint names the server's database: its data directory, or the URL it was
    given (a key written elsewhere would answer 401 there)."""
    args: tuple[str, ...] = ("--model", "fixture", "--no-worker")
    if where == "database-url":
        args += ("--database-url", request.getfixturevalue("database_url"))
    server = ServeProcess(tmp_path / "data dir", *args).start()
    try:
        secret = follow_the_hint(server)
        answer = httpx.get(
            f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {secret}"}, timeout=10
        )
        assert answer.status_code == 200, answer.text
    finally:
        server.stop()


def test_an_edit_end_to_end(server: ServeProcess, keys: dict[str, str], host: ImageHost) -> None:
    task = submit(server, keys["alice"], host)
    assert task["status"] == "pending" and task["task_info"]["can_cancel"] is True
    statuses, progress, latencies = [], [], []
    with client(server, keys["alice"]) as http:
        while True:
            start = time.perf_counter()
            detail = http.get(f"/v1/tasks/{task['id']}").json()
            latencies.append(time.perf_counter() - start)
            statuses.append(detail["status"])
            progress.append(detail["progress"])
            if detail["status"] not in ("pending", "processing"):
                break
            time.sleep(0.05)
    assert detail["status"] == "completed", detail
    assert "processing" in statuses
    assert progress == sorted(progress) and progress[-1] == 100
    # Real denoising steps, one by one: several distinct values below 100.
    assert len({p for p in progress if 0 < p < 100}) >= 3
    # The engine runs in its own process: polls stay fast while it computes.
    assert statistics.median(latencies) < 0.25, latencies
    link = detail["results"][0]
    image = Image.open(io.BytesIO(httpx.get(link).content))  # no key needed
    assert (image.format, image.size) == ("PNG", (512, 512))


def test_cancel_a_running_edit(server: ServeProcess, keys: dict[str, str], host: ImageHost) -> None:
    task = submit(server, keys["alice"], host)
    with client(server, keys["alice"]) as http:
        wait_for(
            lambda: http.get(f"/v1/tasks/{task['id']}").json()["progress"] > 0,
            timeout=60,
            interval=0.02,
        )
        cancelled = http.post(f"/v1/tasks/{task['id']}/cancel").json()
        at_cancel = cancelled["progress"]
        final = wait_for(
            lambda: (
                (d := http.get(f"/v1/tasks/{task['id']}").json())["status"] == "cancelled" and d
            ),
            timeout=30,
        )
    one_step = 100 // STEPS + 1
    assert final["progress"] <= at_cancel + one_step
    assert final["task_info"]["can_cancel"] is False and "results" not in final


def test_tasks_are_private_to_their_key(
    server: ServeProcess, keys: dict[str, str], host: ImageHost
) -> None:
    task = submit(server, keys["alice"], host)
    with client(server, keys["bob"]) as http:
        theirs = http.get(f"/v1/tasks/{task['id']}")
        missing = http.get(f"/v1/tasks/{task['id'][:-8]}00000000")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["type"] == missing.json()["error"]["type"] == "not_found_error"
    with client(server, keys["alice"]) as http:
        assert http.post(f"/v1/tasks/{task['id']}/cancel").status_code == 200


def test_a_wrong_key_is_refused(server: ServeProcess) -> None:
    with client(server, "rt_wrong") as http:
        response = http.get("/v1/tasks/task-unified-1-aaaaaaaa")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_serve_takes_its_models_from_a_models_file_flag(tmp_path: Path) -> None:
    """`--models-file FILE` (a file, where `--data-dir` takes a directory)."""
    models = tmp_path / "models.toml"
    models.write_text(
        '[models.qwen-image-edit]\ncheckpoint = "fixture"\n\n'
        '[models.qwen-image-edit-hd]\ncheckpoint = "fixture"\nprice = 2.5\n'
    )
    data_dir = tmp_path / "data"
    secret = retouch_cli("keys", "create", "--name", "a", "--data-dir", str(data_dir)).stdout
    process = ServeProcess(data_dir, "--models-file", str(models)).start()
    try:
        with client(process, secret.strip()) as http:
            listed = http.get("/v1/models")
        assert listed.status_code == 200, listed.text
        prices = {model["id"]: model["price_per_image"] for model in listed.json()["data"]}
        assert prices == {"qwen-image-edit": 1.0, "qwen-image-edit-hd": 2.5}
    finally:
        process.stop()

    refused = retouch_cli(
        "serve", "--models-file", str(tmp_path), "--data-dir", str(data_dir), check=False
    )
    assert refused.returncode == 2 and "is a directory" in refused.stderr
    refused = retouch_cli("serve", "--data-dir", str(models), check=False)
    assert refused.returncode == 2 and "is a file" in refused.stderr
