"""API keys: generated once, shown once, stored as a SHA-256 digest."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from retouch.accounts import Account

KEY_PREFIX = "rt_"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    account: Account
    created_at: datetime
    revoked_at: datetime | None = None
    rotated_at: datetime | None = None  # when its secret was last replaced

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def account_id(self) -> str:
        return self.account.id

    @property
    def user_group(self) -> str:
        return self.account.user_group


def generate_secret() -> str:
    """A new key: 256 bits of randomness, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    """Keys carry 256 random bits, so one unsalted SHA-256 is enough to store them."""
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[: len(KEY_PREFIX) + 6]
