"""The admin API under `/admin/v1`: accounts, keys, credits and the ledger check.

It answers only to the admin token from the settings (never to a user's key),
compared in constant time; without a configured token it is off.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, TypeVar, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from retouch.accounts import (
    DEFAULT_CREDITS,
    MAX_ACCOUNT_LIMIT,
    MAX_CREDITS,
    MAX_NAME_LENGTH,
    MAX_NOTE_LENGTH,
    Account,
    LedgerEntry,
    Limits,
    UserGroup,
)
from retouch.api.routes import _errors, json_body
from retouch.callbacks import webhook_secret
from retouch.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from retouch.keys import ApiKey
from retouch.store import Store

T = TypeVar("T")
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"adminToken": []}]
ADMIN_SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "The admin token (`RETOUCH_ADMIN_TOKEN`), never a user's API key.",
}

router = APIRouter(prefix="/admin/v1", tags=["Admin"])


class AdminService:
    def __init__(
        self,
        store: Store,
        token: str | None,
        *,
        default_credits: float = DEFAULT_CREDITS,
        limits: Limits | None = None,
        models: list[str] | None = None,
        signing_key: bytes | None = None,
    ) -> None:
        self.store = store
        self.token = token
        self.default_credits = default_credits
        self.limits = limits or Limits()
        self.models = models
        self.signing_key = signing_key

    def check_token(self, request: Request) -> None:
        if not self.token:
            raise PermissionDeniedError(
                "The admin API is off: set RETOUCH_ADMIN_TOKEN to turn it on"
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise AuthenticationError(
                "Invalid admin credentials: send `Authorization: Bearer ADMIN_TOKEN`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_models(self, names: list[str] | None) -> None:
        if names is None or self.models is None:
            return
        unknown = sorted(set(names) - set(self.models))
        if unknown:
            raise InvalidRequestError(
                f"`allowed_models`: this server serves no model {', '.join(unknown)}; "
                f"it serves {', '.join(sorted(self.models))}",
                param="allowed_models",
            )

    def render_account(self, account: Account) -> dict[str, Any]:
        limits = self.limits.for_account(account)
        body: dict[str, Any] = {
            "object": "account",
            "id": account.id,
            "name": account.name,
            "user_group": account.user_group,
            "created": int(account.created_at.timestamp()),
            "credits": {
                "balance": account.balance,
                "reserved": account.reserved,
                "available": account.available,
            },
            "allowed_models": None
            if account.allowed_models is None
            else list(account.allowed_models),
            "limits": {
                "requests_per_minute": limits.requests_per_minute,
                "max_concurrent_tasks": limits.max_concurrent_tasks,
            },
            "overrides": {
                "requests_per_minute": account.requests_per_minute,
                "max_concurrent_tasks": account.max_concurrent_tasks,
            },
        }
        if self.signing_key is not None:
            body["webhook_secret"] = webhook_secret(self.signing_key, account.id)
        return body


def render_key(key: ApiKey, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": "api_key",
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "account": {"id": key.account.id, "name": key.account.name},
        "created": int(key.created_at.timestamp()),
        "revoked": None if key.revoked_at is None else int(key.revoked_at.timestamp()),
        "rotated": None if key.rotated_at is None else int(key.rotated_at.timestamp()),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def render_entry(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "object": "ledger_entry",
        "id": entry.id,
        "kind": entry.kind.value,
        "credits": entry.credits,
        "task_id": entry.task_id,
        "note": entry.note,
        "created": int(entry.created_at.timestamp()),
    }


class _Body(BaseModel):
    """An admin request body: unknown fields and coerced types (`true` for a number,
    `"5"` for an integer) are refused, not guessed at."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NewAccount(_Body):
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    user_group: UserGroup = "default"
    credits: float | None = Field(default=None, ge=0, le=MAX_CREDITS)
    allowed_models: list[str] | None = None
    requests_per_minute: int | None = Field(default=None, ge=1, le=MAX_ACCOUNT_LIMIT)
    max_concurrent_tasks: int | None = Field(default=None, ge=1, le=MAX_ACCOUNT_LIMIT)


class AccountChange(_Body):
    """Fields left out stay as they are; `null` puts a field back to its default."""

    user_group: UserGroup | None = None
    allowed_models: list[str] | None = None
    requests_per_minute: int | None = Field(default=None, ge=1, le=MAX_ACCOUNT_LIMIT)
    max_concurrent_tasks: int | None = Field(default=None, ge=1, le=MAX_ACCOUNT_LIMIT)


class Grant(_Body):
    credits: float = Field(
        ge=-MAX_CREDITS, le=MAX_CREDITS, description="Credits to add (negative: to take back)."
    )
    note: str | None = Field(default=None, max_length=MAX_NOTE_LENGTH)


class NewKey(_Body):
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    account: str | None = Field(
        default=None, description="Id or name of the account; default: a new account."
    )
    user_group: UserGroup = "default"
    credits: float | None = Field(default=None, ge=0, le=MAX_CREDITS)


def _admin(request: Request) -> AdminService:
    admin = cast(AdminService | None, getattr(request.app.state, "admin", None))
    if admin is None:
        raise PermissionDeniedError("The admin API is off: set RETOUCH_ADMIN_TOKEN to turn it on")
    return admin


async def _run(request: Request, work: Callable[[AdminService], T]) -> T:
    admin = _admin(request)
    admin.check_token(request)
    return await run_in_threadpool(work, admin)


async def _body(request: Request, model: type[T]) -> T:
    _admin(request).check_token(request)  # no body is read before the token is checked
    return cast(T, await json_body(request, cast(type[BaseModel], model)))


_SECURED = {"security": ADMIN_SECURITY}
_READ_ERRORS = _errors(401, 403, 404)
_WRITE_ERRORS = _errors(400, 401, 403, 404, 409)
REQUEST_MODELS: tuple[type[BaseModel], ...] = (NewAccount, AccountChange, Grant, NewKey)


def _with_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI of an admin operation that reads `model` as its JSON body (parsed
    by `_body`, after the token check; the schema is in the document's components)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        **_SECURED,
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
    }


def _with_query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI of an admin operation with one optional query parameter."""
    parameter = {
        "name": name, "in": "query", "required": False, "description": description,
        "schema": schema,
    }  # fmt: skip
    return {**_SECURED, "parameters": [parameter]}


@router.get("/accounts", summary="List accounts", responses=_READ_ERRORS, openapi_extra=_SECURED)
async def list_accounts(request: Request) -> JSONResponse:
    def work(admin: AdminService) -> dict[str, Any]:
        data = [admin.render_account(account) for account in admin.store.list_accounts()]
        return {"object": "list", "data": data}

    return JSONResponse(await _run(request, work))


@router.post(
    "/accounts",
    summary="Create an account",
    status_code=201,
    responses=_WRITE_ERRORS,
    openapi_extra=_with_body(NewAccount),
)
async def create_account(request: Request) -> JSONResponse:
    body = await _body(request, NewAccount)

    def work(admin: AdminService) -> dict[str, Any]:
        admin.check_models(body.allowed_models)
        credits = admin.default_credits if body.credits is None else body.credits
        account = admin.store.create_account(body.name, body.user_group, credits)
        if body.allowed_models is not None or body.requests_per_minute or body.max_concurrent_tasks:
            account = admin.store.update_account(
                account.id,
                allowed_models=body.allowed_models,
                requests_per_minute=body.requests_per_minute,
                max_concurrent_tasks=body.max_concurrent_tasks,
            )
        return admin.render_account(account)

    return JSONResponse(await _run(request, work), status_code=201)


@router.get(
    "/accounts/{account}",
    summary="Show an account (by id or name)",
    responses=_READ_ERRORS,
    openapi_extra=_SECURED,
)
async def get_account(account: str, request: Request) -> JSONResponse:
    return JSONResponse(
        await _run(request, lambda admin: admin.render_account(admin.store.get_account(account)))
    )


@router.patch(
    "/accounts/{account}",
    summary="Change an account's group, models or limits",
    responses=_WRITE_ERRORS,
    openapi_extra=_with_body(AccountChange),
)
async def update_account(account: str, request: Request) -> JSONResponse:
    body = await _body(request, AccountChange)
    given = body.model_dump(exclude_unset=True)
    given.pop("user_group", None)

    def work(admin: AdminService) -> dict[str, Any]:
        admin.check_models(body.allowed_models)
        changed = admin.store.update_account(account, user_group=body.user_group, **given)
        return admin.render_account(changed)

    return JSONResponse(await _run(request, work))


@router.post(
    "/accounts/{account}/credits",
    summary="Grant (or take back) credits",
    responses=_WRITE_ERRORS,
    openapi_extra=_with_body(Grant),
)
async def grant_credits(account: str, request: Request) -> JSONResponse:
    body = await _body(request, Grant)

    def work(admin: AdminService) -> dict[str, Any]:
        note = body.note or "granted through the admin API"
        return admin.render_account(admin.store.grant(account, body.credits, note))

    return JSONResponse(await _run(request, work))


@router.get(
    "/accounts/{account}/ledger",
    summary="An account's ledger, newest first",
    responses=_errors(400, 401, 403, 404),
    openapi_extra=_with_query(
        "limit",
        "Entries to return, newest first.",
        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    ),
)
async def account_ledger(account: str, request: Request) -> JSONResponse:
    limit = request.query_params.get("limit", "100")
    if not limit.isdecimal() or not 1 <= int(limit) <= 1000:
        raise InvalidRequestError("`limit` must be a whole number from 1 to 1000", param="limit")

    def work(admin: AdminService) -> dict[str, Any]:
        entries = admin.store.ledger(account, int(limit))
        return {"object": "list", "data": [render_entry(entry) for entry in entries]}

    return JSONResponse(await _run(request, work))


@router.get(
    "/keys",
    summary="List keys (never their secrets)",
    responses=_READ_ERRORS,
    openapi_extra=_with_query(
        "account", "Only the keys of this account (id or name).", {"type": "string"}
    ),
)
async def list_keys(request: Request) -> JSONResponse:
    account = request.query_params.get("account")

    def work(admin: AdminService) -> dict[str, Any]:
        keys = admin.store.list_keys(account)
        return {"object": "list", "data": [render_key(key) for key in keys]}

    return JSONResponse(await _run(request, work))


@router.post(
    "/keys",
    summary="Create a key; its secret is in this answer only",
    status_code=201,
    responses=_WRITE_ERRORS,
    openapi_extra=_with_body(NewKey),
)
async def create_key(request: Request) -> JSONResponse:
    body = await _body(request, NewKey)
    if body.account is not None:
        for field in ("user_group", "credits"):
            if field in body.model_fields_set:
                raise InvalidRequestError(
                    f"`{field}` describes a new account; account {body.account!r} exists: "
                    "change it with PATCH /admin/v1/accounts/{account} or grant credits",
                    param=field,
                )

    def work(admin: AdminService) -> dict[str, Any]:
        credits = admin.default_credits if body.credits is None else body.credits
        key, secret = admin.store.create_key(
            body.name, body.account, user_group=body.user_group, credits=credits
        )
        return render_key(key, secret)

    return JSONResponse(await _run(request, work), status_code=201)


@router.post(
    "/keys/{key_id}/revoke",
    summary="Revoke a key: it answers 401 from now on",
    responses=_WRITE_ERRORS,
    openapi_extra=_SECURED,
)
async def revoke_key(key_id: str, request: Request) -> JSONResponse:
    def work(admin: AdminService) -> dict[str, Any]:
        admin.store.revoke_key(key_id)
        return render_key(admin.store.get_key(key_id))

    return JSONResponse(await _run(request, work))


@router.post(
    "/keys/{key_id}/rotate",
    summary="Give a key a new secret: the old secret stops at once; id and tasks stay",
    responses=_WRITE_ERRORS,
    openapi_extra=_SECURED,
)
async def rotate_key(key_id: str, request: Request) -> JSONResponse:
    def work(admin: AdminService) -> dict[str, Any]:
        key, secret = admin.store.rotate_key(key_id)
        return render_key(key, secret)

    return JSONResponse(await _run(request, work))


@router.get(
    "/ledger/check",
    summary="Verify the ledger's invariants",
    responses=_READ_ERRORS,
    openapi_extra=_SECURED,
)
async def check_ledger(request: Request) -> JSONResponse:
    def work(admin: AdminService) -> dict[str, Any]:
        problems = admin.store.check_ledger()
        return {"object": "ledger_check", "ok": not problems, "problems": problems}

    return JSONResponse(await _run(request, work))
