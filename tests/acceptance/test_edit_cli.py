"""`retouch edit` and `retouch tasks` as a user runs them, against a real
`retouch serve --model fixture`."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.support import ServeProcess, png_bytes, retouch_cli

pytestmark = pytest.mark.acceptance

TASK_ID = re.compile(r"^task-unified-\d+-[a-z0-9]{8}$")
STEPS = 100  # x 0.02 s per step: about 2 s a task, time enough to interrupt one


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edit-cli") / "data"


@pytest.fixture(scope="module")
def secret(data_dir: Path) -> str:
    return retouch_cli(
        "keys", "create", "--name", "alice", "--data-dir", str(data_dir)
    ).stdout.strip()


@pytest.fixture(scope="module")
def server(data_dir: Path, secret: str) -> Iterator[ServeProcess]:
    process = ServeProcess(data_dir, "--model", "fixture", "--steps", str(STEPS))
    process.start()
    yield process
    process.stop()
    check = retouch_cli("ledger", "check", "--data-dir", str(data_dir), check=False)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture
def env(server: ServeProcess, secret: str) -> dict[str, str]:
    return {**os.environ, "RETOUCH_BASE_URL": server.url, "RETOUCH_API_KEY": secret}


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes((600, 400), (200, 80, 40)))
    return path


def cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return retouch_cli(*args, check=False, timeout=60, env=env, cwd=cwd)


def test_an_edit_is_uploaded_waited_for_and_saved(
    env: dict[str, str], photo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.png"
    result = cli("edit", str(photo), "make it blue", "-o", str(out), "--size", "512x512",
                 "--seed", "7", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    assert TASK_ID.match(task_id), result.stdout
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (512, 512))
    # Not a terminal: plain progress lines, then where the result went.
    assert f"{task_id}: processing" in result.stderr
    assert f"{task_id}: completed" in result.stderr
    assert f"saved {out}" in result.stderr
    assert "\r" not in result.stderr

    shown = cli("tasks", "show", task_id, env=env)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["id"] == task_id and detail["status"] == "completed"
    assert len(detail["results"]) == 1

    waited = cli("tasks", "wait", task_id, "-o", f"{tmp_path / 'again'}/", env=env)
    assert (waited.returncode, waited.stdout.strip()) == (0, f"{task_id} completed")
    assert (tmp_path / "again" / f"{task_id}.png").is_file()

    refused = cli("tasks", "cancel", task_id, env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("retouch: ") and "Traceback" not in refused.stderr


def test_several_results_are_numbered(env: dict[str, str], photo: Path, tmp_path: Path) -> None:
    result = cli("edit", str(photo), "make it blue", "-n", "2", "--size", "512x512",
                 "-o", "edited.png", env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("edited*")) == ["edited-1.png", "edited-2.png"]


def test_a_refused_image_exits_1_with_the_servers_message(
    env: dict[str, str], tmp_path: Path
) -> None:
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes((200, 180)))
    result = cli("edit", str(small), "make it blue", "-o", str(tmp_path / "out.png"), env=env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("retouch: ")
    assert "200x180" in result.stderr and "384-3072" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_usage_errors_exit_2(env: dict[str, str], photo: Path, tmp_path: Path) -> None:
    missing_prompt = cli("edit", str(photo), env=env)
    assert missing_prompt.returncode == 2 and "PROMPT" in missing_prompt.stderr
    no_file = cli("edit", str(tmp_path / "nope.png"), "make it blue", env=env)
    assert no_file.returncode == 2 and "neither an http(s) URL nor a file" in no_file.stderr
    bad_size = cli("edit", str(photo), "make it blue", "--size", "big", env=env)
    assert bad_size.returncode == 2 and "1024x1024" in bad_size.stderr
    keyless = {k: v for k, v in env.items() if k != "RETOUCH_API_KEY"}
    no_key = cli("edit", str(photo), "make it blue", env=keyless)
    assert no_key.returncode == 2 and "RETOUCH_API_KEY" in no_key.stderr
    assert "130  interrupted" in cli("edit", "--help", env=env).stdout


@pytest.mark.parametrize("cancel", [False, True])
def test_ctrl_c(env: dict[str, str], photo: Path, tmp_path: Path, cancel: bool) -> None:
    flags = ["--cancel-on-interrupt"] if cancel else []
    process = subprocess.Popen(
        [sys.executable, "-m", "retouch", "edit", str(photo), "make it blue", *flags],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    task_id = process.stdout.readline().strip()
    assert TASK_ID.match(task_id)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    status = json.loads(cli("tasks", "show", task_id, env=env).stdout)["status"]
    if cancel:
        assert status == "cancelled" and f"task {task_id} is cancelled" in err
    else:
        assert f"retouch tasks cancel {task_id}" in err
        assert status in ("pending", "processing")
        cancelled = cli("tasks", "cancel", task_id, env=env)
        assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"{task_id} cancelled")


def test_on_a_terminal_progress_is_one_line_and_ctrl_c_asks(
    env: dict[str, str], photo: Path, tmp_path: Path
) -> None:
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "retouch", "edit", str(photo), "make it blue"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=env,
        cwd=tmp_path,
    )
    os.close(terminal)
    try:
        assert process.stdout is not None
        task_id = process.stdout.readline().decode().strip()
        screen = read_until(controller, b"processing")
        process.send_signal(signal.SIGINT)
        screen += read_until(controller, b"[Y/n]")
        os.write(controller, b"y\n")
        screen += read_until(controller, b"cancelled")
        assert process.wait(30) == 130
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        os.close(controller)
    text = screen.decode(errors="replace")
    assert f"\r{task_id}: processing" in text and "\x1b[K" in text
    assert f"Cancel task {task_id} on the server?" in text
    assert f"task {task_id} is cancelled" in text


def read_until(fd: int, marker: bytes, timeout: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, seen
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            seen += os.read(fd, 4096)
    return seen
