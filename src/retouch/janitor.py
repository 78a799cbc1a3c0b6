"""Housekeeping that runs beside the API: expired result files and stale leases."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from retouch.errors import first_line
from retouch.logs import RepeatedFailure
from retouch.storage import ResultStorage
from retouch.store import Store, database_unavailable

log = logging.getLogger(__name__)

REAP_INTERVAL_SECONDS = 5.0
# Tasks listed at a time by a sweep of result files.
SWEEP_BATCH = 500
# A sweep of result files stops after this many tasks in a row whose files could
# not be deleted: the result storage is likely unreachable, and the lease checks
# that share this thread should not wait on it. The next sweep begins after them.
FAILURES_IN_A_ROW = 3


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
        batch_size: int = SWEEP_BATCH,
    ) -> None:
        self.store = store
        self.storage = storage
        self.max_attempts = max_attempts
        self.interval_seconds = interval_seconds
        self.upload_ttl_seconds = upload_ttl_seconds
        # The length of a lease whose task does not say (leased by an older version).
        self.lease_seconds = lease_seconds
        self._monotonic = monotonic
        self.batch_size = batch_size
        # Where each sweep of result files begins next, after one that stopped.
        self._resume: dict[str, str] = {}
        # Expired leases seen: task -> (its expiry, when first seen expired so).
        self._sightings: dict[str, tuple[datetime, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def purge_expired_results(self) -> int:
        # Every object of the task: its results and any a late attempt left.
        purged = self._sweep("expired", self.store.expired_results)
        if purged:
            log.info("janitor: deleted the expired results of %d task(s)", purged)
        return purged

    def purge_abandoned_results(self) -> int:
        """Delete the result images an attempt killed while storing them left behind,
        once its task has ended without results (failed, or cancelled, after the
        attempt). A task that ran again and completed swept them itself."""
        swept = self._sweep("abandoned", self.store.abandoned_results)
        if swept:
            log.info("janitor: swept the leftovers of %d failed or cancelled task(s)", swept)
        return swept

    def _sweep(self, name: str, listing: Callable[[int, str | None], list[str]]) -> int:
        """Delete every object of the tasks `listing` names, a batch at a time in the
        order of their ids, and mark them purged. A task whose objects cannot be
        deleted is logged and passed over, left for the next sweep; after
        `FAILURES_IN_A_ROW` in a row the sweep stops, raising, and the next one
        begins after them, so no task can hold up the others for good."""
        after = self._resume.pop(name, None)
        swept = in_a_row = 0
        while batch := listing(self.batch_size, after):
            done: list[str] = []
            for task_id in batch:
                error = self._delete_task(task_id)
                if error is None:
                    done.append(task_id)
                    in_a_row = 0
                    continue
                in_a_row += 1
                if in_a_row >= FAILURES_IN_A_ROW:
                    self.store.mark_results_purged(done)
                    self._resume[name] = task_id
                    raise error
            self.store.mark_results_purged(done)
            swept += len(done)
            after = batch[-1]
        return swept

    def _delete_task(self, task_id: str) -> Exception | None:
        """Delete a task's objects; the error, logged, when that failed."""
        try:
            self.storage.delete_task(task_id)
        except Exception as exc:
            log.warning(
                "janitor: could not delete the result files of task %s (tried again at "
                "the next sweep): %s: %s",
                task_id,
                type(exc).__name__,
                first_line(exc),
            )
            return exc
        return None

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
            log.warning(
                "janitor: %d task(s) had lost their worker; requeued, failed or cancelled", reaped
            )
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
        # Each apart: one failing (the result storage away, say) holds up no other,
        # and the lease check needs only the database.
        sweeps = [
            (sweep, RepeatedFailure(log, f"the janitor's sweep of {what}"), uses_database)
            for sweep, what, uses_database in (
                (self.purge_expired_results, "expired results", True),
                (self.purge_abandoned_results, "what failed or cancelled tasks left", True),
                (self.forget_idempotency_keys, "expired idempotency keys", True),
                (self.purge_uploads, "expired uploads", False),  # the storage alone
            )
        ]
        lease_failures = RepeatedFailure(log, "the janitor's check of leases")
        # The database away fails every job at once: that is told once, not per job,
        # and only a job that reached the database says that it works again.
        database = RepeatedFailure(log, "the janitor (the database is unreachable)")
        while True:
            if since_purge >= self.interval_seconds:
                since_purge = 0.0
                for sweep, failures, uses_database in sweeps:
                    _attempt(sweep, failures, database if uses_database else None)
            _attempt(self.reap_leases, lease_failures, database)
            if self._stop.wait(tick):
                return
            since_purge += tick


def _attempt(
    work: Callable[[], object], failures: RepeatedFailure, database: RepeatedFailure | None
) -> None:
    """Run one job; `database`: the database's reporter, for a job that uses it."""
    try:
        work()
    except Exception as exc:
        (database if database and database_unavailable(exc) else failures).failed(exc)
        return
    failures.succeeded()
    if database is not None:
        database.succeeded()
