"""Restart safety with real processes and real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support import (
    ImageHost,
    ServeProcess,
    demo_serve_args,
    free_port,
    png_bytes,
    retouch_cli,
    wait_for,
)

pytestmark = pytest.mark.acceptance


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def is_worker(pid: int) -> bool:
    """The worker child (not multiprocessing's resource tracker, say)."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return b"from multiprocessing.spawn import spawn_main" in b" ".join(command)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_kill_9_mid_denoise_then_restart_runs_every_task(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    secret = retouch_cli("keys", "create", "--name", "alice", "--data-dir", str(data_dir)).stdout
    headers = {"Authorization": f"Bearer {secret.strip()}"}
    host = ImageHost()
    image = host.add("/cat.png", png_bytes((512, 512)))
    body = {
        "model": "qwen-image-edit",
        "prompt": "make it night",
        "image_urls": [image],
        "size": "512x512",
    }
    slow = ServeProcess(data_dir, *demo_serve_args(60))
    slow.start()
    try:
        with httpx.Client(base_url=slow.url, headers=headers, timeout=10) as http:
            running = http.post("/v1/images/generations", json=body).json()
            queued = http.post("/v1/images/generations", json=body).json()
            wait_for(
                lambda: http.get(f"/v1/tasks/{running['id']}").json()["progress"] > 0,
                timeout=90,
            )
        assert slow.process is not None
        workers = children_of(slow.process.pid)
        assert workers, "the server runs its worker in a child process"
        assert slow.kill(signal.SIGKILL) == -signal.SIGKILL
        # The worker child follows the server down instead of holding the task.
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout=10)
    finally:
        slow.stop()

    fast = ServeProcess(data_dir, *demo_serve_args(2))
    fast.start()
    try:
        with httpx.Client(base_url=fast.url, headers=headers, timeout=10) as http:

            def finished(task: dict[str, Any]) -> dict[str, Any] | None:
                detail = dict(http.get(f"/v1/tasks/{task['id']}").json())
                return detail if detail["status"] not in ("pending", "processing") else None

            rerun = wait_for(lambda: finished(running), timeout=120)
            after = wait_for(lambda: finished(queued), timeout=120)
        assert rerun["status"] == "completed", rerun
        assert after["status"] == "completed", after
        assert httpx.get(rerun["results"][0]).status_code == 200
        assert "were running when the server last stopped" in fast.log()
        # Nothing of the killed attempt is left beside the results: no partial file.
        results = data_dir / "results"
        stored = {str(path.relative_to(results)) for path in results.rglob("*") if path.is_file()}
        linked = {urlsplit(link).path.removeprefix("/v1/files/") for link in rerun["results"]}
        linked |= {urlsplit(link).path.removeprefix("/v1/files/") for link in after["results"]}
        assert len(linked) == 2 and stored == linked
        assert httpx.get(f"{fast.url}/readyz").status_code == 200
    finally:
        fast.stop()
        host.close()


def test_a_model_that_cannot_load_stops_startup_with_one_sentence(tmp_path: Path) -> None:
    result = retouch_cli(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        "1",
        "--model",
        str(tmp_path / "no-such-checkpoint"),
        check=False,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("retouch: ") and "no-such-checkpoint" in last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [["serve", "--port", "1"], ["worker", "--model", "fixture"], ["keys", "list"], ["migrate"]],
    ids=["serve", "worker", "keys", "migrate"],
)
def test_an_unreachable_database_stops_every_command_with_one_sentence(
    tmp_path: Path, command: list[str]
) -> None:
    """No traceback, the URL named with its password hidden, and what to check."""
    url = f"postgresql+psycopg://retouch:s3cret-password@127.0.0.1:{free_port()}/retouch"
    result = retouch_cli(
        *command, "--database-url", url, "--data-dir", str(tmp_path / "data"), check=False
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot open the database at postgresql+psycopg://retouch:***@127.0.0.1:" in lines[0]
    assert "Connection refused" in lines[0] and "check --database-url" in lines[0]
    assert "s3cret-password" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("mysql+pymysql://u:pw@db/retouch", "Retouch keeps its data in SQLite or PostgreSQL"),
        ("not a url", "that is no database URL"),
        ("postgresql+nosuchdriver://u@db/retouch", "Can't load plugin"),
        ("sqlite:////nonexistent/folder/retouch.db", "that its folder exists"),
    ],
    ids=["other-database", "not-a-url", "unknown-driver", "missing-folder"],
)
def test_a_database_url_that_cannot_work_is_explained(tmp_path: Path, url: str, said: str) -> None:
    result = retouch_cli(
        "keys", "list", "--database-url", url, "--data-dir", str(tmp_path), check=False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert said in result.stderr and "--database-url" in result.stderr


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (
            ["serve", "--port"],
            "Cannot listen on 127.0.0.1:{port}: Address already in use; another server is "
            "using it; stop that one or choose another --port.",
        ),
        (
            ["worker", "--worker-port"],
            "Cannot serve health and metrics on 127.0.0.1:{port}: Address already in use; "
            "choose another --worker-port.",
        ),
    ],
    ids=["serve", "worker"],
)
def test_a_port_already_taken_stops_startup_before_the_models_load(
    tmp_path: Path, command: list[str], said: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = retouch_cli(
            *command, str(port), "--data-dir", str(tmp_path / "data"), "--model", "fixture",
            check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"retouch: {said.format(port=port)}"]


def test_an_s3_location_without_a_bucket_is_a_usage_error(tmp_path: Path) -> None:
    result = retouch_cli(
        "serve", "--data-dir", str(tmp_path / "data"), "--storage", "s3://", check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "storage: 's3://' names no bucket: use s3://BUCKET[/PREFIX]" in result.stderr


def test_two_servers_cannot_share_a_data_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = ServeProcess(data_dir, "--model", "fixture")
    first.start()
    try:
        second = retouch_cli(
            "serve", "--data-dir", str(data_dir), "--model", "fixture", "--port", "1", check=False
        )
        assert second.returncode == 1
        assert "Another `retouch serve` is already using" in second.stderr
    finally:
        first.stop()


def fixture_server(
    data_dir: Path, *args: str
) -> tuple[ServeProcess, dict[str, str], dict[str, Any], ImageHost]:
    """A started `retouch serve --model fixture` with ARGS, a key's headers, an edit
    body and the image host it fetches from (the caller stops both)."""
    secret = retouch_cli("keys", "create", "--name", "alice", "--data-dir", str(data_dir)).stdout
    host = ImageHost()
    body = {
        "model": "qwen-image-edit",
        "prompt": "make it night",
        "image_urls": [host.add("/cat.png", png_bytes((512, 512)))],
    }
    flags = ("--model", "fixture", "--allow-private-networks", "--fetch-ports", "any")
    server = ServeProcess(data_dir, *flags, *args).start()
    return server, {"Authorization": f"Bearer {secret.strip()}"}, body, host


def test_a_dead_worker_childs_task_runs_again_at_once(tmp_path: Path) -> None:
    """The worker child dies mid-task (SIGKILL, the OOM killer) while the server
    lives: the server restarts it and hands its task straight back to the queue,
    not after the 60 s lease (and its confirmation) has run out."""
    data_dir = tmp_path / "data"
    server, headers, body, host = fixture_server(data_dir, "--steps", "100")
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            task_id = http.post("/v1/images/generations", json=body).json()["id"]
            wait_for(lambda: http.get(f"/v1/tasks/{task_id}").json()["progress"] > 0, timeout=30)
            assert server.process is not None
            (worker,) = [pid for pid in children_of(server.process.pid) if is_worker(pid)]
            os.kill(worker, signal.SIGKILL)
            done = wait_for(
                lambda: (
                    (d := http.get(f"/v1/tasks/{task_id}").json())["status"] == "completed" and d
                ),
                timeout=30,
                what="the task to run again on the restarted worker",
            )
            assert httpx.get(done["results"][0]).status_code == 200
        assert "1 task(s) of the dead worker went back to the queue" in server.log()
        assert worker not in children_of(server.process.pid)  # a new one runs it
    finally:
        server.stop()
        host.close()


def test_sigterm_lets_the_running_task_finish_and_exits_0(tmp_path: Path) -> None:
    """What `systemctl stop` and `docker stop` send: the running edit finishes and is
    completed, the task behind it stays queued for the next start, and a client still
    following a task on an event stream does not hold the shutdown."""
    data_dir = tmp_path / "data"
    server, headers, body, host = fixture_server(
        data_dir, "--steps", "150", "--shutdown-grace-seconds", "60"
    )
    stream_open, stream_ended = threading.Event(), threading.Event()
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            running = http.post("/v1/images/generations", json=body).json()["id"]
            queued = http.post("/v1/images/generations", json=body).json()["id"]
            wait_for(lambda: http.get(f"/v1/tasks/{running}").json()["progress"] > 0, timeout=30)

        def follow() -> None:
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.Client(base_url=server.url, headers=headers, timeout=60) as client,
                client.stream("GET", f"/v1/tasks/{queued}/events") as events,
            ):
                stream_open.set()
                for _line in events.iter_lines():
                    pass
            stream_ended.set()

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        assert stream_open.wait(10), "the event stream did not open"
        assert server.kill(signal.SIGTERM) == 0, server.log()[-3000:]
        assert stream_ended.wait(5)
    finally:
        server.stop()
        host.close()
    log = server.log()
    assert "SIGTERM: stopping" in log and "draining" in log
    with sqlite3.connect(data_dir / "retouch.db") as conn:
        rows = dict(conn.execute("SELECT id, status || ' ' || attempts FROM tasks").fetchall())
    assert rows[running] == "completed 1"
    assert rows[queued] in ("pending 0", "pending 1")
