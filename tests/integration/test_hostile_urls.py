"""A corpus of hostile image URLs: each is refused with a reason naming the
parameter, and no connection reaches a forbidden address. Slow ones (dripped
headers, slow redirect chains, slow lookups) are cut off at one deadline.

Every socket the fetcher opens is recorded; only loopback test hosts are really
connected to (nothing leaves this machine), and a trap listener on loopback
must stay silent.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpcore
import pytest
import trustme

from retouch.errors import InvalidInputError
from retouch.fetch import FetchStopped, ImageFetcher
from retouch.netguard import AddressGuard, IPAddress, Resolver, forbidden_reason
from tests.support import ImageHost, png_bytes, wait_for

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
    "site-local.test": ["fec0::1"],
    "pcp-anycast.test": ["192.0.0.9"],
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


def fetcher_with(timeout_seconds: float, resolver: Resolver = fake_resolver) -> ImageFetcher:
    guard = AddressGuard(resolver=resolver, reason_for=reason_treating_outside_as_public)
    return ImageFetcher(guard=guard, allowed_ports=None, timeout_seconds=timeout_seconds)


@pytest.fixture
def fetcher() -> Iterator[ImageFetcher]:
    with fetcher_with(timeout_seconds=5) as fetcher:
        yield fetcher


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
    ("http://[fec0::1]/a.png", "site-local"),
    ("http://192.0.0.10/a.png", "IETF protocol"),
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
    ("http://site-local.test/a.png", "site-local"),
    ("http://pcp-anycast.test/a.png", "IETF protocol"),
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


Writer = Callable[[bytes], Any]


Answer = Callable[[Writer, str], None]


class SlowHost(socketserver.ThreadingTCPServer):
    """A raw HTTP server at OUTSIDE (over TLS when given `tls`) for answers too slow
    for `ImageHost`: each request is answered by `answer(write, path)`. `hung_up` is
    set once a client closed a connection the server was still writing to."""

    daemon_threads = True

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.requests: list[str] = []
        self.hung_up = threading.Event()
        super().__init__((OUTSIDE, 0), _SlowHandler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{OUTSIDE}:{self.port}{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _SlowHandler(socketserver.StreamRequestHandler):
    server: SlowHost

    def setup(self) -> None:
        if self.server.tls is not None:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def finish(self) -> None:
        super().finish()
        self.request.close()  # the server closes only the socket it accepted

    def handle(self) -> None:
        path = self.rfile.readline().split()[1].decode()
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.server.requests.append(path)
        try:
            self.server.answer(self.wfile.write, path)
        except OSError:
            self.server.hung_up.set()


StartHost = Callable[..., SlowHost]


@pytest.fixture
def slow_host() -> Iterator[StartHost]:
    hosts: list[SlowHost] = []

    def start(answer: Answer, tls: ssl.SSLContext | None = None) -> SlowHost:
        hosts.append(SlowHost(answer, tls))
        return hosts[-1]

    yield start
    for host in hosts:
        host.close()


def drip_headers(write: Writer, _path: str) -> None:
    """A status line, then a header line every 0.1 s: a read never waits long."""
    write(b"HTTP/1.1 200 OK\r\n")
    for line in range(100):
        write(b"X-Drip-%d: slow\r\n" % line)
        time.sleep(0.1)


def timed_refusal(fetcher: ImageFetcher, url: str) -> tuple[str, float]:
    started = time.monotonic()
    message = refused(fetcher, url)
    return message, time.monotonic() - started


def test_headers_dripped_slowly_are_cut_off_at_the_deadline(
    slow_host: StartHost, connections: list[str]
) -> None:
    host = slow_host(drip_headers)
    with fetcher_with(timeout_seconds=1) as fetcher:
        message, elapsed = timed_refusal(fetcher, host.url("/drip.png"))
    assert "took longer than 1 s" in message
    assert elapsed < 1.5
    assert connections == [OUTSIDE]
    # The connection was closed, not just left behind.
    wait_for(host.hung_up.is_set, timeout=2, what="the host to see the connection closed")


def test_headers_dripped_over_tls_are_cut_off_at_the_deadline(
    slow_host: StartHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("outside.test").configure_cert(tls)
    host = slow_host(drip_headers, tls)
    with fetcher_with(timeout_seconds=0.5) as fetcher:
        message, elapsed = timed_refusal(fetcher, f"https://outside.test:{host.port}/drip.png")
    assert "took longer than 0.5 s" in message
    assert elapsed < 1
    wait_for(host.hung_up.is_set, timeout=2, what="the host to see the connection closed")


def test_a_slow_redirect_chain_shares_one_deadline(
    slow_host: StartHost,
) -> None:
    image = png_bytes((64, 64))

    def slow_hops(write: Writer, path: str) -> None:
        time.sleep(0.45)  # well within a hop's own timeout
        hop = int(path.removeprefix("/hop"))
        if hop == 3:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(image)
            write(head + b"Connection: close\r\n\r\n" + image)
            return
        write(b"HTTP/1.1 302 Found\r\nLocation: /hop%d\r\n" % (hop + 1))
        write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    host = slow_host(slow_hops)
    with fetcher_with(timeout_seconds=1) as fetcher:
        assert fetcher.fetch(host.url("/hop3"), PARAM) == image  # one slow hop is fine
        message, elapsed = timed_refusal(fetcher, host.url("/hop0"))  # four are not
    assert elapsed < 1.5  # each hop got only the time left, not a fresh timeout
    assert "took longer than 1 s (the limit for one image, redirects included)" in message
    assert host.requests[:3] == ["/hop3", "/hop0", "/hop1"]


def test_a_slow_lookup_is_bounded_by_the_deadline(connections: list[str]) -> None:
    answer = threading.Event()

    def slow_resolver(host: str, port: int) -> list[str]:
        answer.wait(10)  # a DNS server that takes its time
        return fake_resolver("outside.test", port)

    try:
        with fetcher_with(timeout_seconds=1, resolver=slow_resolver) as fetcher:
            message, elapsed = timed_refusal(fetcher, "http://slow-dns.test/a.png")
    finally:
        answer.set()
    assert "took longer than 1 s" in message
    assert elapsed < 1.5
    assert connections == []


def test_should_stop_ends_a_fetch_in_progress(
    slow_host: StartHost,
) -> None:
    host = slow_host(drip_headers)
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    started = time.monotonic()
    with (
        fetcher_with(timeout_seconds=5) as fetcher,
        pytest.raises(FetchStopped, match="was stopped"),
    ):
        fetcher.fetch(host.url("/drip.png"), PARAM, should_stop=stop.is_set)
    timer.join()
    assert time.monotonic() - started < 1
    wait_for(host.hung_up.is_set, timeout=2, what="the host to see the connection closed")
