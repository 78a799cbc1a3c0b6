"""Operations endpoints: `/readyz` and `/metrics` on the API, and a worker's own
health server (`/healthz`, `/readyz`, `/metrics`)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from retouch.api.app import create_app
from retouch.api.service import TaskService
from retouch.clock import FakeClock
from retouch.engine.fixture import FixtureEngine
from retouch.fetch import ImageFetcher
from retouch.storage import LocalResultStorage
from retouch.store import Store, create_db_engine
from retouch.tasks import TaskStatus
from retouch.worker import LoadedModel, Worker
from retouch.worker_process import _HealthServer
from tests.integration.conftest import SIGNING_KEY, SPEC, Api
from tests.integration.test_api import create, edit
from tests.support import ImageHost, LiveServer, free_port, png_bytes, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a `/metrics` page, by name and labels."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def count(samples: Samples, name: str, **labels: str) -> float:
    """A process counter's value; 0 before its first observation (labelled
    metrics have no sample until a label is used)."""
    return value(samples, name, **labels) or 0.0


def replace_with_file(directory: Path) -> None:
    """Where the results directory should be there is a file: nothing can be stored."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.write_bytes(b"not a directory")


def readyz(url: str) -> tuple[int, object]:
    response = httpx.get(f"{url}/readyz", timeout=30)
    return response.status_code, response.json()


# -- /readyz on the API ----------------------------------------------------------


def test_readyz_is_ready_when_database_and_storage_answer(api: Api) -> None:
    assert readyz(api.url) == (200, {"status": "ready", "problems": []})


def test_readyz_reports_storage_that_cannot_store(api: Api) -> None:
    replace_with_file(api.storage.root)
    problem = f"storage: FileExistsError: [Errno 17] File exists: '{api.storage.root}'"
    assert readyz(api.url) == (503, {"status": "unavailable", "problems": [problem]})
    # Fixed: ready again.
    api.storage.root.unlink()
    assert readyz(api.url) == (200, {"status": "ready", "problems": []})


@pytest.fixture(params=["sqlite", "postgresql"])
def unreachable_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store whose database cannot be reached: a SQLite file in a directory that
    does not exist, or a PostgreSQL server port nobody listens on."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'missing' / 'retouch.db'}"
    else:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/retouch"
    store = Store(create_db_engine(url), FakeClock())
    yield store
    store.close()


def test_readyz_reports_an_unreachable_database_and_storage(
    unreachable_store: Store, tmp_path: Path
) -> None:
    clock = FakeClock()
    storage = LocalResultStorage(tmp_path / "results", SIGNING_KEY, clock)
    replace_with_file(storage.root)
    server = LiveServer(create_app(TaskService(unreachable_store, storage, clock, [SPEC])))
    try:
        status, body = readyz(server.url)
        healthz = httpx.get(f"{server.url}/healthz", timeout=10)
    finally:
        server.close()
    assert status == 503
    assert isinstance(body, dict) and body["status"] == "unavailable"
    database, storage_problem = body["problems"]
    if unreachable_store.engine.dialect.name == "sqlite":
        assert database == (
            "database: OperationalError: (sqlite3.OperationalError) unable to open database file"
        )
    else:
        assert database.startswith("database: OperationalError: (psycopg.OperationalError) ")
        assert "Connection refused" in database
    assert storage_problem == f"storage: FileExistsError: [Errno 17] File exists: '{storage.root}'"
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"}), "alive, not ready"


# -- /metrics on the API -----------------------------------------------------------


def test_metrics_report_the_queue_and_the_credits_from_the_database(api: Api) -> None:
    before = scrape(api.url)
    assert value(before, "retouch_queue_depth") == 0.0
    assert value(before, "retouch_queue_oldest_age_seconds") == 0.0
    assert value(before, "retouch_credits", kind="grant") == 100.0  # a new key's credits
    assert value(before, "retouch_credits", kind="reserve") == 0.0

    create(api, edit(["https://example.com/a.png"]))
    api.clock.advance(42)
    create(api, edit(["https://example.com/a.png"], n=2))
    create(api, edit(["https://example.com/a.png"]))

    samples = scrape(api.url)
    for status in TaskStatus:
        expected = 3.0 if status is TaskStatus.PENDING else 0.0
        assert value(samples, "retouch_tasks", status=status.value) == expected, status
    assert value(samples, "retouch_queue_depth") == 3.0
    assert value(samples, "retouch_queue_oldest_age_seconds") == 42.0
    # Price 1.5 per image: 1 + 2 + 1 images.
    assert value(samples, "retouch_credits", kind="reserve") == 6.0
    assert value(samples, "retouch_credits", kind="capture") == 0.0
    assert value(samples, "retouch_credits", kind="release") == 0.0
    assert value(samples, "retouch_credits_held") == 6.0


def test_metrics_count_what_a_worker_did(api: Api, image_host: ImageHost) -> None:
    url = image_host.add("/a.png", png_bytes())
    ids = [create(api, edit([url]))["id"] for _ in range(3)]
    before = scrape(api.url)

    api.start_worker(FixtureEngine(step_seconds=0.005, steps=5))

    def all_completed() -> bool:
        tasks = [api.store.get_task(task_id) for task_id in ids]
        return all(task is not None and task.status is TaskStatus.COMPLETED for task in tasks)

    wait_for(all_completed, timeout=20, what="the three tasks to complete")
    api.stop_workers()
    after = scrape(api.url)

    for stage in ("fetch", "queue_wait", "gpu", "upload"):
        grown = count(after, "retouch_stage_seconds_count", stage=stage) - count(
            before, "retouch_stage_seconds_count", stage=stage
        )
        assert grown == 3.0, stage
    assert count(after, "retouch_stage_seconds_count", stage="callback") == count(
        before, "retouch_stage_seconds_count", stage="callback"
    ), "no task asked for a callback"
    steps = count(after, "retouch_denoise_step_seconds_count") - count(
        before, "retouch_denoise_step_seconds_count"
    )
    assert steps == 15.0, "5 steps for each of 3 tasks"
    finished = count(after, "retouch_tasks_finished_total", status="completed") - count(
        before, "retouch_tasks_finished_total", status="completed"
    )
    assert finished == 3.0
    # And what the database says now.
    assert value(after, "retouch_tasks", status="completed") == 3.0
    assert value(after, "retouch_tasks", status="pending") == 0.0
    assert value(after, "retouch_queue_depth") == 0.0
    assert value(after, "retouch_queue_oldest_age_seconds") == 0.0
    assert value(after, "retouch_credits", kind="reserve") == 4.5
    assert value(after, "retouch_credits", kind="capture") == 4.5
    assert value(after, "retouch_credits_held") == 0.0


# -- the worker's health server --------------------------------------------------


def test_worker_health_server_answers_health_readiness_and_metrics(
    store: Store, tmp_path: Path
) -> None:
    from retouch.settings import Settings

    clock = FakeClock()
    storage = LocalResultStorage(tmp_path / "results", SIGNING_KEY, clock)
    worker = Worker(
        store,
        storage,
        {SPEC.name: LoadedModel(SPEC, FixtureEngine())},
        ImageFetcher(allow_private_networks=True, allowed_ports=None, timeout_seconds=5),
        clock=clock,
    )
    settings = Settings(data_dir=tmp_path / "data", host="127.0.0.1", worker_port=0)
    health = _HealthServer(settings)
    base = f"http://127.0.0.1:{health.port}"
    try:
        assert health.port > 0
        response = httpx.get(f"{base}/healthz?probe=1", timeout=10)
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
        assert response.headers["content-type"] == "application/json"
        # Alive while the models load, not ready until the worker is there.
        loading = {"status": "unavailable", "problems": ["starting: loading the models"]}
        assert readyz(base) == (503, loading)
        health.worker = worker
        assert readyz(base) == (200, {"status": "ready", "problems": []})

        metrics = httpx.get(f"{base}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        families = {family.name for family in text_string_to_metric_families(metrics.text)}
        assert {"retouch_stage_seconds", "retouch_denoise_step_seconds"} <= families
        assert "retouch_queue_depth" not in families, "the database's gauges are the API's"

        missing = httpx.get(f"{base}/nope", timeout=10)
        assert (missing.status_code, missing.json()) == (404, {"status": "no such endpoint"})

        worker.drain(grace_seconds=60)
        draining = ["draining: claims no new tasks"]
        assert readyz(base) == (503, {"status": "unavailable", "problems": draining})
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200, "alive while draining"
        replace_with_file(storage.root)
        status, body = readyz(base)
        assert status == 503 and isinstance(body, dict)
        assert body["problems"] == [
            f"storage: FileExistsError: [Errno 17] File exists: '{storage.root}'",
            *draining,
        ]
    finally:
        health.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)
