"""Allowance ledger core (pure, in memory): reserve, commit, release per technician per scope per period."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import VendingError
from .transaction import COMMITTED, HELD, RELEASED


@dataclass(frozen=True)
class AllowanceKey:
    """Whose allowance: a technician (14-digit ID), a scope ('machine:VM01' or 'site:...'), a period."""

    technician: str
    scope: str
    period: str


class LimitReached(VendingError):
    """No allowance left in this period."""

    def __init__(self, key: AllowanceKey, used: int, limit: int) -> None:
        super().__init__(
            f"limit reached: {key.technician} has used {used} of {limit} in {key.scope} {key.period}"
        )
        self.key = key
        self.used = used
        self.limit = limit


class LedgerError(VendingError):
    pass


@dataclass
class Usage:
    held: int = 0
    committed: int = 0

    @property
    def used(self) -> int:
        return self.held + self.committed


@dataclass
class Ledger:
    """In-memory ledger: each vend id holds one unit of one key until it is committed or released."""

    _vends: dict[int, tuple[AllowanceKey, str]] = field(default_factory=dict)
    _usage: dict[AllowanceKey, Usage] = field(default_factory=dict)

    def usage(self, key: AllowanceKey) -> Usage:
        u = self._usage.get(key, Usage())
        return Usage(u.held, u.committed)

    def reserve(self, key: AllowanceKey, vend_id: int, limit: int) -> None:
        if vend_id in self._vends:
            raise LedgerError(f"vend {vend_id} already reserved")
        u = self._usage.setdefault(key, Usage())
        if u.used >= limit:
            raise LimitReached(key, u.used, limit)
        u.held += 1
        self._vends[vend_id] = (key, HELD[0])

    def state(self, vend_id: int) -> str | None:
        v = self._vends.get(vend_id)
        return v[1] if v else None

    def commit(self, vend_id: int) -> bool:
        """Held -> committed. Returns False (and changes nothing) if already committed."""
        key, st = self._get(vend_id)
        if st == COMMITTED:
            return False
        if st == RELEASED:
            raise LedgerError(f"vend {vend_id} was released; cannot commit")
        u = self._usage[key]
        u.held -= 1
        u.committed += 1
        self._vends[vend_id] = (key, COMMITTED)
        return True

    def release(self, vend_id: int) -> bool:
        """Held -> released. Returns False if already released."""
        key, st = self._get(vend_id)
        if st == RELEASED:
            return False
        if st == COMMITTED:
            raise LedgerError(f"vend {vend_id} was committed; cannot release")
        self._usage[key].held -= 1
        self._vends[vend_id] = (key, RELEASED)
        return True

    def _get(self, vend_id: int) -> tuple[AllowanceKey, str]:
        v = self._vends.get(vend_id)
        if v is None:
            raise LedgerError(f"unknown vend {vend_id}")
        return v
