"""Signed, durable callbacks, delivered to a real HTTPS receiver on loopback
whose self-signed CA is trusted through SSL_CERT_FILE, as an operator would."""

from __future__ import annotations

import itertools
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook

from retouch.api.service import TaskService
from retouch.callbacks import CallbackDispatcher, CallbackPolicy, sign, webhook_secret
from retouch.clock import FakeClock
from retouch.keys import ApiKey
from retouch.netguard import AddressGuard
from retouch.storage import LocalResultStorage
from retouch.store import Store
from retouch.store.schema import callback_deliveries
from retouch.tasks import EditParams, Task, TaskError, TaskStatus
from tests.integration.conftest import SPEC
from tests.support import pending_task, wait_for

SIGNING_KEY = b"server-signing-key"


@dataclass
class Answer:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    # Writes the whole answer itself, in place of the above.
    respond: Callable[[BaseHTTPRequestHandler], None] | None = None


@dataclass
class Drip:
    """An answer that writes `head` and then one byte every `every` seconds, without
    end, until the caller hangs up (or a minute has passed)."""

    head: bytes
    every: float = 0.05
    sent: int = 0
    hung_up: threading.Event = field(default_factory=threading.Event)

    def __call__(self, handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        give_up = time.monotonic() + 60
        try:
            handler.wfile.write(self.head)
            while time.monotonic() < give_up:
                time.sleep(self.every)
                handler.wfile.write(b"a")
                self.sent += 1
        except OSError:
            self.hung_up.set()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTPS endpoint that answers from a script and records every request."""

    def __init__(self, ca: trustme.CA, port: int = 0) -> None:
        self.script: list[Answer] = []
        self.received: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append(Received(dict(self.headers.items()), body))
                answer = receiver.script.pop(0) if receiver.script else Answer()
                if answer.respond is not None:
                    answer.respond(self)
                    return
                time.sleep(answer.delay)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}/hooks/retouch"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def clock() -> FakeClock:
    # Receivers check webhook-timestamp against their own clock: start from now.
    return FakeClock(datetime.now(UTC))


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """The receivers' CA, trusted by the dispatcher through SSL_CERT_FILE."""
    authority = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    return authority


@pytest.fixture
def receiver(ca: trustme.CA) -> Iterator[Receiver]:
    endpoint = Receiver(ca)
    yield endpoint
    endpoint.close()


@pytest.fixture
def key(store: Store) -> ApiKey:
    return store.create_key("alice")[0]


@pytest.fixture
def service(store: Store, clock: FakeClock, tmp_path: Path) -> TaskService:
    storage = LocalResultStorage(tmp_path / "results", SIGNING_KEY, clock)
    return TaskService(store, storage, clock, [SPEC])


def dispatcher(
    store: Store,
    service: TaskService,
    clock: FakeClock,
    *,
    poll_seconds: float = 0.2,
    **policy: Any,
) -> CallbackDispatcher:
    return CallbackDispatcher(
        store,
        lambda task: service.render(task, "http://retouch.test"),
        SIGNING_KEY,
        clock,
        CallbackPolicy(**{"allowed_ports": None, **policy}),
        guard=AddressGuard(allow_private_networks=True),
        poll_seconds=poll_seconds,
    )


def finished_task(store: Store, key: ApiKey, url: str, outcome: str = "completed") -> Task:
    now = store.clock.now()
    params = EditParams(prompt="edit", image_urls=["https://a.test/a.png"], callback_url=url)
    task = pending_task(key, now, params, credits=1.0, model=SPEC.name)
    store.create_task(task)
    if outcome == "cancelled":
        store.request_cancel(task.id, key.id)
    else:
        store.claim_next("w1", 30)
        if outcome == "failed":
            store.fail(task.id, "w1", TaskError(500, "internal_server_error", "boom"))
        else:
            store.complete(task.id, "w1", [], now)
    finished = store.get_task(task.id)
    assert finished is not None
    return finished


def verified(key: ApiKey, received: Received) -> dict[str, Any]:
    """The payload, after the Standard Webhooks library has checked its signature."""
    secret = webhook_secret(SIGNING_KEY, key.account_id)
    payload = Webhook(secret).verify(received.body, received.headers)
    assert isinstance(payload, dict)
    return payload


def deliveries(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(callback_deliveries)).scalar_one()


@pytest.mark.parametrize("outcome", ["completed", "failed", "cancelled"])
def test_every_final_state_is_delivered_signed(
    store: Store,
    service: TaskService,
    clock: FakeClock,
    key: ApiKey,
    receiver: Receiver,
    outcome: str,
) -> None:
    task = finished_task(store, key, receiver.url, outcome)
    assert deliveries(store) == 1  # queued with the final state, not later
    assert dispatcher(store, service, clock).run_once() == 1
    [request] = receiver.received
    payload = verified(key, request)
    assert payload["id"] == task.id and payload["status"] == outcome
    assert request.headers["webhook-id"].startswith("msg_")
    assert request.headers["content-type"] == "application/json"
    detail = service.render(store.get_task(task.id), "http://retouch.test")  # type: ignore[arg-type]
    assert detail["callback"] == {"status": "delivered", "attempts": 1, "last_status_code": 200}
    # The body is the task detail as GET shows it (the callback then still pending).
    assert {k: v for k, v in payload.items() if k != "callback"} == {
        k: v for k, v in detail.items() if k != "callback"
    }


def test_a_task_without_callback_url_queues_nothing(store: Store, key: ApiKey) -> None:
    task = finished_task(store, key, "")
    assert task.status is TaskStatus.COMPLETED and deliveries(store) == 0


def test_failing_twice_then_succeeding_is_three_deliveries_of_one_message(
    store: Store, service: TaskService, clock: FakeClock, key: ApiKey, receiver: Receiver
) -> None:
    receiver.script = [Answer(500), Answer(503), Answer(200)]
    finished_task(store, key, receiver.url)
    sender = dispatcher(store, service, clock)
    assert sender.run_once() == 1
    assert sender.run_once() == 0  # the retry is not due yet
    clock.advance(1)
    assert sender.run_once() == 1
    clock.advance(2)
    assert sender.run_once() == 1
    assert len(receiver.received) == 3
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    for request in receiver.received:
        verified(key, request)
    clock.advance(60)
    assert sender.run_once() == 0


def test_a_receiver_that_always_fails_gets_four_attempts_on_schedule(
    store: Store, service: TaskService, clock: FakeClock, key: ApiKey, receiver: Receiver
) -> None:
    receiver.script = [Answer(500)] * 10
    task = finished_task(store, key, receiver.url)
    sender = dispatcher(store, service, clock)
    for _ in range(20):
        sender.run_once()
        clock.advance(0.5)
    stamps = [int(r.headers["webhook-timestamp"]) for r in receiver.received]
    assert len(stamps) == 4
    assert [b - a for a, b in itertools.pairwise(stamps)] == [1, 2, 4]
    state = service.callback_state(store.get_task(task.id))  # type: ignore[arg-type]
    assert state == {"status": "failed", "attempts": 4, "last_status_code": 500}


def test_a_receiver_slower_than_the_timeout_is_a_failure(
    store: Store, service: TaskService, clock: FakeClock, key: ApiKey, receiver: Receiver
) -> None:
    receiver.script = [Answer(200, delay=1.5)]
    task = finished_task(store, key, receiver.url)
    started = time.monotonic()
    dispatcher(store, service, clock, timeout_seconds=0.3).run_once()
    assert time.monotonic() - started < 1.4
    delivery = store.latest_delivery(task.id)
    assert delivery is not None and delivery.status == "pending" and delivery.attempts == 1
    assert delivery.last_error is not None and "Timeout" in delivery.last_error


def test_a_receiver_that_drips_its_headers_is_cut_off_at_the_deadline(
    store: Store, service: TaskService, clock: FakeClock, key: ApiKey, receiver: Receiver
) -> None:
    """Each byte comes well within the read timeout: only a deadline on the whole
    delivery ends it."""
    drip = Drip(b"HTTP/1.1 200 OK\r\nx-drip: ")
    receiver.script = [Answer(respond=drip)]
    task = finished_task(store, key, receiver.url)
    started = time.monotonic()
    assert dispatcher(store, service, clock, timeout_seconds=0.5).run_once() == 1
    # Cut off: the drip would go on for a minute (the bound leaves room for a busy CPU).
    assert time.monotonic() - started < 5
    assert drip.hung_up.wait(2)
    delivery = store.latest_delivery(task.id)
    assert delivery is not None and delivery.status == "pending" and delivery.attempts == 1
    assert (
        delivery.last_status_code is None
        and delivery.next_attempt_at == clock.now() + timedelta(seconds=1)
    )
    assert "CallbackTimeout: the receiver did not answer within 0.5 s" in (
        delivery.last_error or ""
    )


@pytest.mark.parametrize(
    ("status", "state"), [(200, "delivered"), (503, "pending")], ids=["2xx", "error"]
)
def test_a_receivers_endless_body_is_never_read(
    store: Store,
    service: TaskService,
    clock: FakeClock,
    key: ApiKey,
    receiver: Receiver,
    status: int,
    state: str,
) -> None:
    """The status line is the answer: the delivery ends as soon as it has come (long
    before the deadline), and the connection is dropped rather than the body read."""
    drip = Drip(f"HTTP/1.1 {status} Whatever\r\ncontent-type: text/plain\r\n\r\n".encode())
    receiver.script = [Answer(respond=drip)]
    task = finished_task(store, key, receiver.url)
    started = time.monotonic()
    dispatcher(store, service, clock, timeout_seconds=10).run_once()
    assert time.monotonic() - started < 2
    assert drip.hung_up.wait(2) and drip.sent < 40  # the receiver could send no more
    state_now = service.callback_state(store.get_task(task.id))  # type: ignore[arg-type]
    assert state_now == {"status": state, "attempts": 1, "last_status_code": status}


def test_a_receiver_that_hangs_holds_up_no_other_delivery(
    store: Store,
    service: TaskService,
    clock: FakeClock,
    key: ApiKey,
    ca: trustme.CA,
    receiver: Receiver,
) -> None:
    receiver.script = [Answer(200, delay=5)]
    hanging = finished_task(store, key, receiver.url)
    other = Receiver(ca)
    sender = dispatcher(store, service, clock, timeout_seconds=1.5, poll_seconds=0.02)
    sender.start()
    try:
        wait_for(lambda: receiver.received, timeout=5, what="the hanging delivery to start")
        prompt = finished_task(store, key, other.url)
        started = time.monotonic()
        wait_for(lambda: other.received, timeout=5, what="the other delivery")
        assert time.monotonic() - started < 0.75
        delivery = store.latest_delivery(hanging.id)
        assert delivery is not None and delivery.attempts == 0  # still under way
    finally:
        sender.stop()  # waits for the hanging one: it ends at its deadline
        other.close()
    assert service.callback_state(store.get_task(prompt.id))["status"] == "delivered"  # type: ignore[arg-type]
    delivery = store.latest_delivery(hanging.id)
    assert delivery is not None and delivery.status == "pending" and delivery.attempts == 1
    assert "CallbackTimeout" in (delivery.last_error or "")


def test_the_result_of_a_claim_taken_over_meanwhile_is_dropped(
    store: Store,
    service: TaskService,
    clock: FakeClock,
    key: ApiKey,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delivery outlives its lock (a stalled process, say) and another dispatcher
    claims it again: the first one's late answer must not overwrite that claim."""
    receiver.script = [Answer(200, delay=0.5)]
    task = finished_task(store, key, receiver.url)
    sender = dispatcher(store, service, clock, timeout_seconds=5)
    sending = threading.Thread(target=sender.run_once)
    caplog.set_level(logging.WARNING, logger="retouch.store.outbox")
    sending.start()
    wait_for(lambda: receiver.received, timeout=5, what="the delivery to start")
    clock.advance(sender.lock_seconds + 1)
    [again] = store.claim_due_deliveries(1, 60)
    sending.join(5)
    assert not sending.is_alive() and "dropped the result" in caplog.text
    delivery = store.latest_delivery(task.id)
    assert delivery is not None and (delivery.status, delivery.attempts) == ("pending", 0)
    assert delivery.locked_until == again.locked_until  # the new claim stands
    assert store.record_attempt(again, delivered=True, status_code=200, error=None, retry_at=None)


def test_redirects_are_failures_and_not_followed(
    store: Store, service: TaskService, clock: FakeClock, key: ApiKey, receiver: Receiver
) -> None:
    receiver.script = [Answer(302, headers={"Location": "https://127.0.0.1:1/elsewhere"})]
    task = finished_task(store, key, receiver.url)
    dispatcher(store, service, clock).run_once()
    assert len(receiver.received) == 1
    state = service.callback_state(store.get_task(task.id))  # type: ignore[arg-type]
    assert state == {"status": "pending", "attempts": 1, "last_status_code": 302}


def test_a_restart_between_retries_resumes_the_schedule(
    store: Store,
    service: TaskService,
    clock: FakeClock,
    key: ApiKey,
    receiver: Receiver,
    database_url: str,
) -> None:
    receiver.script = [Answer(500), Answer(200)]
    task = finished_task(store, key, receiver.url)
    dispatcher(store, service, clock).run_once()
    # A new process: a new store and dispatcher over the same database.
    restarted = Store.from_url(database_url, clock)
    try:
        clock.advance(1)
        assert dispatcher(restarted, service, clock).run_once() == 1
    finally:
        restarted.close()
    assert [r.headers["webhook-id"] for r in receiver.received].count(
        receiver.received[0].headers["webhook-id"]
    ) == 2
    state = service.callback_state(store.get_task(task.id))  # type: ignore[arg-type]
    assert state["status"] == "delivered" and state["attempts"] == 2


def test_callbacks_to_private_addresses_are_refused_by_default(
    store: Store, service: TaskService, clock: FakeClock, key: ApiKey, receiver: Receiver
) -> None:
    task = finished_task(store, key, receiver.url)
    strict = CallbackDispatcher(
        store,
        lambda t: service.render(t, "http://retouch.test"),
        SIGNING_KEY,
        clock,
        CallbackPolicy(allowed_ports=None),
    )
    strict.run_once()
    assert receiver.received == []
    delivery = store.latest_delivery(task.id)
    assert delivery is not None and "non-public" in (delivery.last_error or "")


def test_signatures_follow_standard_webhooks() -> None:
    secret = webhook_secret(b"k", "acct_1")
    assert secret.startswith("whsec_") and secret == webhook_secret(b"k", "acct_1")
    assert secret != webhook_secret(b"k", "acct_2") != webhook_secret(b"other", "acct_1")
    body = json.dumps({"id": "task"}).encode()
    signature = sign(secret, "msg_1", 1767225600, body)
    expected = Webhook(secret).sign("msg_1", datetime.fromtimestamp(1767225600, UTC), body.decode())
    assert signature == expected
