"""Fixtures shared by every layer: stores on each backend, images, live servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from retouch.clock import FakeClock
from retouch.store import Store, create_db_engine, migrate
from tests.support import ImageHost, postgres_schema

# Tests never reach a model hub; failing fast beats retrying against no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSTGRES_URL = os.environ.get("RETOUCH_TEST_DATABASE_URL")
BACKENDS = ["sqlite", *(["postgresql"] if POSTGRES_URL else [])]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend (PostgreSQL: a schema of its own)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    assert POSTGRES_URL is not None
    with postgres_schema(POSTGRES_URL) as url:
        yield url


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[Store]:
    engine = create_db_engine(database_url)
    migrate(engine)
    store = Store(engine, clock)
    yield store
    # Whatever a test did, the ledger must still balance (`retouch ledger check`).
    problems = store.check_ledger()
    store.close()
    assert not problems, "ledger check failed:\n" + "\n".join(problems)


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.close()
