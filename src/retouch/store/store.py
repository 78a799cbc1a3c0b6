"""The store: accounts and their ledger, keys, the task queue and the callback
outbox behind one small seam."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from retouch.errors import first_line
from retouch.store.base import (
    DEFAULT_POOL_SIZE,
    StoreBase,
    create_db_engine,
    database_unavailable,
)
from retouch.store.keystore import KeyStore
from retouch.store.ledger import AccountStore
from retouch.store.migrate import migrate
from retouch.store.outbox import OutboxStore
from retouch.store.queue import TaskQueue

if TYPE_CHECKING:
    from retouch.settings import Settings

__all__ = [
    "DatabaseOpenError",
    "Store",
    "StoreBase",
    "create_db_engine",
    "database_unavailable",
    "open_database",
    "open_store",
]


class Store(AccountStore, KeyStore, TaskQueue, OutboxStore):
    """Everything persistent, on SQLite or PostgreSQL."""


class DatabaseOpenError(Exception):
    """The database cannot be opened; the message is one sentence for the operator."""


def open_store(settings: Settings) -> Store:
    """The store a server, worker or command is configured for, its data directory
    created and its schema up to date; DatabaseOpenError says why it cannot be."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return open_database(settings.resolved_database_url, pool_size=settings.db_pool_size)


def open_database(url: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> Store:
    """Connect, bring the schema up to date and return the store; a database that
    cannot be reached or used raises DatabaseOpenError saying why, never a traceback."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseOpenError(
            f"cannot open the database at {url!r}: that is no database URL; " + _EXAMPLE
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise DatabaseOpenError(
            f"cannot open the database at {shown}: Retouch keeps its data in SQLite or "
            f"PostgreSQL, not {backend}; " + _EXAMPLE
        )
    try:
        store = Store.from_url(url, pool_size=pool_size)
    except ImportError as exc:
        raise DatabaseOpenError(
            f"cannot open the database at {shown}: its driver is not installed "
            f"({first_line(exc)}); use postgresql+psycopg://… after "
            "pip install 'retouch[postgres]'"
        ) from None
    except ArgumentError as exc:  # an unknown driver, say
        raise DatabaseOpenError(
            f"cannot open the database at {shown}: {first_line(exc)}; " + _EXAMPLE
        ) from None
    try:
        migrate(store.engine)
    except DBAPIError as exc:
        store.close()
        check = (
            "that its folder exists and can be written"
            if backend == "sqlite"
            else "that the server is running and takes these credentials"
        )
        raise DatabaseOpenError(
            f"cannot open the database at {shown}: {first_line(exc.orig or exc)}; "
            f"check --database-url (or RETOUCH_DATABASE_URL) and {check}"
        ) from None
    return store


_EXAMPLE = (
    "--database-url takes a URL such as postgresql+psycopg://user:password@host/retouch "
    "or sqlite:///path/to/retouch.db"
)
