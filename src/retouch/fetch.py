"""Fetching input images from the URLs a client gave.

Strangers choose these URLs. Every connection goes through the address guard
(`retouch.netguard`): one lookup, non-public addresses refused unless
`allow_private_networks` is on, then a connection to that pinned address.
Redirects are followed by hand (at most three, each hop checked again), only
allowed schemes and ports are used, and the bytes read are capped.

One deadline covers the whole fetch of an image: every hop's lookup, connect,
headers and body. Each hop gets only the time left, and a watchdog thread shuts
the connection down when the deadline passes, so a server that drips its headers
a byte at a time holds a worker no longer than the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import urljoin

import httpx

from retouch.errors import InvalidInputError
from retouch.netguard import (
    AddressGuard,
    DestinationRefused,
    Resolver,
    UrlRules,
    guarded_transport,
    system_resolver,
)
from retouch.watchdog import Trip, Watchdog

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
DEFAULT_PORTS = frozenset({80, 443})
_REDIRECTS = {301, 302, 303, 307, 308}


class FetchStopped(Exception):
    """`should_stop` said to stop a fetch (its task was cancelled, its worker is stopping)."""


class ImageFetcher:
    def __init__(
        self,
        *,
        allow_private_networks: bool = False,
        allowed_ports: frozenset[int] | None = DEFAULT_PORTS,
        max_bytes: int = 10 * 1024 * 1024,
        timeout_seconds: float = 30.0,
        resolver: Resolver = system_resolver,
        guard: AddressGuard | None = None,
    ) -> None:
        self.guard = guard or AddressGuard(
            allow_private_networks=allow_private_networks, resolver=resolver
        )
        # The guard decides every address, at connect.
        self.rules = UrlRules.for_images(allowed_ports, refuse_private_literals=False)
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds
        self._client = httpx.Client(
            transport=guarded_transport(self.guard),
            follow_redirects=False,
            timeout=httpx.Timeout(timeout_seconds, connect=min(10.0, timeout_seconds)),
            headers={"User-Agent": "retouch-fetch/1", "Accept": "image/*"},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def fetch(
        self, url: str, param: str, *, should_stop: Callable[[], bool] | None = None
    ) -> bytes:
        """The body at `url`, or `InvalidInputError` naming `param` and the reason.

        `timeout_seconds` bounds the whole fetch, redirects included. `should_stop`
        (cheap, thread-safe; asked about ten times a second) ends it early with
        `FetchStopped`."""
        with Watchdog(self.timeout_seconds, should_stop) as watchdog:
            seen: set[str] = set()
            for _ in range(MAX_REDIRECTS + 1):
                self._check_destination(url, param)
                seen.add(url)
                location, body = self._get(url, param, watchdog)
                if location is None:
                    # A body without a length, cut short by the watchdog, reads as whole.
                    self._check_watchdog(watchdog, param)
                    return body
                url = urljoin(url, location)
                if url in seen:
                    raise InvalidInputError(f"the URL redirects in a loop (to {url})", param=param)
        raise InvalidInputError(f"the URL redirects more than {MAX_REDIRECTS} times", param=param)

    def _get(self, url: str, param: str, watchdog: Watchdog) -> tuple[str | None, bytes]:
        """GET one hop, in the time left: the redirect target, or no target and the body."""
        self._check_watchdog(watchdog, param)
        left = watchdog.left()
        timeout = httpx.Timeout(left, connect=min(10.0, left))
        trace = {"trace": watchdog.trace}
        try:
            with self._client.stream("GET", url, timeout=timeout, extensions=trace) as response:
                return self._answer(response, param, watchdog)
        except DestinationRefused as exc:
            raise InvalidInputError(str(exc), param=param) from None
        except httpx.InvalidURL as exc:
            raise InvalidInputError(f"the URL is not valid: {exc}", param=param) from None
        except httpx.HTTPError as exc:
            self._check_watchdog(watchdog, param)  # the watchdog cut the connection
            raise self._failed(exc, param) from None
        finally:
            watchdog.forget_connections()

    def _answer(
        self, response: httpx.Response, param: str, watchdog: Watchdog
    ) -> tuple[str | None, bytes]:
        if response.status_code in _REDIRECTS:
            location = response.headers.get("location")
            if not location:
                raise InvalidInputError(
                    f"the URL answered {response.status_code} without a Location", param=param
                )
            return location, b""
        if response.status_code != 200:
            raise InvalidInputError(
                f"downloading the image failed: the server answered HTTP {response.status_code}",
                param=param,
            )
        return None, self._read_capped(response, param, watchdog)

    def _read_capped(self, response: httpx.Response, param: str, watchdog: Watchdog) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidInputError(self._too_large(), param=param)
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise InvalidInputError(self._too_large(), param=param)
            self._check_watchdog(watchdog, param)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_watchdog(self, watchdog: Watchdog, param: str) -> None:
        trip = watchdog.tripped()
        if trip is Trip.STOP:
            raise FetchStopped(f"fetching {param} was stopped")
        if trip is Trip.DEADLINE:
            raise self._timed_out(param)

    def _failed(self, exc: httpx.HTTPError, param: str) -> InvalidInputError:
        if isinstance(exc, httpx.TimeoutException):
            return self._timed_out(param)
        return InvalidInputError(
            f"downloading the image failed: {type(exc).__name__}: {exc}", param=param
        )

    def _timed_out(self, param: str) -> InvalidInputError:
        return InvalidInputError(
            f"downloading the image took longer than {self.timeout_seconds:g} s "
            "(the limit for one image, redirects included)",
            param=param,
        )

    def _too_large(self) -> str:
        return f"the image is larger than {self.max_bytes // (1024 * 1024)} MB"

    def _check_destination(self, url: str, param: str) -> None:
        """What can be told from the URL alone; the address is checked at connect."""
        try:
            self.rules.check(url)
        except DestinationRefused as exc:
            raise InvalidInputError(str(exc), param=param) from None
