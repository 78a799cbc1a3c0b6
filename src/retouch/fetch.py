"""Fetching input images from the URLs a client gave.

Strangers choose these URLs, so the fetcher refuses non-public addresses
(unless `allow_private_networks` is on), follows at most three redirects by
hand (re-checking every hop), caps the bytes it reads and the time it takes.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import httpx

from retouch.errors import InvalidInputError

MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}

Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class ImageFetcher:
    def __init__(
        self,
        *,
        allow_private_networks: bool = False,
        max_bytes: int = 10 * 1024 * 1024,
        timeout_seconds: float = 30.0,
        resolver: Resolver = system_resolver,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds
        self._resolver = resolver
        self._client = httpx.Client(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout_seconds, connect=min(10.0, timeout_seconds)),
            transport=transport,
            headers={"User-Agent": "retouch-fetch/1", "Accept": "image/*"},
        )

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str, param: str) -> bytes:
        """The body at `url`, or `InvalidInputError` naming `param` and the reason."""
        deadline = time.monotonic() + self.timeout_seconds
        seen: set[str] = set()
        for _ in range(MAX_REDIRECTS + 1):
            self._check_destination(url, param)
            seen.add(url)
            location, body = self._get(url, param, deadline)
            if location is None:
                return body
            url = urljoin(url, location)
            if url in seen:
                raise InvalidInputError(f"the URL redirects in a loop (to {url})", param=param)
        raise InvalidInputError(f"the URL redirects more than {MAX_REDIRECTS} times", param=param)

    def _get(self, url: str, param: str, deadline: float) -> tuple[str | None, bytes]:
        """GET one hop: the redirect target, or no target and the body."""
        try:
            with self._client.stream("GET", url) as response:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise InvalidInputError(
                            f"the URL answered {response.status_code} without a Location",
                            param=param,
                        )
                    return location, b""
                if response.status_code != 200:
                    raise InvalidInputError(
                        f"downloading the image failed: the server answered HTTP "
                        f"{response.status_code}",
                        param=param,
                    )
                return None, self._read_capped(response, param, deadline)
        except httpx.TimeoutException:
            raise InvalidInputError(
                f"downloading the image timed out after {self.timeout_seconds:g} s", param=param
            ) from None
        except httpx.HTTPError as exc:
            raise InvalidInputError(
                f"downloading the image failed: {type(exc).__name__}: {exc}", param=param
            ) from None

    def _read_capped(self, response: httpx.Response, param: str, deadline: float) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidInputError(self._too_large(), param=param)
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise InvalidInputError(self._too_large(), param=param)
            if time.monotonic() > deadline:
                raise InvalidInputError(
                    f"downloading the image took longer than {self.timeout_seconds:g} s",
                    param=param,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self) -> str:
        return f"the image is larger than {self.max_bytes // (1024 * 1024)} MB"

    def _check_destination(self, url: str, param: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise InvalidInputError(
                f"only http and https URLs can be fetched, not {parts.scheme or 'no scheme'!r}",
                param=param,
            )
        if not parts.hostname:
            raise InvalidInputError("the URL has no host", param=param)
        if parts.username is not None or parts.password is not None:
            raise InvalidInputError("URLs with a user name or password are refused", param=param)
        if self.allow_private_networks:
            return
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = self._resolver(parts.hostname, port)
        except OSError:
            raise InvalidInputError(
                f"the host {parts.hostname!r} could not be resolved", param=param
            ) from None
        for address in addresses:
            if not ipaddress.ip_address(address.split("%")[0]).is_global:
                raise InvalidInputError(
                    f"the host {parts.hostname!r} resolves to a non-public address ({address}); "
                    "private networks are not reachable from this server",
                    param=param,
                )
