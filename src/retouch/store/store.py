"""The store: accounts and their ledger, keys, the task queue and the callback
outbox behind one small seam."""

from __future__ import annotations

from retouch.store.base import StoreBase, create_db_engine, database_unavailable
from retouch.store.keystore import KeyStore
from retouch.store.ledger import AccountStore
from retouch.store.outbox import OutboxStore
from retouch.store.queue import TaskQueue

__all__ = ["Store", "StoreBase", "create_db_engine", "database_unavailable"]


class Store(AccountStore, KeyStore, TaskQueue, OutboxStore):
    """Everything persistent, on SQLite or PostgreSQL."""
