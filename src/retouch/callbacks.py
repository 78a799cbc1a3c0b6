"""Signed, durable callbacks.

A dispatcher sends the outbox's due deliveries: it POSTs the task detail
(exactly what `GET /v1/tasks/{id}` returns) with Standard Webhooks headers,
counts a 2xx as delivered and anything else (a 3xx included: redirects are
not followed) as a failure, retried on the configured schedule (the seed's
1 s, 2 s, 4 s by default). Every connection goes through the address guard.

A delivery has the policy's timeout in all, however the receiver spends it, and
its answer's body is never read; one slow receiver delays only its own deliveries.
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
from concurrent.futures import Future, ThreadPoolExecutor, wait
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
from retouch.watchdog import Watchdog

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
    # The whole of one delivery: connecting, sending, and the receiver's status line
    # and headers (its body is never read).
    timeout_seconds: float = 10.0
    retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0)
    allowed_ports: frozenset[int] | None = frozenset({443})


class CallbackTimeout(Exception):
    """The receiver did not answer within the policy's time."""


class CallbackDispatcher:
    """Sends due deliveries on `concurrency` threads of its own. Its loop claims
    deliveries only as senders come free, and never waits for one to finish, so a
    slow receiver holds up its own deliveries and nobody else's."""

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
        self._senders = ThreadPoolExecutor(concurrency, thread_name_prefix="callback")
        self._sending = 0  # deliveries claimed and not yet finished
        self._sending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lock_seconds(self) -> float:
        """How long a claim keeps other dispatchers off a delivery: past its deadline,
        with room for recording the result."""
        return self.policy.timeout_seconds + 30

    def run_once(self) -> int:
        """Send the deliveries due now (as many as there are free senders) and wait
        for them; returns how many were attempted."""
        sending = self._send_due()
        wait(sending)
        return len(sending)

    def _send_due(self) -> list[Future[None]]:
        """Claim as many due deliveries as there are free senders, and start them."""
        with self._sending_lock:
            free = self.concurrency - self._sending
        if free <= 0:
            return []
        due = self.store.claim_due_deliveries(free, self.lock_seconds)
        with self._sending_lock:
            self._sending += len(due)
        return [self._senders.submit(self._send, delivery) for delivery in due]

    def _send(self, delivery: Delivery) -> None:
        try:
            self.attempt(delivery)
        except Exception:
            # Its lock passes and it is claimed again: nothing is lost.
            log.exception("callback %s: the attempt could not be completed", delivery.id)
        finally:
            with self._sending_lock:
                self._sending -= 1

    def attempt(self, delivery: Delivery) -> None:
        task = self.store.get_task(delivery.task_id)
        if task is None:  # cannot happen while tasks are never deleted
            self._record(delivery, None, "the task no longer exists", final=True)
            return
        body = json.dumps(self.render(task), separators=(",", ":")).encode()
        started = time.perf_counter()
        try:
            status = self._post(delivery, task, body)
        except (httpx.HTTPError, CallbackTimeout, DestinationRefused, ValueError) as exc:
            log.info("callback %s for %s failed: %s", delivery.id, task.id, exc)
            self._record(delivery, None, f"{type(exc).__name__}: {exc}"[:500])
            return
        finally:
            STAGE_SECONDS.labels("callback").observe(time.perf_counter() - started)
        if 200 <= status < 300:
            recorded = self.store.record_attempt(
                delivery, delivered=True, status_code=status, error=None, retry_at=None
            )
            if recorded:
                CALLBACKS.labels("delivered").inc()
            return
        self._record(delivery, status, f"the receiver answered HTTP {status}")

    def _post(self, delivery: Delivery, task: Task, body: bytes) -> int:
        """The receiver's status code. Its body is never read: it could be endless."""
        self._rules.check(delivery.url)
        headers = self._headers(delivery, task, body)
        with Watchdog(self.policy.timeout_seconds) as watchdog:
            try:
                with self._client.stream(
                    "POST",
                    delivery.url,
                    content=body,
                    headers=headers,
                    extensions={"trace": watchdog.trace},
                ) as response:
                    return response.status_code
            except httpx.HTTPError as exc:
                if watchdog.tripped() is not None or isinstance(exc, httpx.TimeoutException):
                    raise CallbackTimeout(
                        f"the receiver did not answer within {self.policy.timeout_seconds:g} s "
                        f"({type(exc).__name__})"
                    ) from exc
                raise

    def _headers(self, delivery: Delivery, task: Task, body: bytes) -> dict[str, str]:
        timestamp = int(self.clock.now().timestamp())
        secret = webhook_secret(self.signing_key, task.account_id)
        return {
            "content-type": "application/json",
            "user-agent": "retouch-callbacks/1",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.id, timestamp, body),
        }

    def _record(
        self, delivery: Delivery, status: int | None, error: str, *, final: bool = False
    ) -> None:
        delays = self.policy.retry_delays
        retry_at = None
        if not final and delivery.attempts < len(delays):
            retry_at = self.clock.now() + timedelta(seconds=delays[delivery.attempts])
        recorded = self.store.record_attempt(
            delivery, delivered=False, status_code=status, error=error, retry_at=retry_at
        )
        if recorded:
            CALLBACKS.labels("failed" if retry_at is None else "retry").inc()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="callbacks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming, and wait for the deliveries under way (each ends by its
        deadline) so that their results are recorded."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._senders.shutdown(wait=True)
        self._client.close()

    def _loop(self) -> None:
        failures = RepeatedFailure(log, "the callback dispatcher")
        while not self._stop.is_set():
            try:
                started = len(self._send_due())
                failures.succeeded()
            except Exception as exc:
                failures.failed(exc)
                started = 0
            if not started:  # nothing due, or every sender busy
                self._stop.wait(self.poll_seconds)
