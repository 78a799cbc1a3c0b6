"""Signed, durable callbacks.

A dispatcher sends the outbox's due deliveries: it POSTs the task detail
(exactly what `GET /v1/tasks/{id}` returns) with Standard Webhooks headers,
counts a 2xx as delivered and anything else (a 3xx included: redirects are
not followed) as a failure, retried on the configured schedule (the seed's
1 s, 2 s, 4 s by default). Every connection goes through the address guard.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from retouch.clock import Clock
from retouch.logs import RepeatedFailure
from retouch.metrics import CALLBACKS, STAGE_SECONDS
from retouch.netguard import AddressGuard, DestinationRefused, UrlRules, guarded_transport
from retouch.store import Store
from retouch.store.outbox import Delivery
from retouch.tasks import Task

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks prefix, not a secret
Renderer = Callable[[Task], dict[str, Any]]


def webhook_secret(signing_key: bytes, account_id: str) -> str:
    """The account's Standard Webhooks secret, derived from the server's signing key:
    nothing more to store, the same in every process, unchanged when a key rotates."""
    raw = hmac.new(signing_key, f"webhook-secret:{account_id}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(raw).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the secret's bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class CallbackPolicy:
    timeout_seconds: float = 10.0
    retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0)
    allowed_ports: frozenset[int] | None = frozenset({443})


class CallbackDispatcher:
    def __init__(
        self,
        store: Store,
        render: Renderer,
        signing_key: bytes,
        clock: Clock,
        policy: CallbackPolicy | None = None,
        *,
        guard: AddressGuard | None = None,
        poll_seconds: float = 0.2,
        concurrency: int = 8,
    ) -> None:
        self.store = store
        self.render = render
        self.signing_key = signing_key
        self.clock = clock
        self.policy = policy or CallbackPolicy()
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        guard = guard or AddressGuard()
        # The guard decides every address, at connect.
        self._rules = UrlRules.for_callbacks(
            self.policy.allowed_ports, refuse_private_literals=False
        )
        self._client = httpx.Client(
            transport=guarded_transport(guard),
            follow_redirects=False,
            timeout=self.policy.timeout_seconds,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Send every delivery that is due now; returns how many were attempted."""
        lock = self.policy.timeout_seconds + 30
        due = self.store.claim_due_deliveries(self.concurrency, lock)
        if len(due) <= 1:
            for delivery in due:
                self.attempt(delivery)
            return len(due)
        with ThreadPoolExecutor(max_workers=len(due)) as pool:
            list(pool.map(self.attempt, due))
        return len(due)

    def attempt(self, delivery: Delivery) -> None:
        task = self.store.get_task(delivery.task_id)
        if task is None:  # cannot happen while tasks are never deleted
            self._record(delivery, None, "the task no longer exists", final=True)
            return
        body = json.dumps(self.render(task), separators=(",", ":")).encode()
        started = time.perf_counter()
        try:
            status = self._post(delivery, task, body)
        except (httpx.HTTPError, DestinationRefused, ValueError) as exc:
            log.info("callback %s for %s failed: %s", delivery.id, task.id, exc)
            self._record(delivery, None, f"{type(exc).__name__}: {exc}"[:500])
            return
        finally:
            STAGE_SECONDS.labels("callback").observe(time.perf_counter() - started)
        if 200 <= status < 300:
            self.store.record_attempt(
                delivery.id, delivered=True, status_code=status, error=None, retry_at=None
            )
            CALLBACKS.labels("delivered").inc()
            return
        self._record(delivery, status, f"the receiver answered HTTP {status}")

    def _post(self, delivery: Delivery, task: Task, body: bytes) -> int:
        self._rules.check(delivery.url)
        timestamp = int(self.clock.now().timestamp())
        secret = webhook_secret(self.signing_key, task.account_id)
        headers = {
            "content-type": "application/json",
            "user-agent": "retouch-callbacks/1",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.id, timestamp, body),
        }
        response = self._client.post(delivery.url, content=body, headers=headers)
        return response.status_code

    def _record(
        self, delivery: Delivery, status: int | None, error: str, *, final: bool = False
    ) -> None:
        delays = self.policy.retry_delays
        retry_at = None
        if not final and delivery.attempts < len(delays):
            retry_at = self.clock.now() + timedelta(seconds=delays[delivery.attempts])
        CALLBACKS.labels("failed" if retry_at is None else "retry").inc()
        self.store.record_attempt(
            delivery.id, delivered=False, status_code=status, error=error, retry_at=retry_at
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="callbacks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._client.close()

    def _loop(self) -> None:
        failures = RepeatedFailure(log, "the callback dispatcher")
        while not self._stop.is_set():
            try:
                busy = self.run_once()
                failures.succeeded()
            except Exception as exc:
                failures.failed(exc)
                busy = 0
            if not busy:
                self._stop.wait(self.poll_seconds)
