"""One exception tree. Each class carries its HTTP status and the seed's error `type`.

The API turns any of these into the seed's body in one place
(`retouch.api.errors`); routes never build error responses.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class RetouchError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_server_error"
    default_message: ClassVar[str] = "Internal server error"
    default_suggestion: ClassVar[str | None] = None

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        fallback_suggestion: str | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.param = param
        self.fallback_suggestion = fallback_suggestion or self.default_suggestion
        self.headers = headers or {}
        if retry_after is not None:
            # Whole seconds, rounded up: retrying after that many seconds succeeds.
            seconds = max(1, math.ceil(retry_after - 1e-9))
            self.headers["Retry-After"] = str(seconds)
            unit = "second" if seconds == 1 else "seconds"
            self.fallback_suggestion = fallback_suggestion or f"retry after {seconds} {unit}"
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The seed's error body: `{"error": {code, message, type, param, fallback_suggestion}}`,
        the last two only when known."""
        error: dict[str, Any] = {"code": self.status, "message": self.message, "type": self.type}
        if self.param is not None:
            error["param"] = self.param
        if self.fallback_suggestion is not None:
            error["fallback_suggestion"] = self.fallback_suggestion
        return {"error": error}


class InvalidRequestError(RetouchError):
    status = 400
    type = "invalid_request_error"
    default_message = "Invalid request format"


class AuthenticationError(RetouchError):
    status = 401
    type = "authentication_error"
    default_message = "Invalid authentication credentials"


class InsufficientQuotaError(RetouchError):
    status = 402
    type = "insufficient_quota_error"
    default_message = "Insufficient credits"


class PermissionDeniedError(RetouchError):
    status = 403
    type = "permission_error"
    default_message = "Access denied"


class NotFoundError(RetouchError):
    status = 404
    type = "not_found_error"
    default_message = "Resource not found"


class MethodNotAllowedError(RetouchError):
    status = 405
    type = "invalid_request_error"
    default_message = "Method not allowed"


class ConflictError(RetouchError):
    status = 409
    type = "conflict_error"
    default_message = "The request conflicts with the current state of the resource"


class RequestTooLargeError(RetouchError):
    status = 413
    type = "request_too_large_error"
    default_message = "Request body too large"


class RateLimitError(RetouchError):
    status = 429
    type = "rate_limit_error"
    default_message = "Rate limit exceeded"


class InternalError(RetouchError):
    default_suggestion = "try again later"


class UpstreamError(RetouchError):
    status = 502
    type = "upstream_error"
    default_message = "Bad gateway"
    default_suggestion = "try again later"


class ServiceUnavailableError(RetouchError):
    status = 503
    type = "service_unavailable_error"
    default_message = "Service temporarily unavailable"
    default_suggestion = "retry after 30 seconds"


class InvalidInputError(InvalidRequestError):
    """A task's input (an image, the prompt) is not acceptable; `param` names which one."""


class ModelLoadError(Exception):
    """A checkpoint could not be loaded; the message is one sentence for the operator."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line for a client or a probe ("" when it
    has none), never a traceback."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""
