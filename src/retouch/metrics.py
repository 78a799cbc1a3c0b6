"""Prometheus metrics.

Two kinds: what a process measures itself (time per stage, seconds per
denoising step, callback outcomes: counters and histograms in this process's
registry), and what the database knows (tasks by status, queue depth and age,
credits by ledger entry: read at scrape time, so every API replica reports the
same truth however many workers there are).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from retouch.errors import first_line

if TYPE_CHECKING:
    from retouch.storage import ResultStorage
    from retouch.store import Store

_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

STAGE_SECONDS = Histogram(
    "retouch_stage_seconds",
    "Time spent per stage of a task: fetch, queue_wait, gpu, upload, callback.",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
STEP_SECONDS = Histogram(
    "retouch_denoise_step_seconds",
    "Seconds per denoising step (both CFG passes).",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2, 5, 10, 30),
)
TASKS_FINISHED = Counter(
    "retouch_tasks_finished_total", "Tasks this worker finished, by final status.", ["status"]
)
CALLBACKS = Counter(
    "retouch_callback_attempts_total",
    "Callback delivery attempts by outcome: delivered, retry, failed.",
    ["outcome"],
)


class StoreCollector(Collector):
    """Gauges read from the database at each scrape."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        snapshot = self.store.metrics_snapshot()
        by_status = GaugeMetricFamily(
            "retouch_tasks", "Tasks in the database by status.", labels=["status"]
        )
        for status, count in sorted(snapshot.tasks_by_status.items()):
            by_status.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily(
            "retouch_queue_depth", "Pending tasks.", value=snapshot.tasks_by_status["pending"]
        )
        yield GaugeMetricFamily(
            "retouch_queue_oldest_age_seconds",
            "Age of the oldest pending task (0 when none).",
            value=snapshot.oldest_pending_seconds,
        )
        credits = GaugeMetricFamily(
            "retouch_credits",
            "Credits by ledger entry kind, summed over all accounts "
            "(grant, reserve, capture, release).",
            labels=["kind"],
        )
        for kind, amount in sorted(snapshot.credits_by_kind.items()):
            credits.add_metric([kind], amount)
        yield credits
        yield GaugeMetricFamily(
            "retouch_credits_held", "Credits reserved by unfinished tasks.", value=snapshot.held
        )


def store_registry(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return registry


def render_latest(*registries: CollectorRegistry) -> tuple[bytes, str]:
    """This process's metrics, then those of the given registries."""
    body = b"".join(generate_latest(registry) for registry in (REGISTRY, *registries))
    return body, CONTENT_TYPE_LATEST


def readiness_problems(store: Store, storage: ResultStorage) -> list[str]:
    """What keeps this process from doing its work: the database, the storage."""
    problems = []
    try:
        store.ping()
    except Exception as exc:
        problems.append(f"database: {type(exc).__name__}: {first_line(exc, 200)}")
    try:
        storage.check()
    except Exception as exc:
        problems.append(f"storage: {type(exc).__name__}: {first_line(exc, 200)}")
    return problems
