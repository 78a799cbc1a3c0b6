"""Checks of our own for the schemathesis runs (named by `hooks` in schemathesis.toml).

Every error answer must be the seed's error body, whatever the schema under test
documents for that status: `{"error": {"code", "message", "type"[, "param",
"fallback_suggestion"]}}`, JSON, with `code` equal to the HTTP status.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
}
OPTIONAL_FIELDS = {"param", "fallback_suggestion"}


@schemathesis.check
def seed_error_body(ctx: Any, response: Any, case: Any) -> None:
    """4xx and 5xx answers carry the seed's error body, typed as the seed types them."""
    status = response.status_code
    if status < 400:
        return
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), (
        f"{status} answered {content_type or 'no Content-Type'}, not the JSON error body"
    )
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, f"not the error body: {body!r}"
    error = body["error"]
    assert isinstance(error, dict), f"`error` is not an object: {error!r}"
    assert error.get("code") == status, f"`error.code` {error.get('code')!r} is not {status}"
    message = error.get("message")
    assert isinstance(message, str) and message.strip(), f"no `error.message`: {error!r}"
    assert error.get("type") == ERROR_TYPES.get(status), (
        f"`error.type` {error.get('type')!r} for {status}; expected {ERROR_TYPES.get(status)!r}"
    )
    extra = set(error) - {"code", "message", "type"} - OPTIONAL_FIELDS
    assert not extra, f"`error` has fields the seed does not: {sorted(extra)}"
    for name in OPTIONAL_FIELDS & set(error):
        assert isinstance(error[name], str) and error[name], f"`error.{name}` is {error[name]!r}"
