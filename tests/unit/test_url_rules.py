"""What a URL may look like, before anything is resolved."""

from __future__ import annotations

import pytest

from retouch.netguard import DestinationRefused, UrlRules

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
