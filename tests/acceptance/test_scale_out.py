"""Scale-out end to end: PostgreSQL, SeaweedFS (S3), two API processes and three
worker processes; 200 tasks with callbacks while one worker is killed with
SIGKILL and another is sent SIGTERM. Nothing may be lost, charged twice or left
without its callback."""

from __future__ import annotations

import re
import secrets
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from sqlalchemy import create_engine, text
from standardwebhooks.webhooks import Webhook

from retouch.callbacks import webhook_secret
from tests.integration.test_callbacks import Receiver
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

TASKS = 200
SHARED_SECRET = "scale-out-shared-secret-of-32-chars-or-more"
TERMINAL = {"completed", "failed", "cancelled"}


def test_two_apis_and_three_workers_lose_nothing(
    tmp_path: Path,
    database_url: str,
    seaweedfs: SeaweedS3,
) -> None:
    bucket = f"scale-out-{secrets.token_hex(4)}"
    seaweedfs.admin.create_bucket(Bucket=bucket)
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    receiver = Receiver(ca)
    images = ImageHost()
    image_url = images.add("/photo.png", png_bytes(size=(512, 512)))
    env = {
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "AWS_DEFAULT_REGION": seaweedfs.region,
        "SSL_CERT_FILE": str(ca_file),
        "RETOUCH_SECRET_KEY": SHARED_SECRET,
    }
    shared = [
        "--database-url", database_url,
        "--storage", f"s3://{bucket}/results", "--s3-endpoint-url", seaweedfs.endpoint_url,
        "--model", "fixture", "--lease-seconds", "3",
        "--allow-private-networks", "--fetch-ports", "any",
    ]  # fmt: skip
    limits = [
        "--requests-per-minute", "100000", "--max-concurrent-tasks", "1000",
        "--callback-ports", "any",
    ]  # fmt: skip
    created = retouch_cli(
        "keys", "create", "--name", "load", "--credits", "100000",
        "--database-url", database_url, "--data-dir", str(tmp_path / "cli"),
    )  # fmt: skip
    secret = created.stdout.strip()
    apis = [
        ServeProcess(tmp_path / f"api{i}", *shared, *limits, "--no-worker", env=env)
        for i in range(2)
    ]
    worker_args = [*shared, "--steps", "10", "--shutdown-grace-seconds", "30"]
    workers = [WorkerProcess(tmp_path / f"worker{i}", *worker_args, env=env) for i in range(3)]
    processes: list[ServeProcess] = [*apis, *workers]
    try:
        for process in processes:
            process.start()
        started = time.monotonic()
        ids = _submit_all(apis, secret, image_url, receiver.url)
        assert len(set(ids)) == TASKS

        # Mid-run: one worker dies hard, another is asked to stop.
        wait_for(lambda: _count(database_url, "completed") >= 30, timeout=120, what="30 tasks")
        # Cancel a task running on some worker (through the other API) and the last
        # ten submitted (still pending).
        running = _query(database_url, "SELECT id FROM tasks WHERE status = 'processing' LIMIT 1")
        cancelled = {row["id"] for row in running} | set(ids[-10:])
        for index, task_id in enumerate(sorted(cancelled)):
            answer = httpx.post(
                f"{apis[index % 2].url}/v1/tasks/{task_id}/cancel",
                headers={"Authorization": f"Bearer {secret}"},
                timeout=10,
            )
            # The running one may finish first (409); the pending ones cannot.
            expected = (200, 409) if task_id not in ids[-10:] else (200,)
            assert answer.status_code in expected, answer.text
        killed, drained = workers[0], workers[1]
        wait_for(lambda: _running_on(database_url, killed), timeout=30, what="a busy worker")
        assert killed.kill(signal.SIGKILL) == -signal.SIGKILL
        assert drained.kill(signal.SIGTERM) == 0, drained.log()[-3000:]

        wait_for(
            lambda: _count(database_url, *TERMINAL) == TASKS,
            timeout=300,
            interval=0.5,
            what="every task to finish",
        )
        elapsed = time.monotonic() - started
        tasks = _tasks(database_url)
        statuses = {task["id"]: task["status"] for task in tasks}
        # A running task sees its cancel flag within one step (it may have just finished).
        assert all(statuses[task_id] in ("cancelled", "completed") for task_id in cancelled)
        assert all(statuses[task_id] == "cancelled" for task_id in ids[-10:])
        done = [task_id for task_id in ids if statuses[task_id] == "completed"]
        assert len(done) == TASKS - sum(s == "cancelled" for s in statuses.values())
        assert set(statuses.values()) <= {"completed", "cancelled"}, _failures(tasks)

        # Every completed task's links download from S3; exactly one charge each.
        with httpx.Client(timeout=10) as client:
            details = [
                client.get(
                    f"{apis[i % 2].url}/v1/tasks/{task_id}",
                    headers={"Authorization": f"Bearer {secret}"},
                ).json()
                for i, task_id in enumerate(done)
            ]
            for detail in details:
                assert len(detail["results"]) == 1
                link = detail["results"][0]
                assert link.startswith(seaweedfs.endpoint_url), link
                download = client.get(link)
                assert download.status_code == 200 and download.content[:8] == b"\x89PNG\r\n\x1a\n"
        check = retouch_cli(
            "ledger", "check", "--database-url", database_url,
            "--data-dir", str(tmp_path / "cli"), check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        released = TASKS - len(done)
        assert _ledger_kinds(database_url) == {
            "reserve": TASKS,
            "capture": len(done),
            "release": released,
        }

        # Every callback arrived, signed with the account's secret.
        wait_for(lambda: len(_called_back(receiver)) == TASKS, timeout=60, what="every callback")
        account_id = _account_of(database_url)
        verifier = Webhook(webhook_secret(SHARED_SECRET.encode(), account_id))
        for received in receiver.received[:20]:
            payload = verifier.verify(received.body, received.headers)
            assert payload["status"] == statuses[payload["id"]]

        waits = sorted(
            (task["started_at"] - task["created_at"]).total_seconds()
            for task in tasks
            if task["started_at"] is not None
        )
        print(
            f"\n{TASKS} tasks through 2 APIs and 3 workers (one SIGKILLed, one SIGTERMed) "
            f"in {elapsed:.1f} s: {TASKS / elapsed:.1f} tasks/s; queue wait "
            f"p50 {statistics.median(waits):.2f} s, p99 {waits[int(len(waits) * 0.99) - 1]:.2f} s"
        )
    finally:
        for process in processes:
            process.stop()
        receiver.close()
        images.close()


def _submit_all(apis: list[ServeProcess], secret: str, image_url: str, hook: str) -> list[str]:
    headers = {"Authorization": f"Bearer {secret}"}

    def submit(index: int) -> str:
        body = {
            "model": "qwen-image-edit",
            "prompt": f"edit number {index}",
            "image_urls": [image_url],
            "callback_url": hook,
            "size": "512x512",
        }
        response = httpx.post(
            f"{apis[index % 2].url}/v1/images/generations", json=body, headers=headers, timeout=30
        )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(submit, range(TASKS)))


def _query(database_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def _count(database_url: str, *statuses: str) -> int:
    rows = _query(
        database_url,
        "SELECT count(*) AS n FROM tasks WHERE status = ANY(:statuses)",
        statuses=list(statuses),
    )
    return int(rows[0]["n"])


def _running_on(database_url: str, worker: WorkerProcess) -> bool:
    """Whether a task is running on this worker process (its id names its host and pid)."""
    owners = _query(database_url, "SELECT lease_owner FROM tasks WHERE status = 'processing'")
    log = worker.log()
    return any(row["lease_owner"] and row["lease_owner"] in log for row in owners)


def _tasks(database_url: str) -> list[dict[str, Any]]:
    return _query(
        database_url,
        "SELECT id, status, attempts, created_at, started_at, error_message FROM tasks",
    )


def _failures(tasks: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{task['id']} {task['status']}: {task['error_message']}"
        for task in tasks
        if task["status"] not in ("completed", "cancelled")
    )


def _ledger_kinds(database_url: str) -> dict[str, int]:
    rows = _query(
        database_url,
        "SELECT kind, count(*) AS n FROM ledger_entries WHERE task_id IS NOT NULL GROUP BY kind",
    )
    return {row["kind"]: int(row["n"]) for row in rows}


def _account_of(database_url: str) -> str:
    return str(_query(database_url, "SELECT account_id FROM api_keys")[0]["account_id"])


def _called_back(receiver: Receiver) -> set[str]:
    ids = set()
    for received in list(receiver.received):
        match = re.search(rb'"id":"(task-unified-[^"]+)"', received.body)
        if match:
            ids.add(match.group(1).decode())
    return ids


def test_a_cancel_reaches_a_task_running_in_another_process(
    tmp_path: Path, database_url: str
) -> None:
    """The API and the worker share only the database: the worker sees the cancel
    flag at its next denoising step (20 ms apart here)."""
    images = ImageHost()
    shared = [
        "--database-url", database_url, "--model", "fixture",
        "--storage", str(tmp_path / "results"),
        "--allow-private-networks", "--fetch-ports", "any",
    ]  # fmt: skip
    created = retouch_cli(
        "keys", "create", "--name", "canceller",
        "--database-url", database_url, "--data-dir", str(tmp_path / "cli"),
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
    api = ServeProcess(tmp_path / "api", *shared, "--no-worker")
    worker = WorkerProcess(tmp_path / "worker", *shared, "--steps", "200")  # 4 s a task
    try:
        api.start()
        worker.start()
        body = {
            "model": "qwen-image-edit",
            "prompt": "a long edit",
            "image_urls": [images.add("/a.png", png_bytes())],
        }
        task = httpx.post(f"{api.url}/v1/images/generations", json=body, headers=headers).json()

        def detail() -> dict[str, Any]:
            url = f"{api.url}/v1/tasks/{task['id']}"
            return dict(httpx.get(url, headers=headers).json())

        wait_for(lambda: detail()["progress"] > 0, timeout=30, what="the task to run")
        asked = time.monotonic()
        cancel = httpx.post(f"{api.url}/v1/tasks/{task['id']}/cancel", headers=headers)
        assert cancel.status_code == 200, cancel.text
        wait_for(
            lambda: detail()["status"] == "cancelled", timeout=10, interval=0.02, what="cancel"
        )
        took = time.monotonic() - asked
        assert took < 2.0, f"the cancel took {took:.2f} s to reach the worker"
        assert 0 < detail()["progress"] < 100
        assert _ledger_kinds(database_url) == {"reserve": 1, "release": 1}
    finally:
        api.stop()
        worker.stop()
        images.close()


def test_the_demo_model_in_worker_processes_survives_a_killed_worker(
    tmp_path: Path,
    database_url: str,
    seaweedfs: SeaweedS3,
) -> None:
    """The real diffusers pipeline (the demo checkpoint, from a local directory) in
    two `retouch worker` processes writing to S3: one is killed mid-denoise, its
    task runs again on the other, every task completes and is charged once."""
    bucket = f"demo-{secrets.token_hex(4)}"
    seaweedfs.admin.create_bucket(Bucket=bucket)
    checkpoint = tmp_path / "demo-checkpoint"
    retouch_cli("demo-model", str(checkpoint), timeout=300)
    images = ImageHost()
    env = {
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "AWS_DEFAULT_REGION": seaweedfs.region,
    }
    shared = [
        "--database-url", database_url, "--model", str(checkpoint), "--steps", "8",
        "--storage", f"s3://{bucket}", "--s3-endpoint-url", seaweedfs.endpoint_url,
        "--lease-seconds", "3", "--allow-private-networks", "--fetch-ports", "any",
    ]  # fmt: skip
    created = retouch_cli(
        "keys", "create", "--name", "demo",
        "--database-url", database_url, "--data-dir", str(tmp_path / "cli"),
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
    api = ServeProcess(tmp_path / "api", *shared, "--no-worker", env=env)
    workers = [WorkerProcess(tmp_path / f"worker{i}", *shared, env=env) for i in range(2)]
    try:
        for process in (api, *workers):
            process.start(timeout=300)
        body = {
            "model": "qwen-image-edit",
            "prompt": "make it blue",
            "image_urls": [images.add("/a.png", png_bytes(size=(384, 384)))],
            "size": "512x512",
            "seed": 7,
        }
        ids = [
            httpx.post(f"{api.url}/v1/images/generations", json=body, headers=headers).json()["id"]
            for _ in range(4)
        ]
        victim = workers[0]
        wait_for(lambda: _running_on(database_url, victim), timeout=120, what="a busy worker")
        assert victim.kill(signal.SIGKILL) == -signal.SIGKILL
        wait_for(
            lambda: _count(database_url, *TERMINAL) == len(ids),
            timeout=300,
            interval=0.5,
            what="every task to finish",
        )
        tasks = {task["id"]: task for task in _tasks(database_url)}
        assert {task["status"] for task in tasks.values()} == {"completed"}, _failures(
            list(tasks.values())
        )
        assert max(task["attempts"] for task in tasks.values()) == 2  # the killed one ran again
        outputs = []
        for task_id in ids:
            detail = httpx.get(f"{api.url}/v1/tasks/{task_id}", headers=headers).json()
            download = httpx.get(detail["results"][0], timeout=10)
            assert download.status_code == 200
            outputs.append(download.content)
        # Same seed, same inputs, same device: the same image, whichever worker ran it.
        assert len(set(outputs)) == 1
        assert _ledger_kinds(database_url) == {"reserve": len(ids), "capture": len(ids)}
    finally:
        api.stop()
        for worker in workers:
            worker.stop()
        images.close()
