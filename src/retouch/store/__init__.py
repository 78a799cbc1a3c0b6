"""Persistence: the task queue and keys, on SQLite or PostgreSQL."""

from retouch.store.migrate import migrate
from retouch.store.store import (
    DatabaseOpenError,
    Store,
    create_db_engine,
    database_unavailable,
    open_database,
    open_store,
)

__all__ = [
    "DatabaseOpenError",
    "Store",
    "create_db_engine",
    "database_unavailable",
    "migrate",
    "open_database",
    "open_store",
]
