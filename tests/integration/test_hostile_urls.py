"""A corpus of hostile image URLs: each is refused with a reason naming the
parameter, and no connection reaches a forbidden address.

Every socket the fetcher opens is recorded; only loopback test hosts are really
connected to (nothing leaves this machine), and a trap listener on loopback
must stay silent.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpcore
import pytest

from retouch.errors import InvalidInputError
from retouch.fetch import ImageFetcher
from retouch.netguard import AddressGuard, IPAddress, forbidden_reason
from tests.support import ImageHost, png_bytes

PARAM = "image_urls[0]"
# 127.0.0.2 stands in for "the internet" in these tests: the one loopback
# address the guard is told to treat as public.
OUTSIDE = "127.0.0.2"

NAMES = {
    "public.test": ["93.184.216.34"],
    "outside.test": [OUTSIDE],
    "inward.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "alibaba-metadata.test": ["100.100.100.200"],
    "corp.test": ["10.1.2.3"],
    "mixed.test": ["93.184.216.34", "192.168.0.10"],
    "v6-loopback.test": ["::1"],
    "v6-ula.test": ["fd12:3456::1"],
    "v6-link-local.test": ["fe80::1"],
    "v6-mapped.test": ["::ffff:127.0.0.1"],
    "nat64.test": ["64:ff9b::a9fe:a9fe"],
    "sixtofour.test": ["2002:a00:1::1"],
    "teredo.test": ["2001:0:4136:e378:8000:63bf:80ff:fffe"],  # client 127.0.0.1
    "zero.test": ["0.0.0.0"],
    "multicast.test": ["239.1.1.1"],
}


def fake_resolver(host: str, _port: int) -> list[str]:
    if host not in NAMES:
        raise socket.gaierror(f"unknown test host {host}")
    return NAMES[host]


def reason_treating_outside_as_public(address: IPAddress) -> str | None:
    if address == ipaddress.ip_address(OUTSIDE):
        return None
    return forbidden_reason(address)


class Trap:
    """A loopback listener that records every connection it accepts."""

    def __init__(self) -> None:
        self.accepted: list[Any] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.02)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted.append(peer)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def trap() -> Iterator[Trap]:
    listener = Trap()
    yield listener
    listener.close()
    assert listener.accepted == [], "a hostile URL reached the loopback trap"


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the fetcher connects to; only loopback is really dialled."""
    attempts: list[str] = []
    real = httpcore.SyncBackend.connect_tcp

    def recording(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        attempts.append(host)
        if ipaddress.ip_address(host).is_loopback:
            return real(self, host, port, *args, **kwargs)
        raise httpcore.ConnectError("tests never connect beyond this machine")

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", recording)
    return attempts


@pytest.fixture
def outside() -> Iterator[ImageHost]:
    host = ImageHost(OUTSIDE)
    yield host
    host.close()


@pytest.fixture
def fetcher() -> Iterator[ImageFetcher]:
    guard = AddressGuard(resolver=fake_resolver, reason_for=reason_treating_outside_as_public)
    fetcher = ImageFetcher(guard=guard, allowed_ports=None, timeout_seconds=5)
    yield fetcher
    fetcher.close()


def refused(fetcher: ImageFetcher, url: str) -> str:
    with pytest.raises(InvalidInputError) as info:
        fetcher.fetch(url, PARAM)
    assert info.value.param == PARAM
    assert info.value.message
    return info.value.message


HOSTILE_LITERALS = [
    ("http://127.0.0.1:{trap}/a.png", "loopback"),
    ("http://127.9.9.9:{trap}/a.png", "loopback"),
    ("http://[::1]:{trap}/a.png", "loopback"),
    ("http://localhost.:{trap}/a.png", "could not be resolved"),
    ("http://2130706433:{trap}/a.png", "non-standard form"),
    ("http://0177.0.0.1:{trap}/a.png", "non-standard form"),
    ("http://0x7f.1:{trap}/a.png", "non-standard form"),
    ("http://127.1:{trap}/a.png", "non-standard form"),
    ("http://0x7f000001:{trap}/a.png", "non-standard form"),
    ("http://0.0.0.0:{trap}/a.png", "this network"),
    ("http://10.0.0.1/a.png", "private"),
    ("http://172.16.0.1/a.png", "private"),
    ("http://172.31.255.254/a.png", "private"),
    ("http://192.168.1.1/a.png", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://100.64.0.1/a.png", "carrier-grade NAT"),
    ("http://100.100.100.200/latest/meta-data/", "carrier-grade NAT"),
    ("http://224.0.0.1/a.png", "multicast"),
    ("http://255.255.255.255/a.png", "reserved"),
    ("http://240.0.0.1/a.png", "reserved"),
    ("http://[fe80::1]/a.png", "link-local"),
    ("http://[fc00::1]/a.png", "private"),
    ("http://[::ffff:127.0.0.1]:{trap}/a.png", "loopback"),
    ("http://[::ffff:169.254.169.254]/a.png", "link-local"),
    ("http://[64:ff9b::7f00:1]:{trap}/a.png", "loopback"),
    ("http://[2002:7f00:1::1]:{trap}/a.png", "loopback"),
    ("http://[::]:{trap}/a.png", "unspecified"),
]

HOSTILE_NAMES = [
    ("http://inward.test:{trap}/a.png", "resolves to 127.0.0.1"),
    ("http://metadata.test/latest/meta-data/", "link-local"),
    ("http://alibaba-metadata.test/", "carrier-grade NAT"),
    ("http://corp.test/a.png", "private"),
    ("http://mixed.test/a.png", "resolves to 192.168.0.10"),
    ("http://v6-loopback.test:{trap}/a.png", "loopback"),
    ("http://v6-ula.test/a.png", "private"),
    ("http://v6-link-local.test/a.png", "link-local"),
    ("http://v6-mapped.test:{trap}/a.png", "loopback"),
    ("http://nat64.test/a.png", "link-local"),
    ("http://sixtofour.test/a.png", "private"),
    ("http://teredo.test:{trap}/a.png", "loopback"),
    ("http://zero.test:{trap}/a.png", "this network"),
    ("http://multicast.test/a.png", "multicast"),
    ("http://nowhere.test/a.png", "could not be resolved"),
]

HOSTILE_FORMS = [
    ("http://user:secret@public.test/a.png", "user name or password"),
    ("http://public.test@127.0.0.1:{trap}/a.png", "user name or password"),
    ("ftp://public.test/a.png", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://public.test:70/", "only http and https"),
    ("javascript:alert(1)", "only http and https"),
    ("http:///a.png", "no host"),
    ("http://public.test:99999/a.png", "not valid"),
]


@pytest.mark.parametrize(("template", "reason"), HOSTILE_LITERALS + HOSTILE_NAMES + HOSTILE_FORMS)
def test_hostile_url_is_refused_without_connecting(
    fetcher: ImageFetcher, trap: Trap, connections: list[str], template: str, reason: str
) -> None:
    message = refused(fetcher, template.format(trap=trap.port))
    assert reason in message
    assert connections == []


def test_the_corpus_is_large_enough() -> None:
    assert len(HOSTILE_LITERALS) + len(HOSTILE_NAMES) + len(HOSTILE_FORMS) >= 40


def test_ports_outside_the_allowed_set_are_refused(connections: list[str]) -> None:
    guard = AddressGuard(resolver=fake_resolver)
    with ImageFetcher(guard=guard) as strict:
        for url in [
            "http://public.test:22/a.png",
            "https://public.test:6379/",
            "http://public.test:8080/",
        ]:
            assert "is not allowed" in refused(strict, url)
    assert connections == []


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{trap}/a.png",
        "http://inward.test:{trap}/a.png",
        "http://[::1]:{trap}/a.png",
        "http://metadata.test/latest/meta-data/",
        "http://2130706433:{trap}/",
    ],
)
def test_redirects_that_turn_inward_are_refused(
    fetcher: ImageFetcher,
    trap: Trap,
    connections: list[str],
    outside: ImageHost,
    target: str,
) -> None:
    start = outside.add("/start.png", b"", status=302, Location=target.format(trap=trap.port))
    message = refused(fetcher, start)
    assert "resolves to" in message or " is " in message
    assert connections == [OUTSIDE]  # only the outside host was ever dialled


def test_redirect_chains_are_bounded_and_loops_refused(
    fetcher: ImageFetcher, connections: list[str], outside: ImageHost
) -> None:
    outside.add("/loop-a", b"", status=302, Location="/loop-b")
    outside.add("/loop-b", b"", status=302, Location="/loop-a")
    assert "loop" in refused(fetcher, outside.url("/loop-a"))
    for hop in range(5):
        outside.add(f"/hop{hop}", b"", status=301, Location=f"/hop{hop + 1}")
    outside.add("/hop5", png_bytes())
    assert "more than 3 times" in refused(fetcher, outside.url("/hop0"))
    outside.add("/to-ftp", b"", status=307, Location="ftp://public.test/a.png")
    assert "only http and https" in refused(fetcher, outside.url("/to-ftp"))
    assert set(connections) == {OUTSIDE}


def test_three_redirects_to_a_public_image_are_followed(
    fetcher: ImageFetcher, outside: ImageHost
) -> None:
    for hop in range(3):
        outside.add(f"/r{hop}", b"", status=302, Location=f"/r{hop + 1}")
    image = png_bytes()
    outside.add("/r3", image)
    assert fetcher.fetch(outside.url("/r0"), PARAM) == image


def test_private_networks_are_reachable_only_when_allowed(image_host: ImageHost) -> None:
    url = image_host.add("/a.png", png_bytes())
    with ImageFetcher(allowed_ports=None) as default:
        assert "loopback" in refused(default, url)
    with ImageFetcher(allow_private_networks=True, allowed_ports=None) as intranet:
        assert intranet.fetch(url, PARAM) == png_bytes()
    assert image_host.requests == ["/a.png"]
