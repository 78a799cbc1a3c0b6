"""Accounts and the credits ledger in the store.

Every change of credits is an entry in `ledger_entries` written in the same
transaction as the running totals on the account row (and, for tasks, as the
task's own state change), so the two can never disagree unless something
outside Retouch edits the database; `check_ledger` proves they do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    and_,
    case,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from retouch.accounts import (
    DEFAULT_CREDITS,
    MAX_ACCOUNT_LIMIT,
    MAX_BALANCE_UNITS,
    MAX_NAME_LENGTH,
    MAX_NOTE_LENGTH,
    Account,
    EntryKind,
    LedgerEntry,
    Usage,
    UserGroup,
    check_text,
    new_account_id,
    to_credits,
    to_units,
)
from retouch.errors import ConflictError, InvalidRequestError, NotFoundError
from retouch.store.base import StoreBase
from retouch.store.rows import account_from_row
from retouch.store.schema import accounts, ledger_entries, tasks
from retouch.tasks import TaskStatus

_TERMINAL = [status.value for status in TaskStatus if status.is_terminal]
_CLOSING = [EntryKind.CAPTURE.value, EntryKind.RELEASE.value]
_UNSET: Any = object()


def settle(conn: Connection, task_id: str, produced: int, now: datetime) -> None:
    """Close a task's reservation in its finalize transaction: capture the price of
    the images produced (the rest of the reservation returns to the account), or
    release it all when nothing was produced."""
    row = conn.execute(
        select(ledger_entries.c.account_id, ledger_entries.c.units, tasks.c.params)
        .join(tasks, tasks.c.id == ledger_entries.c.task_id)
        .where(
            ledger_entries.c.task_id == task_id,
            ledger_entries.c.kind == EntryKind.RESERVE.value,
        )
    ).one()
    ordered = max(1, int(row.params.get("n") or 1))
    captured = row.units * min(produced, ordered) // ordered
    kind = EntryKind.CAPTURE if captured > 0 else EntryKind.RELEASE
    conn.execute(
        insert(ledger_entries).values(
            account_id=row.account_id,
            task_id=task_id,
            kind=kind.value,
            units=captured if kind is EntryKind.CAPTURE else row.units,
            created_at=now,
        )
    )
    conn.execute(
        update(accounts)
        .where(accounts.c.id == row.account_id)
        .values(
            balance_units=accounts.c.balance_units - captured,
            reserved_units=accounts.c.reserved_units - row.units,
        )
    )


def reserve(conn: Connection, account_id: str, task_id: str, units: int, now: datetime) -> None:
    """Hold credits for a new task (the caller has locked the account and checked
    that they are available)."""
    conn.execute(
        insert(ledger_entries).values(
            account_id=account_id,
            task_id=task_id,
            kind=EntryKind.RESERVE.value,
            units=units,
            created_at=now,
        )
    )
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(reserved_units=accounts.c.reserved_units + units)
    )


def create_account_row(
    conn: Connection,
    name: str,
    user_group: UserGroup,
    credits: float,
    now: datetime,
    note: str | None = None,
) -> Account:
    check_text(name, "name", MAX_NAME_LENGTH)
    taken = conn.execute(select(accounts.c.id).where(accounts.c.name == name)).first()
    if taken is not None:
        raise ConflictError(
            f"An account named {name!r} already exists ({taken.id})",
            param="name",
            fallback_suggestion="choose another name, or name this account to add a key to it",
        )
    units = _credit_units(credits)
    if units < 0:
        raise InvalidRequestError(
            "A new account cannot start with negative credits", param="credits"
        )
    account = Account(id=new_account_id(), name=name, user_group=user_group, created_at=now)
    conn.execute(
        insert(accounts).values(
            id=account.id,
            name=name,
            user_group=user_group,
            balance_units=0,
            reserved_units=0,
            created_at=now,
        )
    )
    _grant(conn, account.id, units, now, note or "starting credits")
    return account_from_row(conn.execute(select(accounts).where(accounts.c.id == account.id)).one())


def _grant(conn: Connection, account_id: str, units: int, now: datetime, note: str | None) -> None:
    if note is not None:
        check_text(note, "note", MAX_NOTE_LENGTH)
    if units == 0:
        return
    conn.execute(
        insert(ledger_entries).values(
            account_id=account_id,
            kind=EntryKind.GRANT.value,
            units=units,
            note=note,
            created_at=now,
        )
    )
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(balance_units=accounts.c.balance_units + units)
    )


def _credit_units(credits: float) -> int:
    try:
        return to_units(credits)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="credits") from None


def find_account(conn: Connection, ref: str, *, lock: bool = False) -> Any:
    """An account row by id or by name."""
    # No account is named with a NUL (names are printable), which PostgreSQL could
    # not even compare: unknown here as on SQLite.
    rows: Sequence[Row[Any]] = ()
    if "\x00" not in ref:
        query = select(accounts).where(or_(accounts.c.id == ref, accounts.c.name == ref))
        if lock:
            query = query.with_for_update()
        rows = conn.execute(query).all()
    if not rows:
        raise NotFoundError(f"No account found with id or name {ref!r}", param="account")
    # An id always wins over a name that happens to look like one.
    return next((row for row in rows if row.id == ref), rows[0])


@dataclass(frozen=True)
class MetricsSnapshot:
    """What `/metrics` reads from the database."""

    tasks_by_status: dict[str, int]
    oldest_pending_seconds: float
    credits_by_kind: dict[str, float]
    held: float


class AccountStore(StoreBase):
    """Accounts, grants, and the ledger's invariants."""

    def create_account(
        self,
        name: str,
        user_group: UserGroup = "default",
        credits: float = DEFAULT_CREDITS,
        note: str | None = None,
    ) -> Account:
        try:
            with self._write() as conn:
                return create_account_row(conn, name, user_group, credits, self.clock.now(), note)
        except IntegrityError:
            raise ConflictError(f"An account named {name!r} already exists", param="name") from None

    def get_account(self, ref: str) -> Account:
        """By id or by name; NotFoundError otherwise."""
        with self._read() as conn:
            return account_from_row(find_account(conn, ref))

    def list_accounts(self) -> list[Account]:
        with self._read() as conn:
            rows = conn.execute(select(accounts).order_by(accounts.c.created_at)).all()
        return [account_from_row(row) for row in rows]

    def update_account(
        self,
        ref: str,
        *,
        user_group: UserGroup | None = None,
        allowed_models: Sequence[str] | None = _UNSET,
        requests_per_minute: int | None = _UNSET,
        max_concurrent_tasks: int | None = _UNSET,
    ) -> Account:
        """Change an account's group, models or limits; `None` for the last three
        means "back to the default" (every model; the group's limits)."""
        values: dict[str, Any] = {}
        if user_group is not None:
            values["user_group"] = user_group
        if allowed_models is not _UNSET:
            values["allowed_models"] = None if allowed_models is None else list(allowed_models)
        for name, limit in (
            ("requests_per_minute", requests_per_minute),
            ("max_concurrent_tasks", max_concurrent_tasks),
        ):
            if limit is _UNSET:
                continue
            if limit is not None and not 1 <= limit <= MAX_ACCOUNT_LIMIT:
                raise InvalidRequestError(
                    f"`{name}` must be from 1 to {MAX_ACCOUNT_LIMIT}, not {limit}", param=name
                )
            values[name] = limit
        with self._write() as conn:
            row = find_account(conn, ref, lock=True)
            if values:
                conn.execute(update(accounts).where(accounts.c.id == row.id).values(**values))
            return account_from_row(
                conn.execute(select(accounts).where(accounts.c.id == row.id)).one()
            )

    def grant(self, ref: str, credits: float, note: str | None = None) -> Account:
        """Add credits to an account (or take them back with a negative amount, down
        to what is neither spent nor held for unfinished tasks)."""
        units = _credit_units(credits)
        with self._write() as conn:
            row = find_account(conn, ref, lock=True)
            available = row.balance_units - row.reserved_units
            if row.balance_units + units > MAX_BALANCE_UNITS:
                raise InvalidRequestError(
                    f"Cannot grant {credits} credits to {row.name!r}: the balance would "
                    "exceed what the ledger holds",
                    param="credits",
                )
            if units < 0 and -units > available:
                raise InvalidRequestError(
                    f"Cannot take {to_credits(-units)} credits from {row.name!r}: "
                    f"only {to_credits(available)} are available",
                    param="credits",
                )
            _grant(conn, row.id, units, self.clock.now(), note)
            return account_from_row(
                conn.execute(select(accounts).where(accounts.c.id == row.id)).one()
            )

    def ledger(self, ref: str, limit: int = 100) -> list[LedgerEntry]:
        """An account's newest entries first."""
        with self._read() as conn:
            account = find_account(conn, ref)
            rows = conn.execute(
                select(ledger_entries)
                .where(ledger_entries.c.account_id == account.id)
                .order_by(ledger_entries.c.id.desc())
                .limit(limit)
            ).all()
        return [
            LedgerEntry(
                id=row.id,
                account_id=row.account_id,
                kind=EntryKind(row.kind),
                units=row.units,
                created_at=row.created_at,
                task_id=row.task_id,
                note=row.note,
            )
            for row in rows
        ]

    def usage(self, account_id: str) -> Usage:
        with self._read() as conn:
            account = account_from_row(find_account(conn, account_id))
            counts = conn.execute(
                select(tasks.c.status, func.count())
                .where(tasks.c.account_id == account_id)
                .group_by(tasks.c.status)
            ).all()
        by_status = {status.value: 0 for status in TaskStatus}
        by_status.update({status: int(count) for status, count in counts})
        return Usage(account=account, tasks=by_status)

    def metrics_snapshot(self) -> MetricsSnapshot:
        with self._read() as conn:
            counts: dict[str, int] = dict(
                conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status)).all()
            )
            oldest = conn.execute(
                select(func.min(tasks.c.created_at)).where(
                    tasks.c.status == TaskStatus.PENDING.value
                )
            ).scalar_one_or_none()
            sums: dict[str, int] = dict(
                conn.execute(
                    select(ledger_entries.c.kind, func.sum(ledger_entries.c.units)).group_by(
                        ledger_entries.c.kind
                    )
                ).all()
            )
            held = conn.execute(select(func.sum(accounts.c.reserved_units))).scalar_one_or_none()
        if isinstance(oldest, str):  # SQLite's MIN() hands back the stored text
            oldest = datetime.fromisoformat(oldest).replace(tzinfo=UTC)
        age = (self.clock.now() - oldest).total_seconds() if oldest is not None else 0.0
        return MetricsSnapshot(
            tasks_by_status={s.value: int(counts.get(s.value, 0)) for s in TaskStatus},
            oldest_pending_seconds=max(0.0, age),
            credits_by_kind={k.value: to_credits(int(sums.get(k.value) or 0)) for k in EntryKind},
            held=to_credits(int(held or 0)),
        )

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self._read() as conn:
            conn.execute(select(literal(1))).scalar_one()

    def check_ledger(self, limit: int = 50) -> list[str]:
        """Every violation of the ledger's invariants (at most `limit` of each kind)."""
        with self._read() as conn:
            return self._account_problems(conn, limit) + self._task_problems(conn, limit)

    def _account_problems(self, conn: Connection, limit: int) -> list[str]:
        entry = ledger_entries.alias("entry")
        closing = ledger_entries.alias("closing")
        derived_balance = (
            select(
                func.coalesce(
                    func.sum(
                        case(
                            (entry.c.kind == EntryKind.GRANT.value, entry.c.units),
                            (entry.c.kind == EntryKind.CAPTURE.value, -entry.c.units),
                            else_=0,
                        )
                    ),
                    0,
                )
            )
            .where(entry.c.account_id == accounts.c.id)
            .scalar_subquery()
        )
        derived_reserved = (
            select(func.coalesce(func.sum(entry.c.units), 0))
            .where(
                entry.c.account_id == accounts.c.id,
                entry.c.kind == EntryKind.RESERVE.value,
                ~exists().where(closing.c.task_id == entry.c.task_id, closing.c.kind.in_(_CLOSING)),
            )
            .scalar_subquery()
        )
        rows = conn.execute(
            select(
                accounts.c.id,
                accounts.c.balance_units,
                accounts.c.reserved_units,
                derived_balance.label("derived_balance"),
                derived_reserved.label("derived_reserved"),
            )
            .where(
                or_(
                    accounts.c.balance_units != derived_balance,
                    accounts.c.reserved_units != derived_reserved,
                    accounts.c.reserved_units < 0,
                    accounts.c.balance_units < accounts.c.reserved_units,
                )
            )
            .limit(limit)
        ).all()
        problems = []
        for row in rows:
            if row.balance_units != row.derived_balance:
                problems.append(
                    f"account {row.id}: balance {to_credits(row.balance_units)} but its entries "
                    f"sum to {to_credits(int(row.derived_balance))}"
                )
            if row.reserved_units != row.derived_reserved:
                problems.append(
                    f"account {row.id}: {to_credits(row.reserved_units)} credits reserved but its "
                    f"open reservations sum to {to_credits(int(row.derived_reserved))}"
                )
            if row.reserved_units < 0 or row.balance_units < row.reserved_units:
                problems.append(
                    f"account {row.id}: negative available credits (balance "
                    f"{to_credits(row.balance_units)}, reserved {to_credits(row.reserved_units)})"
                )
        misplaced = conn.execute(
            select(ledger_entries.c.id, ledger_entries.c.kind)
            .where(
                or_(
                    and_(
                        ledger_entries.c.kind == EntryKind.GRANT.value,
                        ledger_entries.c.task_id.is_not(None),
                    ),
                    and_(
                        ledger_entries.c.kind != EntryKind.GRANT.value,
                        or_(ledger_entries.c.task_id.is_(None), ledger_entries.c.units < 0),
                    ),
                    ledger_entries.c.kind.not_in([kind.value for kind in EntryKind]),
                )
            )
            .limit(limit)
        ).all()
        problems += [f"ledger entry {row.id}: malformed {row.kind} entry" for row in misplaced]
        return problems

    def _task_problems(self, conn: Connection, limit: int) -> list[str]:
        def count(kind: EntryKind) -> Any:
            return func.coalesce(
                func.sum(case((ledger_entries.c.kind == kind.value, 1), else_=0)), 0
            )

        def units(kind: EntryKind) -> Any:
            return func.coalesce(
                func.sum(
                    case((ledger_entries.c.kind == kind.value, ledger_entries.c.units), else_=0)
                ),
                0,
            )

        reserves, captures, releases = (
            count(EntryKind.RESERVE),
            count(EntryKind.CAPTURE),
            count(EntryKind.RELEASE),
        )
        reserved, captured = units(EntryKind.RESERVE), units(EntryKind.CAPTURE)
        other_account = func.coalesce(
            func.sum(case((ledger_entries.c.account_id != tasks.c.account_id, 1), else_=0)), 0
        )
        terminal = tasks.c.status.in_(_TERMINAL)
        expected = func.round(tasks.c.credits_reserved * 1000)
        rows = conn.execute(
            select(
                tasks.c.id,
                tasks.c.status,
                tasks.c.credits_reserved,
                reserves.label("reserves"),
                captures.label("captures"),
                releases.label("releases"),
                reserved.label("reserved"),
                captured.label("captured"),
                other_account.label("other_account"),
            )
            .select_from(tasks.outerjoin(ledger_entries, ledger_entries.c.task_id == tasks.c.id))
            .group_by(tasks.c.id, tasks.c.status, tasks.c.credits_reserved)
            .having(
                or_(
                    reserves != 1,
                    and_(terminal, captures + releases != 1),
                    and_(~terminal, captures + releases != 0),
                    captured > reserved,
                    reserved != expected,
                    other_account != 0,
                )
            )
            .limit(limit)
        ).all()
        problems = []
        for row in rows:
            closing = row.captures + row.releases
            if row.reserves != 1:
                problems.append(f"task {row.id} ({row.status}): {row.reserves} reservations")
            if row.status in _TERMINAL and closing != 1:
                problems.append(
                    f"task {row.id} ({row.status}): {row.captures} captures and "
                    f"{row.releases} releases (exactly one expected)"
                )
            if row.status not in _TERMINAL and closing != 0:
                problems.append(f"task {row.id} ({row.status}): settled before it finished")
            if row.captured > row.reserved:
                problems.append(f"task {row.id}: captured more than it reserved")
            if row.reserved != round(row.credits_reserved * 1000):
                problems.append(
                    f"task {row.id}: reserved {to_credits(row.reserved)} credits but shows "
                    f"{row.credits_reserved}"
                )
            if row.other_account:
                problems.append(f"task {row.id}: entries on another account than the task's")
        return problems
