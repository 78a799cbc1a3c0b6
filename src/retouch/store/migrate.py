"""Apply the Alembic migrations, from the package, without an alembic.ini."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

_MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant: serialises concurrent `migrate` calls on PostgreSQL.
_PG_LOCK_ID = 0x7265746F7563


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; safe to run from concurrent starts."""
    config = alembic_config(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            try:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                conn.commit()
        return
    with engine.connect() as conn:
        # SQLite alters a table by copying it: foreign keys stay off meanwhile (a
        # pragma that works only outside a transaction), then every one is checked.
        raw = conn.connection.driver_connection
        if raw is None:
            raise RuntimeError("the SQLite connection is closed")
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            # One transaction for the whole upgrade, begun here (BEGIN IMMEDIATE: the
            # write lock, waited for): Alembic then runs every revision in it. Left
            # to itself it commits after each revision on SQLite, and a process
            # starting at the same moment could apply the next one in between.
            conn.begin()
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            conn.commit()
            broken = raw.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")
        finally:
            raw.execute("PRAGMA foreign_keys=ON")
