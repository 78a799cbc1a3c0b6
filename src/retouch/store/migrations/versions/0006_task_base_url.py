"""The address each task was created through, so that the links in its callback
are those a poll through that address shows (when no public URL is set, the
server's own listening address was used: a loopback or wildcard one, useless to
a receiver elsewhere).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: older tasks' callbacks use the server's address, as before.
    op.add_column("tasks", sa.Column("base_url", sa.String(2048), nullable=True))


def downgrade() -> None:
    # In place (SQLite has DROP COLUMN since 3.35): a batch copy of `tasks` would
    # drop the table that callbacks and the ledger refer to.
    op.drop_column("tasks", "base_url")
