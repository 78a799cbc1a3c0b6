"""Persistence: the task queue and keys, on SQLite or PostgreSQL."""

from retouch.store.migrate import migrate
from retouch.store.store import Store, create_db_engine, database_unavailable

__all__ = ["Store", "create_db_engine", "database_unavailable", "migrate"]
