"""API keys in the store: created for an account, found by secret, revoked, rotated."""

from __future__ import annotations

import hmac
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, select, update

from retouch.accounts import DEFAULT_CREDITS, MAX_NAME_LENGTH, Account, UserGroup, check_text
from retouch.errors import ConflictError, NotFoundError
from retouch.keys import ApiKey, display_prefix, generate_secret, hash_secret, new_key_id
from retouch.store.base import StoreBase
from retouch.store.ledger import create_account_row, find_account
from retouch.store.rows import account_from_row, key_from_row
from retouch.store.schema import accounts, api_keys

_ACCOUNT_COLUMNS = [column.label(f"acct__{column.name}") for column in accounts.c]
_KEYS_WITH_ACCOUNTS = select(api_keys, *_ACCOUNT_COLUMNS).join(
    accounts, accounts.c.id == api_keys.c.account_id
)
# Built once: building a statement costs as much as running it on SQLite.
_KEY_BY_HASH = _KEYS_WITH_ACCOUNTS.where(api_keys.c.key_hash == bindparam("key_hash"))


def _key(row: Row[Any]) -> ApiKey:
    fields = row._mapping
    account = SimpleNamespace(**{c.name: fields[f"acct__{c.name}"] for c in accounts.c})
    return key_from_row(row, account_from_row(account))


class KeyStore(StoreBase):
    """Keys are stored as digests; the secret exists only in the answer that creates it."""

    def create_key(
        self,
        name: str,
        account: str | None = None,
        *,
        user_group: UserGroup = "default",
        credits: float = DEFAULT_CREDITS,
    ) -> tuple[ApiKey, str]:
        """A key for `account` (id or name), or for a new account called `name`
        with `user_group` and `credits`. The secret is returned here and never again."""
        now = self.clock.now()
        with self._write() as conn:
            if account is None:
                owner = create_account_row(conn, name, user_group, credits, now)
            else:
                owner = account_from_row(find_account(conn, account))
            return self._insert_key(conn, name, owner)

    def _insert_key(self, conn: Connection, name: str, owner: Account) -> tuple[ApiKey, str]:
        check_text(name, "name", MAX_NAME_LENGTH)
        secret = generate_secret()
        key = ApiKey(
            id=new_key_id(),
            name=name,
            prefix=display_prefix(secret),
            account=owner,
            created_at=self.clock.now(),
        )
        conn.execute(
            insert(api_keys).values(
                id=key.id,
                account_id=owner.id,
                name=key.name,
                key_hash=hash_secret(secret),
                prefix=key.prefix,
                created_at=key.created_at,
            )
        )
        return key, secret

    def list_keys(self, account: str | None = None) -> list[ApiKey]:
        query = _KEYS_WITH_ACCOUNTS.order_by(api_keys.c.created_at)
        with self._read() as conn:
            if account is not None:
                query = query.where(api_keys.c.account_id == find_account(conn, account).id)
            rows = conn.execute(query).all()
        return [_key(row) for row in rows]

    def get_key(self, key_id: str) -> ApiKey:
        with self._read() as conn:
            row = conn.execute(_KEYS_WITH_ACCOUNTS.where(api_keys.c.id == key_id)).first()
        if row is None:
            raise NotFoundError(f"No key found with id {key_id!r}", param="key_id")
        return _key(row)

    def find_active_key(self, secret: str) -> ApiKey | None:
        """The key this secret belongs to, unless it is unknown or revoked."""
        digest = hash_secret(secret)
        with self._read() as conn:
            row = conn.execute(_KEY_BY_HASH, {"key_hash": digest}).first()
        # The index finds the row; the digest is compared again in constant time.
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        if row.revoked_at is not None:
            return None
        return _key(row)

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self.clock.now())
            )
        return result.rowcount == 1

    def rotate_key(self, key_id: str) -> tuple[ApiKey, str]:
        """Give a key a new secret: the old one answers 401 from the commit on. The key
        stays (id, name, account), and with it what its holder reaches: its tasks,
        running ones included, and its idempotency keys."""
        secret = generate_secret()
        now = self.clock.now()
        with self._write() as conn:
            changed = conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(key_hash=hash_secret(secret), prefix=display_prefix(secret), rotated_at=now)
            )
            row = conn.execute(_KEYS_WITH_ACCOUNTS.where(api_keys.c.id == key_id)).first()
        if row is None:
            raise NotFoundError(f"No key found with id {key_id!r}", param="key_id")
        if changed.rowcount != 1:
            raise ConflictError(f"Key {key_id!r} is revoked; create a new one", param="key_id")
        return _key(row), secret
