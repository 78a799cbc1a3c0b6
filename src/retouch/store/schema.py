"""Tables. Written once for SQLite and PostgreSQL alike (SQLAlchemy Core)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

from retouch.tasks import MAX_TASK_ID_LENGTH


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where a timezone-aware one is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# An account holds credits and limits; its keys act for it. `balance_units` and
# `reserved_units` are running totals of the ledger, kept beside it in the same
# transactions (and verified against it by `retouch ledger check`); `rate_tat` is
# the rate limiter's state (the GCRA's theoretical arrival time).
accounts = Table(
    "accounts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("user_group", String(20), nullable=False),
    Column("allowed_models", JSON, nullable=True),
    Column("requests_per_minute", Integer, nullable=True),
    Column("max_concurrent_tasks", Integer, nullable=True),
    Column("balance_units", BigInteger, nullable=False),
    Column("reserved_units", BigInteger, nullable=False),
    Column("rate_tat", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("rotated_at", UTCDateTime(), nullable=True),
    Index("ix_api_keys_account", "account_id"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(MAX_TASK_ID_LENGTH), primary_key=True),
    Column("key_id", String(40), ForeignKey("api_keys.id"), nullable=False),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("model", String(100), nullable=False),
    Column("status", String(20), nullable=False),
    Column("progress", Integer, nullable=False, default=0),
    Column("params", JSON, nullable=False),
    Column("user_group", String(20), nullable=False),
    Column("credits_reserved", Float, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # The queue's order: `created_at`, less the vip head start for vip tasks.
    Column("priority_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=True),
    # When the engine started the current run (a task is claimed ahead of its run).
    Column("run_started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("lease_owner", String(100), nullable=True),
    Column("lease_expires_at", UTCDateTime(), nullable=True),
    # The length of the lease its worker renews (a third of it at a time).
    Column("lease_seconds", Float, nullable=True),
    Column("error_code", Integer, nullable=True),
    Column("error_type", String(60), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("error_param", String(100), nullable=True),
    Column("result_keys", JSON, nullable=True),
    Column("results_expire_at", UTCDateTime(), nullable=True),
    Column("results_purged", Boolean, nullable=False, default=False),
    # The address the task was created through, for the links in its callback (they
    # then match what a poll through that address shows); none with --public-url.
    Column("base_url", String(2048), nullable=True),
    Index("ix_tasks_queue", "status", "priority_at"),
    Index("ix_tasks_key_created", "key_id", "created_at"),
    Index("ix_tasks_account_status", "account_id", "status"),
    Index("ix_tasks_results_expire", "results_purged", "results_expire_at"),
    # A model's latest completed tasks (`recent_task_seconds`): read in index order,
    # with no sort over every task that model ever completed.
    Index("ix_tasks_model_finished", "model", "status", "finished_at"),
)

# The callback outbox: one row per delivery, written in the transaction that
# finalizes the task; `id` is the Standard Webhooks `webhook-id`.
callback_deliveries = Table(
    "callback_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=False),
    Column("url", Text, nullable=False),
    Column("status", String(20), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Index("ix_callback_deliveries_due", "status", "next_attempt_at"),
    Index("ix_callback_deliveries_task", "task_id", "created_at"),
)

# The credits ledger: append-only. A task has at most one entry of each kind
# (the unique index), and the ledger check requires exactly one reserve and,
# once the task is terminal, exactly one capture or release.
ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=True),
    Column("kind", String(10), nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("note", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_ledger_entries_account", "account_id", "id"),
    Index("uq_ledger_entries_task_kind", "task_id", "kind", unique=True),
)

# `Idempotency-Key`s seen on create, per API key, for 24 hours.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key_id", String(40), ForeignKey("api_keys.id"), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index("ix_idempotency_keys_expires", "expires_at"),
)
