"""The result-storage contract, run on the local directory and on S3 (a real SeaweedFS).

Links are fetched over HTTP with plain httpx, the way a client would: local links
from the real API (`create_app` served by uvicorn), S3 links straight from the
store. Each S3 test gets a bucket of its own; SeaweedFS starts once per session.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from retouch.accounts import Admission
from retouch.api.app import create_app
from retouch.api.service import TaskService
from retouch.clock import FakeClock
from retouch.errors import NotFoundError
from retouch.janitor import FAILURES_IN_A_ROW, Janitor
from retouch.keys import ApiKey
from retouch.models import ModelSpec
from retouch.s3storage import MAX_LINK_SECONDS, S3ResultStorage
from retouch.storage import LocalResultStorage, ResultStorage, open_storage
from retouch.store import Store, create_db_engine, migrate
from retouch.tasks import EditParams, Task
from tests.seaweed import (
    SeaweedS3,
    seaweedfs_fixture,  # noqa: F401  (the `seaweedfs` fixture)
)
from tests.support import LiveServer, free_port, pending_task, png_bytes, wait_for

TASK = "task-unified-1767225600-abcd1234"
RUN = "0123abcd"  # one attempt's tag
PREFIX = "retouch/results"
SIGNING_KEY = b"test-secret"
SPEC = ModelSpec(name="qwen-image-edit", checkpoint="fixture", steps=4, price=1.5)
PNG = png_bytes((16, 16))


@dataclass
class Backend:
    name: str
    storage: ResultStorage
    clock: FakeClock
    base_url: str
    # Everything the backend holds: files under the root, or objects in the bucket.
    stored: Callable[[], set[str]]
    # Let a link's lifetime pass (the fake clock locally, real time on S3).
    outlive: Callable[[str], None]
    # Put something there by other means than Retouch's (a key ending in / is a
    # folder, or an S3 console's folder marker).
    put_foreign: Callable[[str], None]


@pytest.fixture(params=["local", "s3"])
def backend(
    request: pytest.FixtureRequest,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Backend]:
    if request.param == "local":
        yield from _local_backend(clock, tmp_path)
    else:
        seaweedfs: SeaweedS3 = request.getfixturevalue("seaweedfs")
        with_credentials(monkeypatch, tmp_path, seaweedfs)
        yield from _s3_backend(clock, seaweedfs)


def _local_backend(clock: FakeClock, tmp_path: Path) -> Iterator[Backend]:
    root = tmp_path / "results"
    storage = LocalResultStorage(root, SIGNING_KEY, clock)

    def stored() -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    def outlive(link: str) -> None:
        expires = int(parse_qs(urlsplit(link).query)["expires"][0])
        clock.advance(expires - clock.now().timestamp())

    def put_foreign(key: str) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if key.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(b"not Retouch's")

    # The real API serves the links (`GET /v1/files/...`); its database stays empty.
    engine = create_db_engine(f"sqlite:///{tmp_path / 'api.db'}")
    migrate(engine)
    store = Store(engine, clock)
    try:
        server = LiveServer(create_app(TaskService(store, storage, clock, [SPEC])))
        try:
            yield Backend("local", storage, clock, server.url, stored, outlive, put_foreign)
        finally:
            server.close()
    finally:
        store.close()


def _s3_backend(clock: FakeClock, seaweedfs: SeaweedS3) -> Iterator[Backend]:
    client = seaweedfs.admin
    bucket = new_bucket(client)
    # Credentials and region come from the environment, as in production.
    storage = S3ResultStorage(bucket, PREFIX, clock, endpoint_url=seaweedfs.endpoint_url)

    def stored() -> set[str]:
        return listed(client, bucket)

    def outlive(link: str) -> None:
        query = parse_qs(urlsplit(link).query)
        signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        expired = signed.timestamp() + int(query["X-Amz-Expires"][0])
        wait = expired - time.time() + 0.2
        assert wait < 2.5, "only short-lived links can be outlived in a test"
        time.sleep(max(wait, 0))

    def put_foreign(key: str) -> None:
        client.put_object(
            Bucket=bucket, Key=f"{PREFIX}/{key}", Body=b"" if key.endswith("/") else b"x"
        )

    try:
        yield Backend("s3", storage, clock, "http://unused", stored, outlive, put_foreign)
    finally:
        drop_bucket(client, bucket)


def with_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: SeaweedS3) -> None:
    """boto3's credential chain sees the test identity and nothing of this machine's."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3.region)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def new_bucket(client: Any) -> str:
    bucket = f"retouch-{secrets.token_hex(6)}"
    client.create_bucket(Bucket=bucket)
    return bucket


def drop_bucket(client: Any, bucket: str) -> None:
    keys = [{"Key": key} for key in listed(client, bucket)]
    if keys:
        client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


def listed(client: Any, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def in_store(backend: Backend, *keys: str) -> set[str]:
    """Where `keys` live in the backend's own terms (S3: under the prefix)."""
    return {f"{PREFIX}/{key}" if backend.name == "s3" else key for key in keys}


def later(backend: Backend, **delta: float) -> datetime:
    return backend.clock.now() + timedelta(**delta)


# -- the contract ----------------------------------------------------------


def test_put_returns_the_key_and_the_link_downloads_the_bytes(backend: Backend) -> None:
    key = backend.storage.put(TASK, 0, PNG, RUN)
    assert key == f"{TASK}/0-{RUN}.png"
    assert backend.stored() == in_store(backend, key)
    response = httpx.get(backend.storage.link(backend.base_url, key, later(backend, hours=24)))
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


def test_put_replaces_an_existing_result(backend: Backend) -> None:
    key = backend.storage.put(TASK, 1, b"first", RUN)
    assert backend.storage.put(TASK, 1, PNG, RUN) == key
    link = backend.storage.link(backend.base_url, key, later(backend, hours=1))
    assert httpx.get(link).content == PNG


def test_altered_links_are_refused(backend: Backend) -> None:
    key = backend.storage.put(TASK, 0, PNG, RUN)
    backend.storage.put(TASK, 1, b"another result", RUN)
    link = backend.storage.link(backend.base_url, key, later(backend, hours=1))
    assert httpx.get(link).status_code == 200
    flipped = link[:-1] + ("0" if link[-1] != "0" else "1")  # the signature ends the URL
    other_file = link.replace(f"{TASK}/0-{RUN}.png", f"{TASK}/1-{RUN}.png")
    for altered in (flipped, other_file):
        assert altered != link
        assert httpx.get(altered).status_code == 403, altered


def test_expired_links_are_refused(backend: Backend) -> None:
    key = backend.storage.put(TASK, 0, PNG, RUN)
    link = backend.storage.link(backend.base_url, key, later(backend, seconds=1))
    backend.outlive(link)
    response = httpx.get(link)
    assert response.status_code == 403
    assert "expired" in response.text.lower()


def test_delete_removes_the_results_and_ignores_missing_ones(backend: Backend) -> None:
    keys = [backend.storage.put(TASK, index, PNG, RUN) for index in range(3)]
    link = backend.storage.link(backend.base_url, keys[0], later(backend, hours=1))
    backend.storage.delete(keys[:2])
    assert backend.stored() == in_store(backend, keys[2])
    assert httpx.get(link).status_code == 404
    backend.storage.delete([*keys, f"task-unified-1767225600-zzzz9999/0-{RUN}.png"])
    assert backend.stored() == set()
    backend.storage.delete([])


def test_delete_task_removes_every_attempts_results_but_those_kept(backend: Backend) -> None:
    """Each attempt stores under its own run tag; a task's objects are swept whole
    (keeping the results of the attempt that completed it), legacy keys included."""
    mine = [backend.storage.put(TASK, index, PNG, "aaaa1111") for index in range(2)]
    left = backend.storage.put(TASK, 0, b"a killed attempt's", "bbbb2222")
    backend.storage.put_object(f"{TASK}/1.png", PNG, "image/png")  # stored before run tags
    other = backend.storage.put("task-unified-1767225600-zzzz9999", 0, PNG, "aaaa1111")
    assert left not in mine and len(backend.stored()) == 5
    assert backend.storage.delete_task(TASK, keep=mine) == 2
    assert backend.stored() == in_store(backend, *mine, other)
    assert backend.storage.delete_task(TASK) == 2
    assert backend.stored() == in_store(backend, other)
    assert backend.storage.delete_task(TASK) == 0


def test_keys_outside_the_pattern_are_refused(backend: Backend) -> None:
    for task_id, index, run in [
        ("../../etc", 0, RUN), ("task-unified-1-ABCDEFGH", 0, RUN), (TASK, 100, RUN),
        (TASK, 0, "../../x"), (TASK, 0, "ABCDEFGH"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match="not a result key"):
            backend.storage.put(task_id, index, PNG, run)
    for key in ["../../etc/passwd", f"{TASK}/0.jpg", f"/{TASK}/0.png", f"{TASK}/../0.png"]:
        with pytest.raises(ValueError, match="not a result key"):
            backend.storage.delete([key])
    for task_id in ["../../etc", "task-unified-1-ABCDEFGH", f"{TASK}/.."]:
        with pytest.raises(ValueError, match="not a task id"):
            backend.storage.delete_task(task_id)
    assert backend.stored() == set()


def test_check_passes(backend: Backend) -> None:
    backend.storage.check()


def test_the_janitor_deletes_expired_results(
    backend: Backend, store: Store, clock: FakeClock
) -> None:
    key = store.create_key("alice")[0]
    task = completed_task(store, key, backend.storage, results=2, ttl_seconds=3600)
    janitor = Janitor(store, backend.storage, max_attempts=2, interval_seconds=60)
    assert janitor.purge_expired_results() == 0
    assert backend.stored() == in_store(backend, *task_keys(store, task.id))
    clock.advance(3600)
    assert janitor.purge_expired_results() == 1
    assert backend.stored() == set()
    assert janitor.purge_expired_results() == 0


def test_the_janitor_deletes_what_a_killed_attempt_left_of_a_failed_task(
    backend: Backend, store: Store, clock: FakeClock
) -> None:
    """A worker killed while storing results (one of two stored) leaves that image
    behind; once the reaper has given the task up, the janitor deletes it, and
    leaves a completed task's results alone."""
    key = store.create_key("alice")[0]
    done = completed_task(store, key, backend.storage, results=1, ttl_seconds=3600)
    params = EditParams(prompt="edit", image_urls=["https://example.com/a.png"], n=2)
    task = pending_task(key, clock.now(), params, credits=2.0, model=SPEC.name)
    store.create_task(task)
    assert store.claim_next("killed-worker", 30.0) is not None
    backend.storage.put(task.id, 0, PNG, RUN)  # ... and the worker dies here
    steady = [0.0]
    janitor = Janitor(
        store, backend.storage, max_attempts=1, interval_seconds=60, lease_seconds=30.0,
        monotonic=lambda: steady[0],
    )  # fmt: skip
    assert janitor.purge_abandoned_results() == 0  # the task may still complete
    clock.advance(31)
    assert janitor.reap_leases() == 0  # seen expired; taken once it stays so
    steady[0] += 15.0
    assert janitor.reap_leases() == 1
    assert janitor.purge_abandoned_results() == 1
    assert backend.stored() == in_store(backend, *task_keys(store, done.id))
    assert janitor.purge_abandoned_results() == 0


def test_objects_that_are_no_uploads_stop_no_purge_of_uploads(backend: Backend) -> None:
    """Other things under `uploads/` (an S3 console's folder marker, a stray file)
    are left alone, and the uploads beside them are purged all the same."""
    upload = "uploads/up_" + "ab" * 12
    backend.storage.put_object(upload, PNG, "image/png")
    for foreign in ("uploads/", "uploads/notes.txt"):
        backend.put_foreign(foreign)
    strays = backend.stored() - in_store(backend, upload)
    assert in_store(backend, "uploads/notes.txt") <= strays
    # Everything there was stored before this cutoff (real time: S3 keeps its own).
    assert backend.storage.purge_uploads(datetime.now(UTC) + timedelta(hours=1)) == 1
    assert backend.stored() == strays


def expired_tasks(store: Store, storage: ResultStorage, count: int) -> list[str]:
    """`count` completed tasks whose results have expired, in the order of their ids."""
    key = store.create_key("alice")[0]
    clock = store.clock
    assert isinstance(clock, FakeClock)
    made = []
    for _ in range(count):
        made.append(completed_task(store, key, storage, results=1, ttl_seconds=60).id)
        clock.advance(1)  # ids carry their creation time: they sort in this order
    clock.advance(60)
    assert made == sorted(made)
    return made


def failing_for(
    monkeypatch: pytest.MonkeyPatch, storage: ResultStorage, task_ids: set[str]
) -> None:
    """Deleting the objects of the tasks in `task_ids` fails, every time (a bucket
    policy that denies it, say); the others' go as usual."""
    real = storage.delete_task

    def delete_task(task_id: str, keep: Collection[str] = ()) -> int:
        if task_id in task_ids:
            raise OSError(f"AccessDenied: deleting the objects of {task_id}")
        return real(task_id, keep)

    monkeypatch.setattr(storage, "delete_task", delete_task)


def test_a_task_whose_objects_cannot_be_deleted_holds_up_no_other(
    backend: Backend, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep passes over it, batch after batch (one task a batch here, the
    failing one first), and tries it again at the next sweep."""
    first = expired_tasks(store, backend.storage, 3)[0]
    kept = backend.stored()
    failing = {first}
    failing_for(monkeypatch, backend.storage, failing)
    janitor = Janitor(store, backend.storage, max_attempts=2, interval_seconds=60, batch_size=1)
    assert janitor.purge_expired_results() == 2
    assert backend.stored() == {key for key in kept if first in key}
    assert store.expired_results() == [first]
    assert janitor.purge_expired_results() == 0
    failing.clear()  # fixed
    assert janitor.purge_expired_results() == 1
    assert backend.stored() == set() and store.expired_results() == []


def test_a_sweep_stops_when_deletes_keep_failing_and_the_next_goes_on_after_them(
    backend: Backend, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several tasks in a row failing looks like a result storage that is away: the
    sweep stops (the lease checks share its thread) and says so; the next one
    begins after them, so they cannot hold up the tasks behind them for good."""
    made = expired_tasks(store, backend.storage, 5)
    failing_for(monkeypatch, backend.storage, set(made[:FAILURES_IN_A_ROW]))
    janitor = Janitor(store, backend.storage, max_attempts=2, interval_seconds=60, batch_size=2)
    with pytest.raises(OSError, match="AccessDenied"):
        janitor.purge_expired_results()
    assert store.expired_results() == made
    assert janitor.purge_expired_results() == 2
    assert store.expired_results() == made[:FAILURES_IN_A_ROW]
    with pytest.raises(OSError, match="AccessDenied"):
        janitor.purge_expired_results()


def completed_task(
    store: Store, key: ApiKey, storage: ResultStorage, results: int, ttl_seconds: float
) -> Task:
    now = store.clock.now()
    params = EditParams(prompt="edit", image_urls=["https://example.com/a.png"], n=results)
    task = pending_task(key, now, params, credits=float(results), model=SPEC.name)
    store.create_task(task)
    assert store.claim_next("w1", 30.0) is not None
    keys = [storage.put(task.id, index, PNG, RUN) for index in range(results)]
    store.complete(task.id, "w1", keys, now + timedelta(seconds=ttl_seconds))
    return task


def task_keys(store: Store, task_id: str) -> list[str]:
    task = store.get_task(task_id)
    assert task is not None
    return task.result_keys


# -- local only -----------------------------------------------------------


def test_local_check_fails_where_results_cannot_be_written(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")
    with pytest.raises(OSError, match="a-file"):
        LocalResultStorage(blocked, SIGNING_KEY, FakeClock()).check()


# -- S3 only --------------------------------------------------------------


@pytest.fixture
def s3(
    seaweedfs: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[SeaweedS3, Any, str]]:
    """SeaweedFS, a client of it and a fresh bucket; credentials in the environment."""
    with_credentials(monkeypatch, tmp_path, seaweedfs)
    client = seaweedfs.admin
    bucket = new_bucket(client)
    yield seaweedfs, client, bucket
    drop_bucket(client, bucket)


def test_s3_objects_land_under_the_prefix(s3: tuple[SeaweedS3, Any, str]) -> None:
    seaweedfs, client, bucket = s3
    clock = FakeClock()
    nested = S3ResultStorage(bucket, "/a/b/", clock, endpoint_url=seaweedfs.endpoint_url)
    bare = S3ResultStorage(bucket, "", clock, endpoint_url=seaweedfs.endpoint_url)
    zero, one = f"{TASK}/0-{RUN}.png", f"{TASK}/1-{RUN}.png"
    assert nested.put(TASK, 0, PNG, RUN) == zero
    assert bare.put(TASK, 1, PNG, RUN) == one
    assert listed(client, bucket) == {f"a/b/{zero}", one}
    head = client.head_object(Bucket=bucket, Key=f"a/b/{zero}")
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(PNG)
    assert "/a/b/" in nested.link("", zero, clock.now() + timedelta(hours=1))
    bare.delete([zero, one])  # not the nested one
    assert listed(client, bucket) == {f"a/b/{zero}"}
    assert bare.delete_task(TASK) == 0 and nested.delete_task(TASK) == 1
    assert listed(client, bucket) == set()


def test_s3_links_last_from_the_clock_until_they_expire(s3: tuple[SeaweedS3, Any, str]) -> None:
    seaweedfs, _client, bucket = s3
    clock = FakeClock(datetime(2020, 5, 1, tzinfo=UTC))  # far from real time
    storage = S3ResultStorage(bucket, "", clock, endpoint_url=seaweedfs.endpoint_url)
    key = storage.put(TASK, 0, PNG, RUN)

    def expires_in(expires_at: datetime) -> int:
        link = storage.link("http://ignored", key, expires_at)
        assert link.startswith(f"{seaweedfs.endpoint_url}/{bucket}/{key}?")
        return int(parse_qs(urlsplit(link).query)["X-Amz-Expires"][0])

    assert expires_in(clock.now() + timedelta(hours=24)) == 24 * 3600
    assert expires_in(clock.now() + timedelta(days=30)) == MAX_LINK_SECONDS == 7 * 24 * 3600
    assert expires_in(clock.now() - timedelta(hours=1)) == 1
    link = storage.link("", key, clock.now() + timedelta(hours=24))
    assert httpx.get(link).content == PNG


def test_s3_requests_need_the_right_credentials(s3: tuple[SeaweedS3, Any, str]) -> None:
    seaweedfs, client, bucket = s3
    client.put_object(Bucket=bucket, Key=f"{TASK}/0.png", Body=PNG)
    assert httpx.get(f"{seaweedfs.endpoint_url}/{bucket}/{TASK}/0.png").status_code == 403
    wrong = SeaweedS3(seaweedfs.endpoint_url, seaweedfs.access_key, "wrong-secret").client()
    storage = S3ResultStorage(bucket, "", FakeClock(), client=wrong)
    link = storage.link("", f"{TASK}/0.png", FakeClock().now() + timedelta(hours=1))
    assert httpx.get(link).status_code == 403
    with pytest.raises(OSError, match=f"'{bucket}' at .* refused access \\(HTTP 403"):
        storage.check()


def test_s3_check_names_a_missing_bucket_and_the_endpoint(seaweedfs: SeaweedS3) -> None:
    storage = S3ResultStorage("no-such-bucket", "", FakeClock(), client=seaweedfs.admin)
    with pytest.raises(OSError) as raised:
        storage.check()
    assert str(raised.value) == (
        f"S3 bucket 'no-such-bucket' at {seaweedfs.endpoint_url} does not exist "
        "(HTTP 404 Not Found)"
    )


def test_s3_check_says_when_the_store_is_unreachable() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    closed = SeaweedS3(endpoint, "key", "secret").client(retries={"total_max_attempts": 1})
    storage = S3ResultStorage("results", "", FakeClock(), client=closed)
    with pytest.raises(OSError, match=f"'results' at {endpoint} is unreachable"):
        storage.check()


def test_with_the_object_store_unreachable_the_janitor_still_takes_back_leases(
    store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The janitor's sweep needs the object store, its lease check only the
    database: the one failing does not hold up the other, and the log says which
    one fails (never that the janitor "works again" while the store is still away)."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    closed = SeaweedS3(endpoint, "key", "secret").client(retries={"total_max_attempts": 1})
    storage = S3ResultStorage("results", "", clock, client=closed)
    key = store.create_key("alice")[0]
    params = EditParams(prompt="edit", image_urls=["https://example.com/a.png"])
    # Tasks whose results have expired, one of them created with an Idempotency-Key.
    once = Admission(100, 100, 100, idempotency_key="order-1", fingerprint="a" * 64)
    expired = []
    for admission in (once, None, None):
        task = store.create_task(pending_task(key, clock.now(), params, credits=1.0), admission)[0]
        assert store.claim_next("w1", 30.0) is not None
        store.complete(task.id, "w1", [f"{task.id}/0-{RUN}.png"], clock.now())
        expired.append(task.id)
    task = store.create_task(pending_task(key, clock.now(), params, credits=1.0))[0]
    assert store.claim_next("gone", 1.0) is not None
    clock.advance(24 * 3600)
    janitor = Janitor(
        store, storage, max_attempts=2, interval_seconds=3600, lease_seconds=0.2,
        upload_ttl_seconds=60,
    )  # fmt: skip
    janitor.start()
    try:
        wait_for(
            lambda: store.get_task(task.id).status.value == "pending",  # type: ignore[union-attr]
            timeout=20,
            what="the lease to be taken back",
        )
    finally:
        janitor.stop()
    messages = [record.getMessage() for record in caplog.records]
    # Each sweep apart: those that need the object store fail, the others go on.
    assert "the janitor's sweep of expired results failed; retrying" in messages
    assert "the janitor's sweep of expired uploads failed; retrying" in messages
    assert not any("idempotency keys failed" in message for message in messages), messages
    assert store.purge_idempotency_keys() == 0, "forgotten by the janitor"
    assert sorted(store.expired_results()) == sorted(expired), "to be swept once it is back"
    assert not any("works again" in message for message in messages), messages


def test_with_the_database_unreachable_the_janitor_says_so_once(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Every job that needs the database fails while it is away, sweep after sweep:
    that is told once. The sweep of uploads (the storage alone) goes on working,
    which says nothing about the database."""
    store = Store.from_url(f"postgresql+psycopg://retouch@127.0.0.1:{free_port()}/none", clock)
    storage = LocalResultStorage(tmp_path / "results", b"k" * 32, clock)
    janitor = Janitor(store, storage, max_attempts=2, interval_seconds=0.05, upload_ttl_seconds=60)
    janitor.start()
    try:
        time.sleep(1.0)  # about twenty sweeps and lease checks
    finally:
        janitor.stop()
        store.close()
    messages = [record.getMessage() for record in caplog.records]
    unreachable = [m for m in messages if m.startswith("the janitor (the database is")]
    assert unreachable == ["the janitor (the database is unreachable) failed; retrying"]
    assert not any("works again" in message for message in messages), messages
    assert not any("sweep of expired uploads" in message for message in messages), messages


def test_s3_storage_serves_no_files_itself() -> None:
    storage = S3ResultStorage("results", "", FakeClock(), endpoint_url="http://127.0.0.1:9")
    with pytest.raises(NotFoundError, match="S3"):
        storage.open_signed(f"{TASK}/0.png", 2_000_000_000, "0" * 64)
    with pytest.raises(ValueError, match="not a result key"):
        storage.link("", "../../etc/passwd", FakeClock().now())


# -- choosing a backend ---------------------------------------------------


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    clock = FakeClock()
    local = open_storage(None, tmp_path / "results", SIGNING_KEY, clock)
    assert isinstance(local, LocalResultStorage)
    assert local.root == tmp_path / "results"
    elsewhere = open_storage(str(tmp_path / "other"), tmp_path / "results", SIGNING_KEY, clock)
    assert isinstance(elsewhere, LocalResultStorage)
    assert elsewhere.root == tmp_path / "other"

    s3 = open_storage(
        "s3://my-bucket/some/prefix/",
        tmp_path,
        SIGNING_KEY,
        clock,
        endpoint_url="http://127.0.0.1:8333",
        region="eu-west-1",
    )
    assert isinstance(s3, S3ResultStorage)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == (
        "my-bucket",
        "some/prefix",
        "http://127.0.0.1:8333",
    )
    bare = open_storage("s3://my-bucket", tmp_path, SIGNING_KEY, clock)
    assert isinstance(bare, S3ResultStorage)
    assert (bare.bucket, bare.prefix) == ("my-bucket", "")
    for location in ("s3://", "s3:///prefix"):
        with pytest.raises(ValueError, match="names no bucket"):
            open_storage(location, tmp_path, SIGNING_KEY, clock)
