"""Each lease's length, so that the janitor judges a lease by its own worker's setting.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a task leased before this revision is judged by the janitor's setting.
    op.add_column("tasks", sa.Column("lease_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    # In place (SQLite has DROP COLUMN since 3.35): a batch copy of `tasks` would
    # drop the table that callbacks and the ledger refer to.
    op.drop_column("tasks", "lease_seconds")
