"""API keys in the store: created, found by secret, revoked."""

from __future__ import annotations

from sqlalchemy import (
    bindparam,
    insert,
    select,
    update,
)

from retouch.keys import ApiKey, display_prefix, generate_secret, hash_secret, new_key_id
from retouch.store.base import StoreBase
from retouch.store.rows import key_from_row
from retouch.store.schema import api_keys

# Built once: building a statement costs as much as running it on SQLite.
_KEY_BY_HASH = select(api_keys).where(api_keys.c.key_hash == bindparam("key_hash"))


class KeyStore(StoreBase):
    """Keys are stored as digests; the secret exists only in `create_key`'s answer."""

    def create_key(self, name: str, user_group: str = "default") -> tuple[ApiKey, str]:
        """Create a key; the secret is returned here and never again."""
        secret = generate_secret()
        key = ApiKey(
            id=new_key_id(),
            name=name,
            prefix=display_prefix(secret),
            user_group=user_group,
            created_at=self.clock.now(),
        )
        with self._write() as conn:
            conn.execute(
                insert(api_keys).values(
                    id=key.id,
                    name=key.name,
                    key_hash=hash_secret(secret),
                    prefix=key.prefix,
                    user_group=key.user_group,
                    created_at=key.created_at,
                )
            )
        return key, secret

    def list_keys(self) -> list[ApiKey]:
        with self._read() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [key_from_row(row) for row in rows]

    def find_active_key(self, secret: str) -> ApiKey | None:
        """The key this secret belongs to, unless it is unknown or revoked."""
        with self._read() as conn:
            row = conn.execute(_KEY_BY_HASH, {"key_hash": hash_secret(secret)}).first()
        if row is None or row.revoked_at is not None:
            return None
        return key_from_row(row)

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self.clock.now())
            )
        return result.rowcount == 1
