"""Bearer-key authentication, as the seed's `bearerAuth` scheme describes."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from retouch.errors import AuthenticationError
from retouch.keys import ApiKey

bearer = HTTPBearer(
    scheme_name="bearerAuth",
    auto_error=False,
    description="All APIs require Bearer Token authentication: `Authorization: Bearer KEY`",
)

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    if credentials is None or not credentials.credentials:
        raise AuthenticationError(
            "Missing API key: send the header `Authorization: Bearer YOUR_API_KEY`",
            fallback_suggestion="create a key with `retouch keys create --name NAME`",
            headers=_CHALLENGE,
        )
    key = request.app.state.services.store.find_active_key(credentials.credentials)
    if key is None:
        raise AuthenticationError(
            "Invalid authentication credentials: the API key is unknown or revoked",
            headers=_CHALLENGE,
        )
    return cast(ApiKey, key)


CurrentKey = Annotated[ApiKey, Depends(authenticate)]
