"""What a URL may look like and which addresses it may reach, before anything is
connected; and how long a lookup may take."""

from __future__ import annotations

import ipaddress
import socket
import threading

import pytest

from retouch.netguard import (
    BoundedResolver,
    DestinationRefused,
    LookupTimedOut,
    UrlRules,
    forbidden_reason,
)

IMAGES = UrlRules.for_images(frozenset({80, 443}))
CALLBACKS = UrlRules.for_callbacks(frozenset({443}))


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a.png",
        "http://example.com:80/a",
        "https://93.184.216.34/x",
        "http://[2606:4700::1]/",
    ],
)
def test_ordinary_urls_pass(url: str) -> None:
    IMAGES.check(url)


@pytest.mark.parametrize(
    ("rules", "url", "reason"),
    [
        (IMAGES, "ftp://example.com/a.png", "only http and https"),
        (CALLBACKS, "http://example.com/hook", "only https"),
        (IMAGES, "http://example.com:8080/a.png", "port 8080 is not allowed"),
        (CALLBACKS, "https://example.com:8443/hook", "allowed ports: 443"),
        (IMAGES, "http://user:pw@example.com/a.png", "user name or password"),
        (IMAGES, "http:///a.png", "no host"),
        (IMAGES, "http://example.com:70000/", "not valid"),
        (IMAGES, "http://10.0.0.1/a.png", "private-network"),
        (CALLBACKS, "https://169.254.169.254/", "link-local"),
        (CALLBACKS, "https://[::1]/hook", "loopback"),
        (IMAGES, "http://0x7f.1/a.png", "non-standard form"),
        (IMAGES, "http://3232235777/a.png", "non-standard form"),
        (IMAGES, "http://[fec0::1]/a.png", "site-local"),
        (CALLBACKS, "https://192.0.0.9/hook", "IETF protocol"),
    ],
)
def test_hostile_urls_are_refused_by_their_look(rules: UrlRules, url: str, reason: str) -> None:
    with pytest.raises(DestinationRefused, match=reason):
        rules.check(url)


def test_private_literals_pass_where_a_guard_decides_at_connect() -> None:
    lenient = UrlRules(schemes=frozenset({"http"}), ports=None, refuse_private_literals=False)
    lenient.check("http://127.0.0.1:8123/a.png")
    with pytest.raises(DestinationRefused, match="non-standard form"):
        lenient.check("http://127.1/a.png")


def reason(address: str) -> str | None:
    return forbidden_reason(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("address", "why"),
    [
        # Ranges Python 3.11.7's ipaddress calls global, at both edges.
        ("fec0::", "site-local"),
        ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "site-local"),
        ("192.0.0.0", "IETF protocol"),
        ("192.0.0.9", "IETF protocol"),  # PCP anycast: the nearest gateway
        ("192.0.0.10", "IETF protocol"),  # TURN anycast
        ("192.0.0.255", "IETF protocol"),
        ("3fff::", "documentation"),
        ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
        ("::ffff:192.0.0.9", "IETF protocol"),
    ],
)
def test_special_ranges_ipaddress_misses_are_refused(address: str, why: str) -> None:
    assert why in (reason(address) or "")


@pytest.mark.parametrize(
    "address",
    [
        "100.64.0.0",
        "100.127.255.255",
        "198.18.0.0",
        "198.19.255.255",
        "240.0.0.0",
        "255.255.255.254",
        "224.0.0.0",
        "239.255.255.255",
        "ff00::",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "2001:db8::",
        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
        "64:ff9b:1::",
        "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
        "::ffff:0.0.0.0",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
    ],
)
def test_special_ranges_stay_refused_at_their_edges(address: str) -> None:
    assert reason(address) is not None


@pytest.mark.parametrize(
    "address",
    [
        "100.63.255.255",
        "100.128.0.0",
        "191.255.255.255",
        "192.0.1.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2001:db9::",
        "3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "3fff:1000::",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
    ],
)
def test_public_neighbours_of_special_ranges_pass(address: str) -> None:
    assert reason(address) is None


def test_a_lookup_that_hangs_is_abandoned_and_holds_its_slot_until_it_ends() -> None:
    answer = threading.Event()

    def hanging(_host: str, _port: int) -> list[str]:
        answer.wait(10)
        return ["93.184.216.34"]

    resolve = BoundedResolver(hanging, max_running=1)
    try:
        with pytest.raises(LookupTimedOut, match=r"'slow\.test' took longer than 0\.05 s"):
            resolve("slow.test", 80, 0.05)
        with pytest.raises(LookupTimedOut):  # the abandoned lookup still runs
            resolve("slow.test", 80, 0.05)
    finally:
        answer.set()
    assert resolve("slow.test", 80, 2) == ["93.184.216.34"]


def test_a_bounded_lookup_passes_answers_and_errors_through() -> None:
    def failing(host: str, _port: int) -> list[str]:
        raise socket.gaierror(f"no such host {host}")

    assert BoundedResolver(lambda _h, _p: ["192.0.2.1"])("a.test", 80, 1) == ["192.0.2.1"]
    with pytest.raises(socket.gaierror, match=r"no such host b\.test"):
        BoundedResolver(failing)("b.test", 80, 1)
