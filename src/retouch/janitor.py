"""Housekeeping that runs beside the API: expired result files and stale leases."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from retouch.logs import RepeatedFailure
from retouch.storage import ResultStorage
from retouch.store import Store

log = logging.getLogger(__name__)

REAP_INTERVAL_SECONDS = 5.0


class Janitor:
    def __init__(
        self,
        store: Store,
        storage: ResultStorage,
        *,
        max_attempts: int,
        interval_seconds: float,
        upload_ttl_seconds: float | None = None,
        lease_seconds: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.storage = storage
        self.max_attempts = max_attempts
        self.interval_seconds = interval_seconds
        self.upload_ttl_seconds = upload_ttl_seconds
        # The length of a lease whose task does not say (leased by an older version).
        self.lease_seconds = lease_seconds
        self._monotonic = monotonic
        # Expired leases seen: task -> (its expiry, when first seen expired so).
        self._sightings: dict[str, tuple[datetime, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def purge_expired_results(self) -> int:
        purged = 0
        while batch := self.store.expired_results():
            for task_id in batch:
                # Every object of the task: its results and any a late attempt left.
                self.storage.delete_task(task_id)
            self.store.mark_results_purged(batch)
            purged += len(batch)
        if purged:
            log.info("janitor: deleted the expired results of %d task(s)", purged)
        return purged

    def purge_abandoned_results(self) -> int:
        """Delete the result images an attempt killed while storing them left behind,
        once its task has ended without results (failed, or cancelled, after the
        attempt). A task that ran again and completed swept them itself."""
        swept = 0
        while batch := self.store.abandoned_results():
            for task_id in batch:
                self.storage.delete_task(task_id)
            self.store.mark_results_purged(batch)
            swept += len(batch)
        if swept:
            log.info("janitor: swept the leftovers of %d failed or cancelled task(s)", swept)
        return swept

    def purge_uploads(self) -> int:
        """Delete uploaded images once they are as old as results may get."""
        if self.upload_ttl_seconds is None:
            return 0
        cutoff = self.store.clock.now() - timedelta(seconds=self.upload_ttl_seconds)
        purged = self.storage.purge_uploads(cutoff)
        if purged:
            log.info("janitor: deleted %d expired upload(s)", purged)
        return purged

    def forget_idempotency_keys(self) -> int:
        return self.store.purge_idempotency_keys()

    def reap_leases(self) -> int:
        """Take back the tasks whose worker is gone: those whose lease has been seen
        expired, and not renewed, for half its length of this process's steady
        clock. Expired by the wall clock alone is not enough: a clock stepped
        forward (NTP, a VM resumed) makes every lease look expired at once, and
        their live workers renew them within a third of the lease."""
        now = self._monotonic()
        sightings: dict[str, tuple[datetime, float]] = {}
        confirmed: dict[str, datetime] = {}
        for task_id, (expiry, length) in self.store.expired_leases().items():
            previous = self._sightings.get(task_id)
            since = previous[1] if previous is not None and previous[0] == expiry else now
            sightings[task_id] = (expiry, since)
            if now - since >= (length or self.lease_seconds) / 2:
                confirmed[task_id] = expiry
        self._sightings = sightings
        if not confirmed:
            return 0
        reaped = self.store.reap_expired_leases(self.max_attempts, only=confirmed)
        if reaped:
            log.warning("janitor: %d task(s) had lost their worker; requeued or failed", reaped)
        return reaped

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="janitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        # Leases are checked often (a lost worker should not hold a task for
        # long); files are swept at the configured interval.
        tick = min(self.interval_seconds, REAP_INTERVAL_SECONDS)
        since_purge = self.interval_seconds  # sweep once at start-up
        # Apart: the sweep needs the result storage, the lease check only the database.
        sweep_failures = RepeatedFailure(log, "the janitor's sweep of expired files and keys")
        lease_failures = RepeatedFailure(log, "the janitor's check of leases")
        while True:
            if since_purge >= self.interval_seconds:
                since_purge = 0.0
                try:
                    self.purge_expired_results()
                    self.purge_abandoned_results()
                    self.forget_idempotency_keys()
                    self.purge_uploads()
                    sweep_failures.succeeded()
                except Exception as exc:
                    sweep_failures.failed(exc)
            try:
                self.reap_leases()
                lease_failures.succeeded()
            except Exception as exc:
                lease_failures.failed(exc)
            if self._stop.wait(tick):
                return
            since_purge += tick
