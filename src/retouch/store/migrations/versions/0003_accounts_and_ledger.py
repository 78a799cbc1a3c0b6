"""Accounts, the credits ledger, idempotency keys and the vip queue order.

Existing keys each get an account of their own (their name, their group) with
the default starting credits. Existing tasks get the ledger entries they would
have had: a reservation, closed by a release when they are already finished
(nothing was charged before the ledger existed); the credits their open
reservations hold are granted on top, so every account starts balanced.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

from retouch.store.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_STARTING_UNITS = 100_000  # 100 credits: the default for new accounts
_TERMINAL = ("completed", "failed", "cancelled")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("user_group", sa.String(20), nullable=False),
        sa.Column("allowed_models", sa.JSON(), nullable=True),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_concurrent_tasks", sa.Integer(), nullable=True),
        sa.Column("balance_units", sa.BigInteger(), nullable=False),
        sa.Column("reserved_units", sa.BigInteger(), nullable=False),
        sa.Column("rate_tat", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("name", name="uq_accounts_name"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_ledger_entries_account_id_accounts"
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_ledger_entries_task_id_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_entries"),
    )
    op.create_index("ix_ledger_entries_account", "ledger_entries", ["account_id", "id"])
    op.create_index(
        "uq_ledger_entries_task_kind", "ledger_entries", ["task_id", "kind"], unique=True
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name="fk_idempotency_keys_key_id_api_keys"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name="fk_idempotency_keys_task_id_tasks"
        ),
        sa.PrimaryKeyConstraint("key_id", "idempotency_key", name="pk_idempotency_keys"),
    )
    op.create_index("ix_idempotency_keys_expires", "idempotency_keys", ["expires_at"])

    op.add_column("api_keys", sa.Column("account_id", sa.String(40), nullable=True))
    op.add_column("tasks", sa.Column("account_id", sa.String(40), nullable=True))
    op.add_column("tasks", sa.Column("priority_at", UTCDateTime(), nullable=True))
    _backfill()

    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("account_id", existing_type=sa.String(40), nullable=False)
        batch.create_foreign_key(
            "fk_api_keys_account_id_accounts", "accounts", ["account_id"], ["id"]
        )
        batch.drop_column("user_group")
    op.create_index("ix_api_keys_account", "api_keys", ["account_id"])
    op.drop_index("ix_tasks_queue", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.alter_column("account_id", existing_type=sa.String(40), nullable=False)
        batch.alter_column("priority_at", existing_type=UTCDateTime(), nullable=False)
        batch.create_foreign_key("fk_tasks_account_id_accounts", "accounts", ["account_id"], ["id"])
    op.create_index("ix_tasks_queue", "tasks", ["status", "priority_at"])
    op.create_index("ix_tasks_account_status", "tasks", ["account_id", "status"])


def _backfill() -> None:
    conn = op.get_bind()
    meta = sa.MetaData()
    keys = sa.Table("api_keys", meta, autoload_with=conn)
    tasks = sa.Table("tasks", meta, autoload_with=conn)
    accounts = sa.Table("accounts", meta, autoload_with=conn)
    ledger = sa.Table("ledger_entries", meta, autoload_with=conn)

    taken: set[str] = set()
    for key in conn.execute(sa.select(keys).order_by(keys.c.created_at)).all():
        name = key.name if key.name not in taken else f"{key.name} ({key.id})"
        taken.add(name)
        account_id = "acct_" + secrets.token_hex(8)
        conn.execute(
            sa.insert(accounts).values(
                id=account_id,
                name=name,
                user_group=key.user_group,
                balance_units=0,
                reserved_units=0,
                created_at=key.created_at,
            )
        )
        conn.execute(sa.update(keys).where(keys.c.id == key.id).values(account_id=account_id))

    account_of_key = (
        sa.select(keys.c.account_id).where(keys.c.id == tasks.c.key_id).scalar_subquery()
    )
    conn.execute(sa.update(tasks).values(account_id=account_of_key, priority_at=tasks.c.created_at))

    units = sa.cast(sa.func.round(tasks.c.credits_reserved * 1000), sa.BigInteger)
    note = sa.literal("before the ledger existed")
    conn.execute(
        sa.insert(ledger).from_select(
            ["account_id", "task_id", "kind", "units", "note", "created_at"],
            sa.select(
                tasks.c.account_id,
                tasks.c.id,
                sa.literal("reserve"),
                units,
                note,
                tasks.c.created_at,
            ),
        )
    )
    conn.execute(
        sa.insert(ledger).from_select(
            ["account_id", "task_id", "kind", "units", "note", "created_at"],
            sa.select(
                tasks.c.account_id,
                tasks.c.id,
                sa.literal("release"),
                units,
                note,
                sa.func.coalesce(tasks.c.finished_at, tasks.c.created_at),
            ).where(tasks.c.status.in_(_TERMINAL)),
        )
    )

    open_units: dict[str, int] = dict(
        conn.execute(
            sa.select(tasks.c.account_id, sa.func.sum(units))
            .where(tasks.c.status.not_in(_TERMINAL))
            .group_by(tasks.c.account_id)
        ).all()
    )
    for account in conn.execute(sa.select(accounts.c.id, accounts.c.created_at)).all():
        held = int(open_units.get(account.id) or 0)
        conn.execute(
            sa.insert(ledger).values(
                account_id=account.id,
                kind="grant",
                units=_STARTING_UNITS + held,
                note="starting credits, and those held by tasks queued before the ledger existed",
                created_at=account.created_at,
            )
        )
        conn.execute(
            sa.update(accounts)
            .where(accounts.c.id == account.id)
            .values(balance_units=_STARTING_UNITS + held, reserved_units=held)
        )


def downgrade() -> None:
    op.drop_index("ix_tasks_account_status", table_name="tasks")
    op.drop_index("ix_tasks_queue", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint("fk_tasks_account_id_accounts", type_="foreignkey")
        batch.drop_column("priority_at")
        batch.drop_column("account_id")
    op.create_index("ix_tasks_queue", "tasks", ["status", "created_at"])
    op.drop_index("ix_api_keys_account", table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("user_group", sa.String(20), nullable=False, server_default="default")
        )
        batch.drop_constraint("fk_api_keys_account_id_accounts", type_="foreignkey")
        batch.drop_column("account_id")
    op.drop_table("idempotency_keys")
    op.drop_table("ledger_entries")
    op.drop_table("accounts")
