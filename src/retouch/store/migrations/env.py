"""Alembic environment: the engine (or connection) comes from the caller."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine

from retouch.store.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    attributes = context.config.attributes
    connection: Connection | None = attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine: Engine = attributes["engine"]
    with engine.connect() as conn:
        _run(conn)


run_migrations_online()
