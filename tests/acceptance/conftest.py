"""Every `retouch serve` an acceptance test ran must leave a consistent ledger:
checked after each test for the servers it started, and after each module for
all of them (servers a whole module shares are checked once they have stopped).
Acceptance tests that need PostgreSQL get a fresh schema of its own."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.support import ServeProcess, postgres_schema, retouch_cli

POSTGRES_URL = os.environ.get("RETOUCH_TEST_DATABASE_URL")


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL schema (these tests run several processes on one database)."""
    if POSTGRES_URL is None:
        pytest.skip("needs PostgreSQL: set RETOUCH_TEST_DATABASE_URL (CI does)")
    with postgres_schema(POSTGRES_URL) as url:
        yield url


def _check(data_dirs: Iterable[Path]) -> None:
    for data_dir in sorted(data_dirs):
        result = retouch_cli("ledger", "check", "--data-dir", str(data_dir), check=False)
        report = result.stdout + result.stderr
        assert result.returncode == 0, f"ledger check of {data_dir}:\n{report}"


@pytest.fixture(autouse=True, scope="module")
def ledger_consistent_after_the_module() -> Iterator[None]:
    ServeProcess.served_data_dirs.clear()
    yield
    _check(ServeProcess.served_data_dirs)


@pytest.fixture(autouse=True)
def ledger_consistent_after_each_test() -> Iterator[None]:
    before = set(ServeProcess.served_data_dirs)
    yield
    _check(ServeProcess.served_data_dirs - before)
