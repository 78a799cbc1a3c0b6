"""Which addresses a stranger's URL may make this server connect to, enforced at
the socket: every connection (redirect hops included) resolves its host once,
is refused if any resolved address is not public, and then connects to that
pinned address. TLS still verifies the certificate of the URL's host name
(the name is kept for SNI and verification; only the lookup is ours), so DNS
rebinding has no second lookup to exploit. The lookup and the connection attempts
share the connection's connect timeout; a lookup that outlives it is abandoned.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Special ranges `ipaddress` calls global on Python 3.11.7, or names too vaguely.
_SPECIAL_RANGES = [
    (ipaddress.ip_network("100.64.0.0/10"), "a shared (carrier-grade NAT) address"),
    (ipaddress.ip_network("0.0.0.0/8"), "an address of 'this network' (0.0.0.0/8)"),
    # 192.0.0.9 (PCP) and 192.0.0.10 (TURN) are anycast: they reach a nearby gateway.
    (ipaddress.ip_network("192.0.0.0/24"), "an IETF protocol address (192.0.0.0/24)"),
    (ipaddress.ip_network("3fff::/20"), "a documentation address (3fff::/20)"),
]
# Hosts made only of digits, dots and hex markers are numeric, whatever they spell.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


class DestinationRefused(Exception):
    """A URL's destination is not allowed; the message says why, in plain words."""


class LookupTimedOut(httpcore.ConnectTimeout):
    """Resolving a host took longer than the connection may wait (a connect timeout)."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass
class _Lookup:
    done: threading.Event = field(default_factory=threading.Event)
    addresses: list[str] = field(default_factory=list)
    error: Exception | None = None


class BoundedResolver:
    """Runs a resolver on a thread of its own and waits for it at most `timeout`.

    `getaddrinfo` cannot be interrupted: a lookup that outlives its wait is abandoned
    (it ends on its thread; its answer is dropped). At most `max_running` lookups run
    at once, abandoned ones included, so a resolver that hangs ties up few threads.
    The threads are daemons: a hung lookup never holds up the process's exit."""

    def __init__(self, resolver: Resolver, max_running: int = 16) -> None:
        self._resolver = resolver
        self._slots = threading.BoundedSemaphore(max_running)

    def __call__(self, host: str, port: int, timeout: float | None) -> list[str]:
        if timeout is None:
            return self._resolver(host, port)
        deadline = time.monotonic() + timeout
        if not self._slots.acquire(timeout=timeout):
            raise self._timed_out(host, timeout)
        lookup = _Lookup()
        threading.Thread(
            target=self._run, args=(host, port, lookup), name=f"lookup {host}", daemon=True
        ).start()
        if not lookup.done.wait(max(0.0, deadline - time.monotonic())):
            raise self._timed_out(host, timeout)
        if lookup.error is not None:
            raise lookup.error
        return lookup.addresses

    def _run(self, host: str, port: int, lookup: _Lookup) -> None:
        try:
            lookup.addresses = self._resolver(host, port)
        except Exception as exc:
            lookup.error = exc
        finally:
            self._slots.release()
            lookup.done.set()

    @staticmethod
    def _timed_out(host: str, timeout: float) -> LookupTimedOut:
        return LookupTimedOut(f"looking up the host {host!r} took longer than {timeout:g} s")


def forbidden_reason(address: IPAddress) -> str | None:
    """Why this address is not a public internet address (None when it is)."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        inner = forbidden_reason(embedded)
        return f"{inner} (embedded in {address})" if inner else None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (where cloud metadata services live)"
    # Python 3.11.7's is_private misses the old IPv6 private range (fec0::/10).
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address (fec0::/10)"
    for network, reason in _SPECIAL_RANGES:
        if address in network:
            return reason
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_reserved:
        return "a reserved address (including broadcast)"
    if address.is_private:
        return "a private-network address"
    if not address.is_global:
        return "an address that is not publicly routable"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries: mapped, NAT64, 6to4 or Teredo."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


class AddressGuard:
    """Resolves a host once and returns only addresses that may be connected to."""

    def __init__(
        self,
        *,
        allow_private_networks: bool = False,
        resolver: Resolver = system_resolver,
        reason_for: Callable[[IPAddress], str | None] = forbidden_reason,
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self._resolve = BoundedResolver(resolver)
        self._reason_for = reason_for

    def addresses(self, host: str, port: int, timeout: float | None = None) -> list[str]:
        """`host`'s addresses, each allowed, or `DestinationRefused`. A lookup that takes
        longer than `timeout` seconds raises `LookupTimedOut`."""
        host = host.strip("[]")
        literal = literal_address(host)
        if literal is not None:
            candidates = [literal]
        else:
            try:
                resolved = self._resolve(host, port, timeout)
                candidates = [ipaddress.ip_address(a.split("%")[0]) for a in resolved]
            except (OSError, ValueError):
                raise DestinationRefused(f"the host {host!r} could not be resolved") from None
            if not candidates:
                raise DestinationRefused(f"the host {host!r} has no address")
        if not self.allow_private_networks:
            for address in candidates:
                reason = self._reason_for(address)
                if reason:
                    shown = "" if literal is not None else f" resolves to {address}, which"
                    raise DestinationRefused(
                        f"the host {host!r}{shown} is {reason}; this server does not "
                        "connect to non-public addresses"
                    )
        return [str(address) for address in candidates]


def literal_address(host: str) -> IPAddress | None:
    """An IP address written in the standard form, or a refusal for odd forms."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        raise DestinationRefused(
            f"the host {host!r} is a numeric address in a non-standard form "
            "(octal, hexadecimal, integer or shortened); write it as a dotted quad"
        )
    return None


@dataclass(frozen=True)
class UrlRules:
    """What a URL may look like, checked before anything is resolved: at
    submission (a 400 naming the parameter) and again before each connection."""

    schemes: frozenset[str]
    ports: frozenset[int] | None
    # Refuse hosts written as a non-public IP address (where no guard comes after).
    refuse_private_literals: bool = True

    @classmethod
    def for_images(
        cls, ports: frozenset[int] | None, *, refuse_private_literals: bool = True
    ) -> UrlRules:
        return cls(frozenset({"http", "https"}), ports, refuse_private_literals)

    @classmethod
    def for_callbacks(
        cls, ports: frozenset[int] | None, *, refuse_private_literals: bool = True
    ) -> UrlRules:
        return cls(frozenset({"https"}), ports, refuse_private_literals)

    def check(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise DestinationRefused(f"the URL is not valid: {url[:100]!r}") from None
        if parts.scheme not in self.schemes:
            allowed = " and ".join(sorted(self.schemes))
            raise DestinationRefused(
                f"only {allowed} URLs can be used, not {parts.scheme or 'no scheme'!r}"
            )
        if not parts.hostname:
            raise DestinationRefused("the URL has no host")
        if parts.username is not None or parts.password is not None:
            raise DestinationRefused("URLs with a user name or password are refused")
        port = port or (443 if parts.scheme == "https" else 80)
        if self.ports is not None and port not in self.ports:
            allowed_ports = ", ".join(str(p) for p in sorted(self.ports))
            raise DestinationRefused(f"port {port} is not allowed; allowed ports: {allowed_ports}")
        literal = literal_address(parts.hostname)
        if literal is not None and self.refuse_private_literals:
            reason = forbidden_reason(literal)
            if reason:
                raise DestinationRefused(
                    f"the host {parts.hostname!r} is {reason}; this server does not "
                    "connect to non-public addresses"
                )


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket layer, with the guard's resolution in place of the OS's. The
    connect timeout bounds the lookup and the connection attempts together."""

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        last_error: httpcore.ConnectError | None = None
        for address in self.guard.addresses(host, port, timeout):
            left = _time_left(deadline, host)
            try:
                return super().connect_tcp(address, port, left, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last_error = exc
        raise last_error or httpcore.ConnectError(f"could not connect to {host}")


def _time_left(deadline: float | None, host: str) -> float | None:
    """Seconds until `deadline` (None: no limit), or a connect timeout once it is past."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ConnectTimeout(f"connecting to {host} ran out of time")
    return left


def guarded_transport(guard: AddressGuard) -> httpx.HTTPTransport:
    """An httpx transport whose every connection goes through `guard`. Proxies are
    never used (they would connect on our behalf, past the guard)."""
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx has no public hook for the network backend; the pool is rebuilt with the
    # same settings and ours. Trusted CAs still come from SSL_CERT_FILE / SSL_CERT_DIR.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=True),
        max_connections=10,
        max_keepalive_connections=0,
        network_backend=GuardedBackend(guard),
    )
    return transport
