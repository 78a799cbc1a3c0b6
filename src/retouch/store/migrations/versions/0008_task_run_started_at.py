"""When the engine started a task's current run (not when a worker claimed it, ahead
of time): the typical run time and the wait estimates are measured from it.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from retouch.store.schema import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: older tasks are measured from their claim, as before.
    op.add_column("tasks", sa.Column("run_started_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "run_started_at")
