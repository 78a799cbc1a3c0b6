"""Resource faults against real `retouch serve` processes: the result volume fills
up (a real tmpfs), a callback receiver stays down past the whole retry schedule
(a real HTTPS server), and the wall clock jumps past the result links' expiry (a
real LD_PRELOAD shim). After each: every task is terminal, the ledger balances
(checked by conftest), no result file lacks a task or a task its file, and the
server is healthy."""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from PIL import Image
from standardwebhooks.webhooks import Webhook

from tests.integration.test_callbacks import Answer, Receiver
from tests.support import (
    REPO,
    ImageHost,
    ServeProcess,
    free_port,
    image_bytes,
    retouch_cli,
    wait_for,
)

pytestmark = pytest.mark.acceptance

TERMINAL = ("completed", "failed", "cancelled")
FILLER = "filler"  # what stands in for other data on the result volume
NOISE_PNG_BYTES = 788_000  # about what one 512x512 fixture result of noise takes


def noise_png(size: tuple[int, int] = (512, 512)) -> bytes:
    """Random pixels: their PNG does not compress, so its size is predictable."""
    return image_bytes(Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)), "PNG")


def new_key(data_dir: Path) -> tuple[dict[str, str], str]:
    """Authorization headers of a new key, and its account's webhook secret."""
    created = retouch_cli("keys", "create", "--name", "alice", "--data-dir", str(data_dir))
    secret = re.search(r"whsec_\S+", created.stderr)
    assert secret is not None, created.stderr
    return {"Authorization": f"Bearer {created.stdout.strip()}"}, secret[0]


def fixture_args(*extra: str) -> tuple[str, ...]:
    return ("--model", "fixture", "--allow-private-networks", "--fetch-ports", "any", *extra)


def submit(http: httpx.Client, image_url: str, **fields: Any) -> str:
    body = {"model": "qwen-image-edit", "prompt": "make it blue", "image_urls": [image_url]}
    response = http.post("/v1/images/generations", json={**body, **fields})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def finished(http: httpx.Client, task_id: str, timeout: float = 40) -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        detail = dict(http.get(f"/v1/tasks/{task_id}").json())
        return detail if detail["status"] in TERMINAL else None

    return dict(wait_for(terminal, timeout=timeout, interval=0.1, what=f"{task_id} to finish"))


def assert_healthy(server: ServeProcess) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    ready = httpx.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text


def stored_files(results_dir: Path) -> set[str]:
    """Every file and folder under the result directory (hidden ones included)."""
    return {str(path.relative_to(results_dir)) for path in results_dir.rglob("*")}


def task_rows(data_dir: Path) -> list[dict[str, Any]]:
    """The tasks as the database holds them (read once the server has stopped)."""
    with closing(sqlite3.connect(data_dir / "retouch.db")) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT id, status, attempts, result_keys, results_purged FROM tasks"
        ).fetchall()
    return [dict(row) for row in rows]


def assert_results_match_tasks(data_dir: Path, results_dir: Path) -> None:
    """Each task is terminal; the files on disk are exactly the results of completed
    tasks not yet purged (their folders included): no orphan, nothing missing."""
    expected: set[str] = set()
    for row in task_rows(data_dir):
        assert row["status"] in TERMINAL, row
        if row["status"] == "completed" and not row["results_purged"]:
            keys = json.loads(row["result_keys"])
            assert keys, row
            expected |= {*keys, *(key.split("/")[0] for key in keys)}
    assert stored_files(results_dir) == expected


# -- 1. the result volume fills up -----------------------------------------


@pytest.fixture
def result_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs where results are written (`--storage`)."""
    volume = tmp_path / "results"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(volume)], check=True)
    try:
        yield volume
    finally:
        subprocess.run(["umount", str(volume)], check=True)


def leave_free(volume: Path, free_bytes: int) -> None:
    """Grow or shrink the filler file so that about `free_bytes` stay free."""
    filler = volume / FILLER
    filler.touch()
    now_free = os.statvfs(volume).f_bavail * os.statvfs(volume).f_frsize
    size = filler.stat().st_size + now_free - free_bytes
    with filler.open("r+b") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, size))  # written, not sparse: tmpfs counts it


def assert_failed_for_space(detail: dict[str, Any]) -> None:
    assert detail["status"] == "failed", detail
    assert "results" not in detail
    error = detail["error"]
    assert (error["code"], error["type"]) == (503, "service_unavailable_error"), error
    assert "result storage is full" in error["message"], error
    assert "Traceback" not in error["message"] and "Errno" not in error["message"], error


def test_a_full_result_volume_fails_tasks_cleanly_until_space_frees(
    tmp_path: Path, result_volume: Path
) -> None:
    data_dir = tmp_path / "data"
    headers, _ = new_key(data_dir)
    host = ImageHost()
    image = host.add("/noise.png", noise_png())
    server = ServeProcess(data_dir, *fixture_args("--storage", str(result_volume)))
    server.start()
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            credits_before = http.get("/v1/usage").json()["credits"]

            # Nearly full: no result fits, and readiness says why.
            leave_free(result_volume, 256 << 10)
            ready = httpx.get(f"{server.url}/readyz", timeout=10)
            assert ready.status_code == 503, ready.text
            assert any(
                problem.startswith("storage:") and "is full" in problem
                for problem in ready.json()["problems"]
            ), ready.text
            assert_failed_for_space(finished(http, submit(http, image)))
            assert stored_files(result_volume) == {FILLER}

            # Room for one result of two: the first is stored, then removed again.
            leave_free(result_volume, 3 * NOISE_PNG_BYTES // 2)
            assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
            assert_failed_for_space(finished(http, submit(http, image, n=2)))
            assert stored_files(result_volume) == {FILLER}

            usage = http.get("/v1/usage").json()
            assert usage["credits"] == credits_before, "a task that stored nothing is not charged"
            assert usage["tasks"]["failed"] == 2

            # Space frees up: new tasks complete again.
            (result_volume / FILLER).unlink()
            assert_healthy(server)
            detail = finished(http, submit(http, image, n=2))
            assert detail["status"] == "completed", detail
            for link in detail["results"]:
                assert httpx.get(link, timeout=10).content.startswith(b"\x89PNG")
            charged = http.get("/v1/usage").json()["credits"]
            assert charged["balance"] == credits_before["balance"] - 2
            assert charged["reserved"] == 0
            assert_healthy(server)
    finally:
        server.stop()
        host.close()
    assert_results_match_tasks(data_dir, result_volume)


# -- 2. the callback receiver is down past the retry schedule --------------


def delivery_rows(data_dir: Path) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(data_dir / "retouch.db")) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT id, task_id, status, attempts, next_attempt_at, last_status_code, last_error "
            "FROM callback_deliveries ORDER BY created_at, id"
        ).fetchall()
    return [dict(row) for row in rows]


def test_a_callback_receiver_down_past_the_retry_schedule_is_given_up_once(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    failing = Receiver(ca)
    failing.script = [Answer(500)] * 4  # the first try and the seed's three retries
    down_port = free_port()  # nothing listens: connections are refused
    down_url = f"https://127.0.0.1:{down_port}/hooks/retouch"
    data_dir = tmp_path / "data"
    headers, secret = new_key(data_dir)
    host = ImageHost()
    image = host.add("/a.png", noise_png())
    # The seed's schedule, unshortened: retries after 1 s, 2 s and 4 s.
    server = ServeProcess(
        data_dir, *fixture_args("--callback-ports", "any"), env={"SSL_CERT_FILE": str(ca_file)}
    )
    server.start()
    back: Receiver | None = None
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            erring = submit(http, image, callback_url=failing.url)
            refused = submit(http, image, callback_url=down_url)

            def given_up(task_id: str) -> dict[str, Any] | None:
                detail = dict(http.get(f"/v1/tasks/{task_id}").json())
                return detail if detail["callback"]["status"] == "failed" else None

            erring_detail = wait_for(lambda: given_up(erring), timeout=45, what="giving up")
            refused_detail = wait_for(lambda: given_up(refused), timeout=45, what="giving up")
            assert erring_detail["callback"] == {
                "status": "failed",
                "attempts": 4,
                "last_status_code": 500,
            }
            assert refused_detail["callback"] == {
                "status": "failed",
                "attempts": 4,
                "last_status_code": None,
            }
            # The task itself is untouched: completed, its results downloadable.
            for detail in (erring_detail, refused_detail):
                assert detail["status"] == "completed", detail
                assert httpx.get(detail["results"][0], timeout=10).status_code == 200

            # Four signed tries of one message, spread over the 7 s schedule.
            assert len(failing.received) == 4
            assert len({r.headers["webhook-id"] for r in failing.received}) == 1
            for received in failing.received:
                payload = Webhook(secret).verify(received.body, received.headers)
                assert payload["id"] == erring and payload["status"] == "completed"
            stamps = [int(r.headers["webhook-timestamp"]) for r in failing.received]
            assert stamps[-1] - stamps[0] >= 6, stamps

            # The receivers come back: nothing more arrives on its own.
            back = Receiver(ca, port=down_port)
            time.sleep(6)  # longer than the longest retry delay
            assert len(failing.received) == 4
            assert back.received == []

            # Asked to, the server delivers once more, under a new webhook-id.
            for task_id in (erring, refused):
                response = http.post(f"/v1/tasks/{task_id}/callback/redeliver")
                assert response.status_code == 200, response.text
            for task_id in (erring, refused):
                wait_for(
                    lambda task_id=task_id: (
                        http.get(f"/v1/tasks/{task_id}").json()["callback"]
                        == {"status": "delivered", "attempts": 1, "last_status_code": 200}
                    ),
                    timeout=20,
                    what="the redelivery",
                )
            time.sleep(1.5)
            assert len(failing.received) == 5 and len(back.received) == 1
            assert (
                failing.received[4].headers["webhook-id"]
                != failing.received[0].headers["webhook-id"]
            )
            assert (
                Webhook(secret).verify(back.received[0].body, back.received[0].headers)["id"]
                == refused
            )
            assert_healthy(server)
    finally:
        server.stop()
        failing.close()
        if back is not None:
            back.close()
        host.close()

    deliveries = delivery_rows(data_dir)
    assert [(d["status"], d["attempts"]) for d in deliveries if d["status"] == "failed"] == [
        ("failed", 4),
        ("failed", 4),
    ]
    assert {d["status"] for d in deliveries} == {"failed", "delivered"}
    assert all(d["next_attempt_at"] is None for d in deliveries), "nothing is left to retry"
    refused_error = next(
        d["last_error"] for d in deliveries if d["task_id"] == refused and d["status"] == "failed"
    )
    assert "ConnectError" in refused_error
    assert_results_match_tasks(data_dir, data_dir / "results")


# -- 3. the clock jumps past the links' expiry ------------------------------


@pytest.fixture(scope="module")
def clockshift(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LD_PRELOAD shim, built with the machine's gcc (part of the machine)."""
    library = tmp_path_factory.mktemp("clockshift") / "clockshift.so"
    source = REPO / "tests" / "clockshift.c"
    build = ["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"]
    subprocess.run(build, check=True)
    return library


def stalls_the_first_time(data: bytes, release: threading.Event) -> Callable[[], Iterator[bytes]]:
    """Chunks of an image whose first download stops halfway until `release`."""
    downloads = itertools.count()

    def chunks() -> Iterator[bytes]:
        first = next(downloads) == 0
        yield data[: len(data) // 2]
        if first:
            release.wait(30)
        yield data[len(data) // 2 :]

    return chunks


def test_a_clock_jump_past_expiry_expires_links_and_loses_no_task(
    tmp_path: Path, clockshift: Path
) -> None:
    offset_file = tmp_path / "clock-offset"
    offset_file.write_text("0")
    jump = 25 * 3600  # past the default 24 h life of result links
    data_dir = tmp_path / "data"
    headers, _ = new_key(data_dir)
    host = ImageHost()
    image = host.add("/a.png", noise_png())
    release = threading.Event()
    held = host.stream("/held.png", stalls_the_first_time(noise_png(), release))
    lease = 12.0  # renewed every 4 s; the janitor takes one back after 6 s seen expired
    server = ServeProcess(
        data_dir,
        *fixture_args(
            "--steps", "150", "--janitor-interval-seconds", "1", "--lease-seconds", str(lease)
        ),
        env={"LD_PRELOAD": str(clockshift), "CLOCKSHIFT_FILE": str(offset_file)},
    )
    server.start()
    results_dir = data_dir / "results"
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            before = finished(http, submit(http, image))
            assert before["status"] == "completed", before
            link = before["results"][0]
            assert httpx.get(link, timeout=10).status_code == 200
            assert (results_dir / before["id"]).is_dir()

            # One task on the engine (its progress renews its lease at every step),
            # the next one claimed and fetching its input (renewed every lease/3).
            running = submit(http, image)
            fetching = submit(http, held)
            wait_for(
                lambda: (
                    http.get(f"/v1/tasks/{running}").json()["progress"] > 0
                    and "/held.png" in host.requests
                ),
                timeout=30,
                what="one task to run and the next to fetch",
            )
            offset_file.write_text(str(jump))

            # The link expired: the seed's 403 body says so.
            expired = wait_for(
                lambda: (r := httpx.get(link, timeout=10)).status_code == 403 and r,
                timeout=10,
                what="the link to expire",
            )
            error = expired.json()["error"]
            assert (error["code"], error["type"], error["param"]) == (
                403,
                "permission_error",
                "expires",
            )
            assert "expired" in error["message"]

            # The jump made every lease look expired at once. Their workers renewed
            # them before the janitor would take them back: the fetching task (its
            # lease renewed only by its keeper) stays with its worker.
            time.sleep(lease * 0.75)
            assert http.get(f"/v1/tasks/{fetching}").json()["status"] == "processing"
            release.set()

            # The janitor deletes the expired files (and marks their task purged).
            wait_for(
                lambda: not (results_dir / before["id"]).exists(),
                timeout=20,
                what="the janitor to delete the expired results",
            )
            for task_id in (running, fetching):
                detail = finished(http, task_id, timeout=45)
                assert detail["status"] == "completed", detail
                assert httpx.get(detail["results"][0], timeout=10).status_code == 200

            # New work runs on the new time, with fresh links.
            fresh = finished(http, submit(http, image))
            assert fresh["status"] == "completed", fresh
            assert abs(fresh["created"] - (time.time() + jump)) < 120, "the server's clock moved"
            assert httpx.get(fresh["results"][0], timeout=10).status_code == 200
            assert_healthy(server)
    finally:
        release.set()
        server.stop()
        host.close()

    rows = {row["id"]: row for row in task_rows(data_dir)}
    assert rows[before["id"]]["results_purged"] == 1
    assert rows[running]["attempts"] == rows[fetching]["attempts"] == 1
    assert not any(rows[task_id]["results_purged"] for task_id in (running, fetching, fresh["id"]))
    assert_results_match_tasks(data_dir, results_dir)
