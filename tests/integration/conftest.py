"""A live API (uvicorn on loopback) over a real store, with an optional worker thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from retouch.api.admin import AdminService
from retouch.api.app import create_app
from retouch.api.service import TaskService
from retouch.clock import FakeClock
from retouch.engine.base import Engine
from retouch.fetch import ImageFetcher
from retouch.janitor import Janitor
from retouch.models import ModelSpec
from retouch.prompts import PromptTokenCounter
from retouch.storage import LocalResultStorage
from retouch.store import Store
from retouch.uploads import Uploads
from retouch.worker import LoadedModel, Worker, WorkerConfig
from tests.support import LiveServer

MAX_REQUEST_BYTES = 64 * 1024
SPEC = ModelSpec(
    name="qwen-image-edit", checkpoint="fixture", steps=4, negative_prompt=None, price=1.5
)
ONE_IMAGE_VIP = ModelSpec(
    name="qwen-image-edit-single",
    checkpoint="fixture",
    family="edit",
    max_images=1,
    max_output_side=1024,
    user_groups=("vip",),
)


ADMIN_TOKEN = "test-admin-token"
SIGNING_KEY = b"test-secret"


@dataclass
class Api:
    url: str
    store: Store
    storage: LocalResultStorage
    clock: FakeClock
    secret: str
    service: TaskService
    workers: list[tuple[Worker, threading.Thread]] = field(default_factory=list)

    def admin(self, token: str = ADMIN_TOKEN) -> httpx.Client:
        """A client of the admin API (`/admin/v1`)."""
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    def client(self, secret: str | None = None) -> httpx.Client:
        token = self.secret if secret is None else secret
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def start_worker(
        self, engine: Engine, lease_seconds: float = 30.0, spec: ModelSpec = SPEC
    ) -> Worker:
        worker = Worker(
            self.store,
            self.storage,
            {spec.name: LoadedModel(spec, engine)},
            ImageFetcher(allow_private_networks=True, allowed_ports=None, timeout_seconds=5),
            WorkerConfig(lease_seconds=lease_seconds, poll_interval_seconds=0.02),
            clock=self.clock,
            uploads=self.service.uploads,
        )
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        self.workers.append((worker, thread))
        return worker

    def janitor(self) -> Janitor:
        return Janitor(self.store, self.storage, max_attempts=2, interval_seconds=60)

    def stop_workers(self) -> None:
        for worker, thread in self.workers:
            worker.stopping.set()
            thread.join(10)
        self.workers.clear()


@pytest.fixture
def api(store: Store, clock: FakeClock, tmp_path: Path) -> Iterator[Api]:
    storage = LocalResultStorage(tmp_path / "results", SIGNING_KEY, clock)
    models = [SPEC, ONE_IMAGE_VIP]
    uploads = Uploads(storage, SIGNING_KEY, clock)
    service = TaskService(
        store, storage, clock, models, tokens=PromptTokenCounter(tmp_path), uploads=uploads
    )
    admin = AdminService(
        store, ADMIN_TOKEN, models=[spec.name for spec in models], signing_key=SIGNING_KEY
    )
    server = LiveServer(create_app(service, max_request_bytes=MAX_REQUEST_BYTES, admin=admin))
    _key, secret = store.create_key("alice")
    live = Api(server.url, store, storage, clock, secret, service)
    yield live
    live.stop_workers()
    server.close()
