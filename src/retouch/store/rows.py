"""Rows to domain objects, shared by the store's parts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from retouch.accounts import Account
from retouch.keys import ApiKey
from retouch.tasks import EditParams, Task, TaskError, TaskStatus


def error_values(error: TaskError) -> dict[str, Any]:
    return {
        "error_code": error.code,
        "error_type": error.type,
        "error_message": error.message,
        "error_param": error.param,
    }


def task_from_row(row: Row[Any]) -> Task:
    error = None
    if row.error_type is not None:
        error = TaskError(
            code=row.error_code,
            type=row.error_type,
            message=row.error_message,
            param=row.error_param,
        )
    return Task(
        id=row.id,
        key_id=row.key_id,
        account_id=row.account_id,
        model=row.model,
        status=TaskStatus(row.status),
        progress=row.progress,
        params=EditParams.from_json(row.params),
        created_at=row.created_at,
        priority_at=row.priority_at,
        user_group=row.user_group,
        credits_reserved=row.credits_reserved,
        attempts=row.attempts,
        cancel_requested=bool(row.cancel_requested),
        started_at=row.started_at,
        run_started_at=row.run_started_at,
        finished_at=row.finished_at,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        error=error,
        result_keys=list(row.result_keys or []),
        results_expire_at=row.results_expire_at,
        base_url=row.base_url,
    )


def key_from_row(key: Row[Any], account: Account) -> ApiKey:
    return ApiKey(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        account=account,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
        rotated_at=key.rotated_at,
    )


def account_from_row(row: Any) -> Account:
    """From an `accounts` row (or anything with its columns as attributes)."""
    models = row.allowed_models
    return Account(
        id=row.id,
        name=row.name,
        user_group=row.user_group,
        created_at=row.created_at,
        balance_units=int(row.balance_units),
        reserved_units=int(row.reserved_units),
        allowed_models=None if models is None else tuple(models),
        requests_per_minute=row.requests_per_minute,
        max_concurrent_tasks=row.max_concurrent_tasks,
    )
