"""A cap on request bodies, enforced while they stream in (413 past it)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retouch.api.errors import error_response
from retouch.errors import RequestTooLargeError


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
