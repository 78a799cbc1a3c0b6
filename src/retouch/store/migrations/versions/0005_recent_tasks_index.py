"""An index for a model's latest completed tasks, and nothing left to sweep of tasks
cancelled before they ever ran.

`recent_task_seconds` (the wait estimate, every few seconds per model) reads the
last completed tasks of a model; without this index it sorted every task that
model ever completed. Tasks cancelled while pending before this revision were
never marked purged, so the janitor's scan for abandoned results grew with them;
they never ran and have no results.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_model_finished", "tasks", ["model", "status", "finished_at"])
    tasks = sa.table(
        "tasks",
        sa.column("status", sa.String()),
        sa.column("attempts", sa.Integer()),
        sa.column("results_purged", sa.Boolean()),
    )
    op.execute(
        tasks.update()
        .where(
            tasks.c.status == "cancelled",
            tasks.c.attempts == 0,
            tasks.c.results_purged.is_(False),
        )
        .values(results_purged=True)
    )


def downgrade() -> None:
    # The backfill stays: those tasks have no results either way.
    op.drop_index("ix_tasks_model_finished", table_name="tasks")
