"""Accounts, credits and the limits that apply to them.

Credits are counted in integer thousandths ("units") everywhere they are
stored or added up, so that a balance is exact however many entries make it;
the API shows them as decimal numbers of credits.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from retouch.errors import InvalidRequestError

UserGroup = Literal["default", "vip"]
USER_GROUPS: tuple[UserGroup, ...] = ("default", "vip")
UNITS_PER_CREDIT = 1000
DEFAULT_CREDITS = 100.0
# Far below what a 64-bit count of thousandths holds, so no sum of entries overflows.
MAX_CREDITS = 1e12
MAX_BALANCE_UNITS = 2**62
# An account's own rate or concurrency limit: far beyond any real one, within 32 bits.
MAX_ACCOUNT_LIMIT = 1_000_000
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
MAX_IDEMPOTENCY_KEY_LENGTH = 255


def to_units(credits: float) -> int:
    """Credits as integer thousandths; finer amounts are refused rather than rounded away,
    and amounts beyond `MAX_CREDITS` (or not numbers at all) are refused outright."""
    if not math.isfinite(credits) or abs(credits) > MAX_CREDITS:
        raise ValueError(f"{credits} credits is out of range: at most {MAX_CREDITS:.0e} at once")
    units = round(credits * UNITS_PER_CREDIT)
    if not math.isclose(units, credits * UNITS_PER_CREDIT, abs_tol=1e-6):
        raise ValueError(f"{credits} credits is finer than 0.001 credit")
    return units


def to_credits(units: int) -> float:
    return units / UNITS_PER_CREDIT


MAX_NAME_LENGTH = 200  # of an account or a key
MAX_NOTE_LENGTH = 500  # of a ledger entry


def check_text(value: str, param: str, max_length: int) -> str:
    """An operator-given name or note: 1 to `max_length` characters, none of them a
    control character (they would end up in terminals and in PostgreSQL, which
    refuses NUL)."""
    if not 1 <= len(value) <= max_length:
        raise InvalidRequestError(f"`{param}` must be 1-{max_length} characters", param=param)
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise InvalidRequestError(
            f"`{param}` must not hold control characters (newlines, tabs, NUL, escapes)",
            param=param,
        )
    return value


def new_account_id() -> str:
    return "acct_" + secrets.token_hex(8)


class EntryKind(StrEnum):
    """The ledger's four entries. A balance is the grants less the captures; the credits
    held for unfinished tasks are their reservations not yet closed by a capture
    (what was produced) or a release (nothing charged)."""

    GRANT = "grant"
    RESERVE = "reserve"
    CAPTURE = "capture"
    RELEASE = "release"


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    user_group: UserGroup
    created_at: datetime
    balance_units: int = 0
    reserved_units: int = 0
    # None: every model the account's group may use.
    allowed_models: tuple[str, ...] | None = None
    # None: the configured default of the account's group.
    requests_per_minute: int | None = None
    max_concurrent_tasks: int | None = None

    @property
    def balance(self) -> float:
        return to_credits(self.balance_units)

    @property
    def reserved(self) -> float:
        return to_credits(self.reserved_units)

    @property
    def available(self) -> float:
        return to_credits(self.balance_units - self.reserved_units)

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    account_id: str
    kind: EntryKind
    units: int
    created_at: datetime
    task_id: str | None = None
    note: str | None = None

    @property
    def credits(self) -> float:
        return to_credits(self.units)


@dataclass(frozen=True)
class GroupLimits:
    requests_per_minute: int
    max_concurrent_tasks: int


@dataclass(frozen=True)
class Limits:
    """Per-group defaults (an account may override each) and the server-wide cap."""

    default: GroupLimits = GroupLimits(requests_per_minute=60, max_concurrent_tasks=10)
    vip: GroupLimits = GroupLimits(requests_per_minute=600, max_concurrent_tasks=50)
    max_queued_tasks: int = 1000
    # A vip task is queued as if submitted this much earlier than it was: vip
    # goes first, and a default task waits at most this long behind vip tasks.
    vip_priority_seconds: float = 60.0

    def for_account(self, account: Account) -> GroupLimits:
        group = self.vip if account.user_group == "vip" else self.default
        return GroupLimits(
            requests_per_minute=account.requests_per_minute or group.requests_per_minute,
            max_concurrent_tasks=account.max_concurrent_tasks or group.max_concurrent_tasks,
        )


@dataclass(frozen=True)
class Admission:
    """What a new task must pass, checked in the transaction that creates it."""

    requests_per_minute: int
    max_concurrent_tasks: int
    max_queued_tasks: int
    idempotency_key: str | None = None
    fingerprint: str | None = None  # of the request body, for idempotent replays


@dataclass(frozen=True)
class Usage:
    account: Account
    tasks: dict[str, int]


class TooManyUnfinished(Exception):
    """The account has as many unfinished tasks as it may."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class QueueFull(Exception):
    """The server holds as many unfinished tasks as it may."""

    def __init__(self, unfinished: int, running: int, limit: int) -> None:
        super().__init__(unfinished, running, limit)
        self.unfinished = unfinished
        self.running = running
        self.limit = limit
