"""The one place where errors become the seed's `{"error": {...}}` body."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route

from retouch.errors import (
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    RetouchError,
    ServiceUnavailableError,
    first_line,
)
from retouch.store import database_unavailable

log = logging.getLogger(__name__)

_LIST_BOUNDS = {"image_urls": "1-3 image URLs"}
DATABASE_RETRY_SECONDS = 5


def error_response(error: RetouchError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """`routes`: every route the app serves (FastAPI may keep included routers' routes
    nested), for the `Allow` header of a 405."""

    async def on_retouch_error(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(cast(RetouchError, exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(_from_http(request, cast(StarletteHTTPException, exc), routes))

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(invalid_request(cast(RequestValidationError, exc).errors()))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError())

    async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            return await on_unexpected(request, exc)
        log.warning(
            "database unavailable on %s %s: %s",
            request.method,
            request.url.path,
            first_line(exc, 200),
        )
        return error_response(
            ServiceUnavailableError(
                "The database is unreachable for the moment; retry shortly (a create is safe "
                "to retry with the same Idempotency-Key)",
                retry_after=DATABASE_RETRY_SECONDS,
            )
        )

    async def on_data_error(request: Request, exc: Exception) -> JSONResponse:
        # What the request's checks let through and the database refuses as data
        # (PostgreSQL: a NUL character in text, a value past a column's length).
        log.warning(
            "the database refused a value of %s %s: %s",
            request.method,
            request.url.path,
            first_line(exc, 200),
        )
        return error_response(
            InvalidRequestError(
                "The request holds a value the database cannot store: a NUL character, "
                "or a value longer than its field allows"
            )
        )

    app.add_exception_handler(OperationalError, on_database_error)
    app.add_exception_handler(DataError, on_data_error)
    app.add_exception_handler(RetouchError, on_retouch_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


def _from_http(
    request: Request, exc: StarletteHTTPException, routes: Sequence[BaseRoute]
) -> RetouchError:
    route = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return NotFoundError(f"No such endpoint: {route}")
    if exc.status_code == 405:
        allowed = _allowed_methods(request, routes)
        return MethodNotAllowedError(
            f"Method {request.method} is not allowed on {request.url.path}"
            + (f"; allowed: {allowed}" if allowed else ""),
            headers={"Allow": allowed} if allowed else None,
        )
    if exc.status_code >= 500:
        return InternalError()
    return InvalidRequestError(str(exc.detail))


def _allowed_methods(request: Request, routes: Sequence[BaseRoute]) -> str:
    """Every method some route serves at this path. Starlette's own `Allow` names only
    the first route matching the path, and a path often has one route per method."""
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.methods:
            if route.matches({**request.scope, "method": "GET"})[0] != Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods))


def invalid_request(errors: Sequence[Any]) -> InvalidRequestError:
    """The first validation problem, as one sentence naming its parameter."""
    first = dict(errors[0]) if errors else {}
    location = [part for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = _param_name(location)
    kind = first.get("type", "")
    if kind == "missing":
        message = f"`{param}` is required"
    elif kind in ("too_short", "too_long") and param in _LIST_BOUNDS:
        given = first.get("input")
        count = len(given) if isinstance(given, list) else "?"
        message = f"`{param}` must contain {_LIST_BOUNDS[param]}; got {count}"
    elif kind == "value_error":
        message = str(first.get("ctx", {}).get("error", first.get("msg", "")))
        if not message.startswith(param.split("[")[0]):
            message = f"`{param}` {message}"
    else:
        message = f"`{param}`: {first.get('msg', 'is invalid')}"
    # A URL problem names its index (`image_urls[1] must be …`): point `param` at it.
    if message.startswith(f"{param}[") and "]" in message:
        param = message.split(" ", 1)[0]
    return InvalidRequestError(message, param=param or None)


def validation_to_error(exc: ValidationError) -> InvalidRequestError:
    return invalid_request(exc.errors())


def _param_name(location: Sequence[Any]) -> str:
    name = ""
    for part in location:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name
