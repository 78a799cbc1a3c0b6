"""benchmarks/dispatch.py runs end to end (a quick configuration) and prints its table.

Honest checks only: the figures are printed and are numbers; their size is not asserted
(timings on shared CI machines say nothing)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from tests.support import REPO

POSTGRES_URL = os.environ.get("RETOUCH_TEST_DATABASE_URL")
QUICK_WORKERS = {1, 2}


def test_dispatch_benchmark_prints_a_row_per_backend_and_worker_count() -> None:
    args = ["--database-url", POSTGRES_URL] if POSTGRES_URL else ["--backends", "sqlite"]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "dispatch.py"), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    backends = {"sqlite", *(["postgresql"] if POSTGRES_URL else [])}
    rows: dict[tuple[str, int], list[float]] = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] in {"sqlite", "postgresql"}:
            rows[fields[0], int(fields[1])] = [float(value) for value in fields[2:]]
    assert set(rows) == {(b, n) for b in backends for n in QUICK_WORKERS}, result.stdout
    for key, figures in rows.items():
        # p50 p95 p99, tasks/s, idle statements/s, transactions/s, connections/s, CPU %
        assert len(figures) == 8, (key, result.stdout)
        assert all(math.isfinite(value) and value >= 0 for value in figures), key
        p50, p95, p99, throughput = figures[:4]
        assert p50 <= p95 <= p99, key
        assert throughput > 0, key
    assert "PostgreSQL / SQLite dispatch p50:" in result.stdout
    if POSTGRES_URL:
        assert "x with 1 worker" in result.stdout
