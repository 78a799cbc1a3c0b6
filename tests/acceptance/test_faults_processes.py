"""Faults of processes, with real processes and real signals: `retouch serve` killed
(SIGKILL) while a client uploads an image and while its worker stores results, a
`retouch worker` killed while it finalizes a task, and PostgreSQL restarted while
tasks run. After each: every task ends (or runs again and ends), the ledger is
consistent, no partial or orphaned file is left in the storage, and the
processes answer `/readyz` again.

The server killed mid-denoise is `test_restart.py::
test_kill_9_mid_denoise_then_restart_runs_every_task` (which also checks, after
the rerun, that the results directory holds exactly the completed tasks' files).

A real SeaweedFS (S3) sits behind `StallingProxy`, a TCP proxy that lets one
chosen PUT send its headers and half its body and then forwards nothing more:
the uploading process is provably inside the result upload when it is killed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.postgres import PrivatePostgres, private_postgres_fixture  # noqa: F401
from tests.seaweed import SeaweedS3, seaweedfs_fixture  # noqa: F401 (the `seaweedfs` fixture)
from tests.support import (
    ImageHost,
    ServeProcess,
    WorkerProcess,
    png_bytes,
    retouch_cli,
    wait_for,
)

pytestmark = pytest.mark.acceptance

TERMINAL = {"completed", "failed", "cancelled"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOCAL_ARGS = ("--allow-private-networks", "--fetch-ports", "any")
TRACEBACK = '"exception": "Traceback'  # a JSON log line with one


# -- a TCP proxy that stalls one upload --------------------------------------


class StallingProxy:
    """A TCP proxy on loopback in front of a real server.

    `stall_once(pattern)` arms it: the first request whose bytes match `pattern`
    passes its headers and half of its body (by its Content-Length), then nothing
    more of that connection is forwarded, so the client waits inside its upload
    and the server holds a partial request. `stalled` is set at that moment;
    `dropped` once the stalled client has gone away, when the proxy closes the
    upstream connection too (the server sees the body cut short); `cut()` hangs
    up on both sides of the stalled request itself. Everything else passes
    untouched."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.stalled = threading.Event()
        self.dropped = threading.Event()
        self._pattern: re.Pattern[bytes] | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stalled_pair: tuple[socket.socket, socket.socket] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def stall_once(self, pattern: re.Pattern[bytes]) -> None:
        with self._lock:
            self._pattern = pattern

    def cut(self) -> None:
        """Hang up the stalled request on both sides (its client may retry)."""
        assert self._stalled_pair is not None, "nothing is stalled"
        _close(*self._stalled_pair)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                return
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._backward, args=(upstream, client), daemon=True).start()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        allowance: int | None = None  # bytes this connection may still pass, once stalled
        while data := _receive(client):
            if allowance is None:
                allowance = self._claim(data)
            try:
                if allowance is None:
                    upstream.sendall(data)
                    continue
                upstream.sendall(data[:allowance])
            except OSError:
                break
            allowance = max(0, allowance - len(data))
            if allowance == 0 and not self.stalled.is_set():
                self._stalled_pair = (client, upstream)
                self.stalled.set()
        if allowance is not None:
            self.dropped.set()
        _close(client, upstream)

    def _backward(self, upstream: socket.socket, client: socket.socket) -> None:
        while data := _receive(upstream):
            try:
                client.sendall(data)
            except OSError:
                break
        _close(client, upstream)

    def _claim(self, data: bytes) -> int | None:
        """How many bytes of `data` may pass, if it starts the request to stall."""
        with self._lock:
            match = self._pattern.search(data) if self._pattern else None
            if match is None:
                return None
            self._pattern = None
        head_end = data.index(b"\r\n\r\n", match.start()) + 4
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", data[match.start() : head_end])
        assert length is not None, data[:head_end]
        return head_end + int(length[1]) // 2


def _receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


@pytest.fixture
def proxied_seaweedfs(seaweedfs: SeaweedS3) -> Iterator[tuple[SeaweedS3, StallingProxy, str]]:
    """SeaweedFS, a stalling proxy in front of it and a fresh bucket."""
    bucket = f"faults-{secrets.token_hex(4)}"
    seaweedfs.admin.create_bucket(Bucket=bucket)
    proxy = StallingProxy(int(seaweedfs.endpoint_url.rsplit(":", 1)[1]))
    try:
        yield seaweedfs, proxy, bucket
    finally:
        proxy.close()


# -- helpers -----------------------------------------------------------------


def _s3_env(seaweedfs: SeaweedS3) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "AWS_DEFAULT_REGION": seaweedfs.region,
    }


def _objects(seaweedfs: SeaweedS3, bucket: str, prefix: str = "") -> set[str]:
    listing = seaweedfs.admin.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for item in listing.get("Contents", [])}


def _files(root: Path) -> set[str]:
    """Every file under `root` (hidden ones too), relative to it."""
    if not root.exists():
        return set()
    return {str(path.relative_to(root)) for path in root.rglob("*") if not path.is_dir()}


def _query(database_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def _sqlite(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'retouch.db').resolve()}"


def _result_keys(database_url: str, task_id: str) -> set[str]:
    """The keys of the results a task was completed with (its attempt's run tag in each)."""
    rows = _query(database_url, "SELECT result_keys FROM tasks WHERE id = :id", id=task_id)
    keys = rows[0]["result_keys"]
    return set(json.loads(keys) if isinstance(keys, str) else keys or [])


def _first_result_only(objects: set[str], task_id: str) -> None:
    """Exactly one object: the first result image of one attempt at the task."""
    assert len(objects) == 1, objects
    assert re.fullmatch(rf"results/{task_id}/0-[0-9a-f]{{8}}\.png", objects.pop()), objects


def _task_row(database_url: str, task_id: str) -> dict[str, Any]:
    rows = _query(
        database_url,
        "SELECT status, attempts, lease_owner, error_message FROM tasks WHERE id = :id",
        id=task_id,
    )
    return rows[0]


def _ledger_kinds(database_url: str) -> dict[str, int]:
    rows = _query(
        database_url,
        "SELECT kind, count(*) AS n FROM ledger_entries WHERE task_id IS NOT NULL GROUP BY kind",
    )
    return {row["kind"]: int(row["n"]) for row in rows}


def _ledger_check(database_url: str, cli_dir: Path) -> None:
    check = retouch_cli(
        "ledger", "check", "--database-url", database_url, "--data-dir", str(cli_dir),
        check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def _key(data_dir: Path, database_url: str | None = None) -> dict[str, str]:
    where = ["--data-dir", str(data_dir)]
    if database_url is not None:
        where += ["--database-url", database_url]
    secret = retouch_cli("keys", "create", "--name", "faults", *where).stdout.strip()
    return {"Authorization": f"Bearer {secret}"}


def _two_takes(image_host: ImageHost, **extra: Any) -> dict[str, Any]:
    """An edit with two results, so a test can stall the second one's upload."""
    return {
        "model": "qwen-image-edit",
        "prompt": "two takes",
        "image_urls": [image_host.add("/a.png", png_bytes((512, 512)))],
        "n": 2,
        **extra,
    }


def _submit(api: ServeProcess, headers: dict[str, str], body: dict[str, Any]) -> str:
    answer = httpx.post(f"{api.url}/v1/images/generations", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def _detail(api: ServeProcess, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{api.url}/v1/tasks/{task_id}", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _finished(
    api: ServeProcess, headers: dict[str, str], task_id: str, timeout: float = 60
) -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        detail = _detail(api, headers, task_id)
        return detail if detail["status"] in TERMINAL else None

    return dict(wait_for(terminal, timeout=timeout, interval=0.2, what=f"{task_id} to end"))


def _downloads(links: list[str]) -> None:
    for link in links:
        answer = httpx.get(link, timeout=30)
        assert answer.status_code == 200, (link, answer.text)
        assert answer.content.startswith(PNG_MAGIC)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# -- the server killed while a client uploads ---------------------------------


def _open_files_under(pid: int, folder: Path) -> list[str]:
    """Files under `folder` that process `pid` holds open (deleted ones too)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(f"{folder}/"):
            held.append(target)
    return held


def _multipart_upload(size: int, authorization: str) -> tuple[bytes, bytes]:
    """The head (request line, headers) and body of a `POST /v1/uploads` whose file
    part is `size` bytes: more than Starlette keeps in memory (1 MiB)."""
    boundary = secrets.token_hex(8)
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body += PNG_MAGIC + secrets.token_bytes(size) + f"\r\n--{boundary}--\r\n".encode()
    head = (
        "POST /v1/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: {authorization}\r\n\r\n"
    ).encode()
    return head, body


def test_kill_9_mid_client_upload_leaves_no_partial_file(tmp_path: Path) -> None:
    """SIGKILL while `POST /v1/uploads` is still receiving its body (the server has
    spooled part of it to a temporary file): nothing of it is left on disk, and
    after a restart the same upload goes through and feeds a task."""
    data_dir = tmp_path / "data"
    spool = tmp_path / "spool"  # the server's TMPDIR: where Starlette spools big parts
    spool.mkdir()
    headers = _key(data_dir)
    args = ("--model", "fixture", *LOCAL_ARGS)
    killed = ServeProcess(data_dir, *args, env={"TMPDIR": str(spool)})
    killed.start()
    head, body = _multipart_upload(4 << 20, headers["Authorization"])
    client = socket.create_connection(("127.0.0.1", killed.port))
    try:
        client.sendall(head + body[: len(body) // 2])
        assert killed.process is not None
        pid = killed.process.pid
        wait_for(lambda: _open_files_under(pid, spool), timeout=30, what="the upload to spool")
        assert killed.kill(signal.SIGKILL) == -signal.SIGKILL
    finally:
        client.close()
        killed.stop()
    assert _files(spool) == set(), "a killed upload left a temporary file"
    assert _files(data_dir / "results") == set(), "a killed upload left a partial image"

    server = ServeProcess(data_dir, *args, env={"TMPDIR": str(spool)})
    server.start()
    try:
        assert _ready(server.url)
        upload = httpx.post(
            f"{server.url}/v1/uploads",
            headers=headers,
            files={"file": ("photo.png", png_bytes((512, 512)), "image/png")},
            timeout=30,
        )
        assert upload.status_code == 200, upload.text
        uploaded = upload.json()
        task_id = _submit(
            server,
            headers,
            {"model": "qwen-image-edit", "prompt": "brighter", "image_urls": [uploaded["url"]]},
        )
        detail = _finished(server, headers, task_id)
        assert detail["status"] == "completed", detail
        _downloads(detail["results"])
        results = _result_keys(_sqlite(data_dir), task_id)
        assert _files(data_dir / "results") == {f"uploads/{uploaded['id']}", *results}
    finally:
        server.stop()


# -- the server killed while its worker stores results ------------------------


def _second_result_put(bucket: str, prefix: str) -> re.Pattern[bytes]:
    """The request that stores a task's second result image."""
    return re.compile(rf"PUT /{bucket}/{prefix}/task-unified-[^/ ]+/1-[0-9a-f]{{8}}\.png ".encode())


@pytest.mark.parametrize("max_attempts", [2, 1], ids=["runs-again", "given-up"])
def test_kill_9_mid_result_upload_then_restart(
    tmp_path: Path,
    image_host: ImageHost,
    proxied_seaweedfs: tuple[SeaweedS3, StallingProxy, str],
    max_attempts: int,
) -> None:
    """`retouch serve` (SQLite, S3 results) is killed while its worker uploads the
    second of two result images: the first is stored, the second half sent. The
    worker child dies with the server, the half-sent object never appears, and
    after a restart the task runs again and completes with exactly its own two
    objects in the bucket, or, with its attempts used up, fails and releases its
    credits, and the janitor deletes the object the killed attempt left."""
    seaweedfs, proxy, bucket = proxied_seaweedfs
    data_dir = tmp_path / "data"
    headers = _key(data_dir)
    args = (
        "--model", "fixture", *LOCAL_ARGS,
        "--storage", f"s3://{bucket}/results", "--s3-endpoint-url", proxy.url,
        "--max-attempts", str(max_attempts), "--janitor-interval-seconds", "1",
    )  # fmt: skip
    body = _two_takes(image_host)
    proxy.stall_once(_second_result_put(bucket, "results"))
    killed = ServeProcess(data_dir, *args, env=_s3_env(seaweedfs))
    try:
        killed.start()
        task_id = _submit(killed, headers, body)
        wait_for(proxy.stalled.is_set, timeout=30, what="the second result upload to stall")
        assert _detail(killed, headers, task_id)["status"] == "processing"
        _first_result_only(_objects(seaweedfs, bucket), task_id)
        assert killed.kill(signal.SIGKILL) == -signal.SIGKILL
        # The worker child follows the server down; its connection goes with it.
        wait_for(proxy.dropped.is_set, timeout=30, what="the killed upload to hang up")
    finally:
        killed.stop()
    _first_result_only(_objects(seaweedfs, bucket), task_id)  # no half object

    server = ServeProcess(data_dir, *args, env=_s3_env(seaweedfs))
    server.start()
    try:
        detail = _finished(server, headers, task_id)
        row = _task_row(_sqlite(data_dir), task_id)
        if max_attempts == 2:
            assert detail["status"] == "completed", detail
            assert row["attempts"] == 2
            _downloads(detail["results"])
            # The results of the attempt that completed, and nothing of the killed one.
            expected = {f"results/{key}" for key in _result_keys(_sqlite(data_dir), task_id)}
            assert len(expected) == 2 and _objects(seaweedfs, bucket) == expected
            assert _ledger_kinds(_sqlite(data_dir)) == {"reserve": 1, "capture": 1}
        else:
            assert detail["status"] == "failed", detail
            assert "stopped 1 time(s)" in detail["error"]["message"]
            wait_for(
                lambda: not _objects(seaweedfs, bucket),
                timeout=30,
                what="the janitor to delete what the killed attempt left",
            )
            assert _ledger_kinds(_sqlite(data_dir)) == {"reserve": 1, "release": 1}
        assert "were running when the server last stopped" in server.log()
        assert _ready(server.url)
    finally:
        server.stop()


# -- a worker killed while it finalizes a task --------------------------------


@pytest.mark.parametrize("max_attempts", [2, 1], ids=["runs-again", "given-up"])
def test_kill_9_worker_during_finalize(
    tmp_path: Path,
    image_host: ImageHost,
    database_url: str,
    proxied_seaweedfs: tuple[SeaweedS3, StallingProxy, str],
    max_attempts: int,
) -> None:
    """A `retouch worker` (PostgreSQL, S3) is killed inside finalize: its first
    result image stored, the second half sent. Another worker takes the task once
    the lease has expired and completes it exactly once (one capture, links that
    download, only its own objects in the bucket); with no attempt left, the task
    fails, its credits are released and nothing the killed attempt stored is kept."""
    seaweedfs, proxy, bucket = proxied_seaweedfs
    headers = _key(tmp_path / "cli", database_url)
    shared = (
        "--database-url", database_url, "--model", "fixture", *LOCAL_ARGS,
        "--storage", f"s3://{bucket}/results", "--lease-seconds", "3",
    )  # fmt: skip
    env = _s3_env(seaweedfs)
    api = ServeProcess(
        tmp_path / "api",
        *shared, "--no-worker", "--s3-endpoint-url", seaweedfs.endpoint_url,
        "--max-attempts", str(max_attempts), "--janitor-interval-seconds", "1",
        env=env,
    )  # fmt: skip
    through_proxy = (*shared, "--s3-endpoint-url", proxy.url)
    killed = WorkerProcess(tmp_path / "killed", *through_proxy, env=env)
    rescuer = WorkerProcess(tmp_path / "rescuer", *through_proxy, env=env)
    proxy.stall_once(_second_result_put(bucket, "results"))
    try:
        api.start()
        killed.start()
        task_id = _submit(api, headers, _two_takes(image_host))
        wait_for(proxy.stalled.is_set, timeout=30, what="the second result upload to stall")
        row = _task_row(database_url, task_id)
        assert row["status"] == "processing" and row["lease_owner"] in killed.log()
        _first_result_only(_objects(seaweedfs, bucket), task_id)
        assert killed.kill(signal.SIGKILL) == -signal.SIGKILL
        wait_for(proxy.dropped.is_set, timeout=30, what="the killed upload to hang up")
        rescuer.start()
        detail = _finished(api, headers, task_id)
        row = _task_row(database_url, task_id)
        assert row["attempts"] == max_attempts
        if max_attempts == 2:
            assert detail["status"] == "completed", detail
            assert row["lease_owner"] is None
            _downloads(detail["results"])
            expected = {f"results/{key}" for key in _result_keys(database_url, task_id)}
            assert len(expected) == 2 and _objects(seaweedfs, bucket) == expected
            assert _ledger_kinds(database_url) == {"reserve": 1, "capture": 1}
        else:
            assert detail["status"] == "failed", detail
            wait_for(
                lambda: not _objects(seaweedfs, bucket),
                timeout=30,
                what="the janitor to delete what the killed attempt left",
            )
            assert _ledger_kinds(database_url) == {"reserve": 1, "release": 1}
        _ledger_check(database_url, tmp_path / "cli")
        assert _ready(api.url) and _ready(rescuer.url)
    finally:
        for process in (api, killed, rescuer):
            process.stop()


def test_a_worker_frozen_during_finalize_leaves_the_winners_results_alone(
    tmp_path: Path,
    image_host: ImageHost,
    database_url: str,
    proxied_seaweedfs: tuple[SeaweedS3, StallingProxy, str],
) -> None:
    """A worker frozen (SIGSTOP) inside finalize loses its lease; another worker
    runs the task again and completes it. When the first one wakes up (SIGCONT)
    its upload goes through on a retry and its completion is refused, and it must
    not delete the result objects: every attempt stores a task's results under
    the same keys, so they are the completed task's results now."""
    seaweedfs, proxy, bucket = proxied_seaweedfs
    headers = _key(tmp_path / "cli", database_url)
    shared = (
        "--database-url", database_url, "--model", "fixture", *LOCAL_ARGS,
        "--storage", f"s3://{bucket}/results", "--lease-seconds", "3",
        "--s3-endpoint-url", proxy.url,
    )  # fmt: skip
    env = _s3_env(seaweedfs)
    api = ServeProcess(
        tmp_path / "api", *shared, "--no-worker", "--janitor-interval-seconds", "1", env=env
    )
    frozen = WorkerProcess(tmp_path / "frozen", *shared, env=env)
    winner = WorkerProcess(tmp_path / "winner", *shared, env=env)
    proxy.stall_once(_second_result_put(bucket, "results"))
    try:
        api.start()
        frozen.start()
        # Seeded: both attempts make the same images.
        task_id = _submit(api, headers, _two_takes(image_host, seed=7))
        wait_for(proxy.stalled.is_set, timeout=30, what="the second result upload to stall")
        assert frozen.process is not None
        os.kill(frozen.process.pid, signal.SIGSTOP)
        winner.start()
        detail = _finished(api, headers, task_id)
        assert detail["status"] == "completed", detail
        proxy.cut()
        os.kill(frozen.process.pid, signal.SIGCONT)
        wait_for(
            lambda: "lease lost before completion" in frozen.log(),
            timeout=60,
            what="the frozen worker to wake up and find its lease gone",
        )
        # Only the winner's results: the frozen attempt's were its own, and are gone.
        expected = {f"results/{key}" for key in _result_keys(database_url, task_id)}
        assert len(expected) == 2 and _objects(seaweedfs, bucket) == expected
        _downloads(_detail(api, headers, task_id)["results"])
        assert _task_row(database_url, task_id)["attempts"] == 2
        assert _ledger_kinds(database_url) == {"reserve": 1, "capture": 1}
        _ledger_check(database_url, tmp_path / "cli")
    finally:
        if frozen.process is not None and frozen.process.poll() is None:
            os.kill(frozen.process.pid, signal.SIGCONT)
        for process in (api, frozen, winner):
            process.stop()


# -- PostgreSQL restarted while tasks run -------------------------------------


def test_postgres_restart_while_tasks_run(
    tmp_path: Path, image_host: ImageHost, private_postgres: PrivatePostgres
) -> None:
    """PostgreSQL (a cluster of the test's own) goes down for a few seconds and
    comes back while a `retouch worker` denoises one task and holds the next: the
    API answers errors (not tracebacks) meanwhile and both processes report not
    ready; then both are ready again, the running task carries on and completes
    on its first attempt (a database restart is not an engine failure), so does
    the next, the worker claims new work, the ledger is consistent and the results
    directory holds exactly the completed tasks' files."""
    database_url = private_postgres.url
    results = tmp_path / "results"
    headers = _key(tmp_path / "cli", database_url)
    shared = (
        "--database-url", database_url, "--model", "fixture", *LOCAL_ARGS,
        "--storage", str(results), "--lease-seconds", "20",
    )  # fmt: skip
    api = ServeProcess(tmp_path / "api", *shared, "--no-worker", "--janitor-interval-seconds", "1")
    worker = WorkerProcess(tmp_path / "worker", *shared, "--steps", "200")  # 4 s a task
    body = {
        "model": "qwen-image-edit",
        "prompt": "through a database restart",
        "image_urls": [image_host.add("/a.png", png_bytes((512, 512)))],
    }
    try:
        api.start()
        worker.start()
        ids = [_submit(api, headers, body) for _ in range(2)]
        wait_for(
            lambda: _detail(api, headers, ids[0])["progress"] > 0, timeout=30, what="a task to run"
        )
        private_postgres.stop("fast")
        during = httpx.get(f"{api.url}/v1/tasks/{ids[0]}", headers=headers, timeout=30)
        # The seed's 503, with when to retry: the database is away, not the request wrong.
        assert during.status_code == 503, during.text
        assert during.json()["error"]["type"] == "service_unavailable_error"
        assert during.json()["error"]["fallback_suggestion"] == "retry after 5 seconds"
        assert during.headers["Retry-After"] == "5"
        assert "Traceback" not in during.text
        assert not _ready(api.url) and not _ready(worker.url)
        time.sleep(2)
        private_postgres.start()

        wait_for(lambda: _ready(api.url), timeout=30, what="the API to be ready again")
        wait_for(lambda: _ready(worker.url), timeout=30, what="the worker to be ready again")
        details = [_finished(api, headers, task_id) for task_id in ids]
        assert [detail["status"] for detail in details] == ["completed"] * 2, details
        after = _finished(api, headers, _submit(api, headers, body))
        assert after["status"] == "completed", after
        completed = [*ids, after["id"]]
        attempts = [_task_row(database_url, task_id)["attempts"] for task_id in completed]
        assert attempts == [1, 1, 1], worker.log()[-5000:]
        assert worker.process is not None and worker.process.poll() is None
        _ledger_check(database_url, tmp_path / "cli")
        assert _ledger_kinds(database_url) == {"reserve": 3, "capture": 3}
        assert _files(results) == {
            key for task_id in completed for key in _result_keys(database_url, task_id)
        }
        # The outage is told once per retrying loop, with its traceback, then once
        # more when it is over, not at every retry.
        for process in (api, worker):
            log = process.log()
            with_traceback = [line for line in log.splitlines() if TRACEBACK in line]
            assert 1 <= len(with_traceback) <= 4, "\n".join(line[:300] for line in with_traceback)
            assert "works again after" in log, log[-8000:]
    finally:
        api.stop()
        worker.stop()
