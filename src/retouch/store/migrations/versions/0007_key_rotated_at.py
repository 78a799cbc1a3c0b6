"""When each key's secret was last replaced: a rotation keeps the key (its id, its
tasks, its idempotency keys) and gives it a new secret.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from retouch.store.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("rotated_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column("api_keys", "rotated_at")
