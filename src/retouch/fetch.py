"""Fetching input images from the URLs a client gave.

Strangers choose these URLs. Every connection goes through the address guard
(`retouch.netguard`): one lookup, non-public addresses refused unless
`allow_private_networks` is on, then a connection to that pinned address.
Redirects are followed by hand (at most three, each hop checked again), only
allowed schemes and ports are used, and the bytes read and time taken are capped.
"""

from __future__ import annotations

import time
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

MAX_REDIRECTS = 3
DEFAULT_PORTS = frozenset({80, 443})
_REDIRECTS = {301, 302, 303, 307, 308}


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
        except DestinationRefused as exc:
            raise InvalidInputError(str(exc), param=param) from None
        except httpx.InvalidURL as exc:
            raise InvalidInputError(f"the URL is not valid: {exc}", param=param) from None
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
        """What can be told from the URL alone; the address is checked at connect."""
        try:
            self.rules.check(url)
        except DestinationRefused as exc:
            raise InvalidInputError(str(exc), param=param) from None
