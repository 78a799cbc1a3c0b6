"""Bearer-key authentication, as the seed's `bearerAuth` scheme describes.

The header is parsed on the event loop; the key lookup runs with the rest of
the request's database work, in one worker-thread hop.
"""

from __future__ import annotations

from fastapi import Request

from retouch.errors import AuthenticationError
from retouch.keys import ApiKey
from retouch.store import Store

SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "All APIs require Bearer Token authentication: "
        "`Authorization: Bearer YOUR_API_KEY`",
    }
}
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_secret(request: Request) -> str:
    """The key sent in `Authorization: Bearer …`, or a 401 when there is none."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthenticationError(
            "Missing API key: send the header `Authorization: Bearer YOUR_API_KEY`",
            fallback_suggestion="create a key with `retouch keys create --name NAME`",
            headers=_CHALLENGE,
        )
    return secret.strip()


def authenticate(store: Store, secret: str) -> ApiKey:
    key = store.find_active_key(secret)
    if key is None:
        raise AuthenticationError(
            "Invalid authentication credentials: the API key is unknown or revoked",
            headers=_CHALLENGE,
        )
    return key
