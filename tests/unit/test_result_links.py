"""Signed result links: valid until they expire, refused when altered."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from retouch.clock import FakeClock
from retouch.errors import NotFoundError, PermissionDeniedError
from retouch.storage import LocalResultStorage, link_expires, signature_matches

TASK = "task-unified-1767225600-abcd1234"
RUN = "0123abcd"


def parts(link: str) -> tuple[str, int, str]:
    split = urlsplit(link)
    query = parse_qs(split.query)
    key = split.path.removeprefix("/v1/files/")
    return key, int(query["expires"][0]), query["signature"][0]


@pytest.fixture
def storage(tmp_path: Path, clock: FakeClock) -> LocalResultStorage:
    return LocalResultStorage(tmp_path, b"secret", clock)


def test_link_opens_until_it_expires(storage: LocalResultStorage, clock: FakeClock) -> None:
    key = storage.put(TASK, 0, b"png-bytes", RUN)
    link = storage.link("http://host:8000/", key, clock.now() + timedelta(hours=24))
    assert link.startswith(f"http://host:8000/v1/files/{TASK}/0-{RUN}.png?expires=")
    path = storage.open_signed(*parts(link))
    assert path.read_bytes() == b"png-bytes"
    clock.advance(24 * 3600 - 1)
    storage.open_signed(*parts(link))
    clock.advance(1)
    with pytest.raises(PermissionDeniedError, match="expired"):
        storage.open_signed(*parts(link))


def test_altered_links_are_refused(storage: LocalResultStorage, clock: FakeClock) -> None:
    key = storage.put(TASK, 0, b"png", RUN)
    storage.put(TASK, 1, b"other", RUN)
    key_, expires, signature = parts(storage.link("http://h", key, clock.now() + timedelta(1)))
    for attempt in [
        (key_, expires + 3600, signature),
        (f"{TASK}/1-{RUN}.png", expires, signature),
        (key_, expires, signature[:-1] + ("0" if signature[-1] != "0" else "1")),
        ("../../etc/passwd", expires, signature),
    ]:
        with pytest.raises(PermissionDeniedError, match="signature"):
            storage.open_signed(*attempt)


def test_another_secret_signs_differently(tmp_path: Path, clock: FakeClock) -> None:
    one = LocalResultStorage(tmp_path, b"one", clock)
    two = LocalResultStorage(tmp_path, b"two", clock)
    key = one.put(TASK, 0, b"png", RUN)
    with pytest.raises(PermissionDeniedError):
        two.open_signed(*parts(one.link("http://h", key, clock.now() + timedelta(1))))


def test_deleted_result_is_not_found(storage: LocalResultStorage, clock: FakeClock) -> None:
    key = storage.put(TASK, 0, b"png", RUN)
    link = storage.link("http://h", key, clock.now() + timedelta(1))
    storage.delete([key])
    assert not (storage.root / TASK).exists()
    with pytest.raises(NotFoundError):
        storage.open_signed(*parts(link))


def test_malformed_signatures_are_refused_not_raised(
    storage: LocalResultStorage, clock: FakeClock
) -> None:
    """`hmac.compare_digest` raises TypeError on non-ASCII text: only well-formed
    signatures reach it."""
    key = storage.put(TASK, 0, b"png", RUN)
    key_, expires, signature = parts(storage.link("http://h", key, clock.now() + timedelta(1)))
    for bad in ["é" * 64, signature.upper(), signature[:-1], signature + "0", ""]:
        assert not signature_matches(signature, bad)
        with pytest.raises(PermissionDeniedError, match="signature"):
            storage.open_signed(key_, expires, bad)
    assert signature_matches(signature, signature)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1767225600", 1767225600), ("0", 0), ("9" * 11, 99_999_999_999), ("9" * 12, None),
     ("9" * 5000, None), ("²", None), ("٣", None), ("-1", None), ("+1", None), (" 1", None),
     ("1\n", None), ("", None)],
)  # fmt: skip
def test_link_expires_is_a_short_run_of_ascii_digits(value: str, expected: int | None) -> None:
    assert link_expires(value) == expected
