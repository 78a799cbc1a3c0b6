"""Checks on every request before it is routed: a cap on its body, enforced while
it streams in (413 past it); a Host header that names a host (400 otherwise); no
NUL character in its path (404: nothing is named so)."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retouch.api.errors import error_response
from retouch.errors import InvalidRequestError, NotFoundError, RequestTooLargeError, RetouchError

# A DNS name (at most 253 characters; underscores too, as container names have them),
# an IPv4 address or a bracketed IPv6 literal, with an optional port.
_HOST = re.compile(
    rb"(?:[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9_.-]{1,32})?\])(?::[0-9]{1,5})?"
)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._error(int(declared)))(scope, receive, send)
            return
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error(seen)
            return message

        await self.app(scope, capped_receive, send)

    def _error(self, size: int) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"Request body too large: {size} bytes; the limit is {self.max_bytes} bytes",
            fallback_suggestion="send image URLs rather than inline data",
        )


class RequestCheck:
    """What no route should meet. Links in answers (results, uploads) are built on the
    address a request was sent to when no public URL is set: a Host header that is no
    host name is refused before it reaches a link or a database column. A NUL
    character, which PostgreSQL cannot even compare, names no task, key or account."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = _refusal(scope) if scope["type"] == "http" else None
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _refusal(scope: Scope) -> RetouchError | None:
    host = dict(scope["headers"]).get(b"host")
    if host is not None and not _HOST.fullmatch(host):
        shown = host[:80].decode("latin-1")
        return InvalidRequestError(
            f"The Host header {shown!r} is not a host name, address or host:port",
            param="Host",
        )
    if "\x00" in scope["path"]:
        return NotFoundError("Not found: no route or resource has a NUL character in its name")
    return None
