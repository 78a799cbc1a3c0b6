"""The client's exception tree: one class per error `type` of the seed's contract."""

from __future__ import annotations

import json
import re
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

_RETRY_HINT = re.compile(r"retry after (\d+(?:\.\d+)?)\s*(?:s\b|sec|second)", re.IGNORECASE)


class RetouchError(Exception):
    """Every error this client raises. Errors the server answered carry its body:
    `status` (HTTP), `type`, `code`, `message`, `param` and `fallback_suggestion`;
    `retry_after` is the wait the server asked for (429, 503), in seconds."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: int | None = None,
        param: str | None = None,
        fallback_suggestion: str | None = None,
        retry_after: float | None = None,
        headers: httpx.Headers | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code if code is not None else status
        self.param = param
        self.fallback_suggestion = fallback_suggestion
        self.retry_after = retry_after
        self.headers = headers if headers is not None else httpx.Headers()
        self.body = body

    def __str__(self) -> str:
        text = self.message
        if self.param:
            text += f" (param: {self.param})"
        if self.fallback_suggestion and self.fallback_suggestion not in self.message:
            text += f" (suggestion: {self.fallback_suggestion})"
        return text


class ConfigurationError(RetouchError, ValueError):
    """The client is missing its base URL or API key."""


class APIStatusError(RetouchError):
    """The server answered with an error status (a subclass says which)."""


class BadRequestError(APIStatusError):
    """400 (and 405) `invalid_request_error`: `param` names the field."""


class AuthenticationError(APIStatusError):
    """401 `authentication_error`: no key, unknown or revoked key."""


class InsufficientQuotaError(APIStatusError):
    """402 `insufficient_quota_error`: not enough credits for price x n."""


class PermissionDeniedError(APIStatusError):
    """403 `permission_error`: a model the account may not use; an altered or expired link."""


class NotFoundError(APIStatusError):
    """404 `not_found_error`: unknown model, task or route."""


class ConflictError(APIStatusError):
    """409 `conflict_error`: e.g. cancelling a finished task, a reused Idempotency-Key."""


class RequestTooLargeError(APIStatusError):
    """413 `request_too_large_error`."""


class RateLimitError(APIStatusError):
    """429 `rate_limit_error`: `retry_after` says when a request would pass."""


class InternalServerError(APIStatusError):
    """500 `internal_server_error` (and any other 5xx without a class of its own)."""


class UpstreamError(InternalServerError):
    """502 `upstream_error`."""


class ServiceUnavailableError(InternalServerError):
    """503 `service_unavailable_error`: the queue is full; `retry_after` says when to retry."""


class APIConnectionError(RetouchError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """A request took longer than the client's timeout."""


class WaitTimeoutError(RetouchError, TimeoutError):
    """`wait()` ran out of time; `task` is the last state seen (the task goes on)."""

    def __init__(self, message: str, *, task_id: str, task: Any = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.task = task


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientQuotaError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: BadRequestError,
    409: ConflictError,
    413: RequestTooLargeError,
    429: RateLimitError,
    500: InternalServerError,
    502: UpstreamError,
    503: ServiceUnavailableError,
}

_BY_TYPE: dict[str, type[APIStatusError]] = {
    "invalid_request_error": BadRequestError,
    "authentication_error": AuthenticationError,
    "insufficient_quota_error": InsufficientQuotaError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "conflict_error": ConflictError,
    "request_too_large_error": RequestTooLargeError,
    "rate_limit_error": RateLimitError,
    "internal_server_error": InternalServerError,
    "upstream_error": UpstreamError,
    "service_unavailable_error": ServiceUnavailableError,
}


def retry_after_seconds(headers: httpx.Headers, suggestion: str | None) -> float | None:
    """The wait a 429 or 503 asks for: `Retry-After` (seconds or an HTTP date), else a
    `fallback_suggestion` like "retry after 20 seconds"."""
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            from datetime import UTC, datetime

            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    if suggestion:
        match = _RETRY_HINT.search(suggestion)
        if match:
            return float(match[1])
    return None


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The exception for an error answer; the body must have been read. Bodies that
    are not the seed's (a proxy's HTML page) still give the right class by status."""
    status = response.status_code
    body: Any = None
    try:
        body = json.loads(response.content) if response.content else None
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    type_ = error.get("type") if isinstance(error.get("type"), str) else None
    message = error.get("message")
    if not isinstance(message, str) or not message:
        text = response.text.strip()[:300] if response.content else ""
        message = text or f"HTTP {status} {response.reason_phrase}".strip()
    param = error.get("param") if isinstance(error.get("param"), str) else None
    suggestion = error.get("fallback_suggestion")
    suggestion = suggestion if isinstance(suggestion, str) else None
    code = error.get("code") if isinstance(error.get("code"), int) else None
    cls = _BY_STATUS.get(status) or (_BY_TYPE.get(type_) if type_ else None)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    return cls(
        message,
        status=status,
        type=type_,
        code=code,
        param=param,
        fallback_suggestion=suggestion,
        retry_after=retry_after_seconds(response.headers, suggestion),
        headers=response.headers,
        body=body,
    )
