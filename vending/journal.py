"""Vend journal on SQLite (WAL, synchronous=FULL): the durable record of every reservation and its fate."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass

from . import transaction as tx
from .ledger import AllowanceKey, LimitReached, Usage

SCHEMA = """
CREATE TABLE IF NOT EXISTS vends (
    vend_id      INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the board compares ids
    technician   TEXT NOT NULL,
    scope        TEXT NOT NULL,
    period       TEXT NOT NULL,
    slot         INTEGER,
    state        TEXT NOT NULL,
    reason       TEXT,
    board_result INTEGER,
    created_ms   INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS vends_key ON vends (technician, scope, period, state);
CREATE INDEX IF NOT EXISTS vends_state ON vends (state);
CREATE TABLE IF NOT EXISTS vend_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    vend_id    INTEGER NOT NULL REFERENCES vends (vend_id),
    at_ms      INTEGER NOT NULL,
    event      TEXT NOT NULL,
    old_state  TEXT NOT NULL,
    new_state  TEXT NOT NULL,
    reason     TEXT
);
"""


@dataclass(frozen=True)
class VendRecord:
    vend_id: int
    technician: str
    scope: str
    period: str
    slot: int | None
    state: str
    reason: str | None
    board_result: int | None
    created_ms: int
    updated_ms: int

    @property
    def key(self) -> AllowanceKey:
        return AllowanceKey(self.technician, self.scope, self.period)


@dataclass(frozen=True)
class Applied:
    """What journal.apply() did: the transition and the record after it."""

    transition: tx.Transition
    record: VendRecord


class VendJournal:
    """SQLite journal of vend transactions. The vends table is the ledger: held and committed
    units are counted from row states, so ledger and journal can never disagree."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> VendJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pragma(self, name: str) -> object:
        return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    # ---------------------------------------------------------------- queries

    def get(self, vend_id: int) -> VendRecord:
        row = self._db.execute("SELECT * FROM vends WHERE vend_id = ?", (vend_id,)).fetchone()
        if row is None:
            raise KeyError(f"no vend {vend_id}")
        return VendRecord(*row)

    def usage(self, key: AllowanceKey) -> Usage:
        held, committed = self._db.execute(
            "SELECT"
            " COALESCE(SUM(state IN (?, ?, ?)), 0), COALESCE(SUM(state = ?), 0)"
            " FROM vends WHERE technician = ? AND scope = ? AND period = ?",
            (*tx.HELD, tx.COMMITTED, key.technician, key.scope, key.period),
        ).fetchone()
        return Usage(int(held), int(committed))

    def in_state(self, *states: str) -> list[VendRecord]:
        marks = ",".join("?" * len(states))
        rows = self._db.execute(
            f"SELECT * FROM vends WHERE state IN ({marks}) ORDER BY vend_id", states
        ).fetchall()
        return [VendRecord(*r) for r in rows]

    def billable(self, scope: str | None = None, period: str | None = None) -> list[VendRecord]:
        """Committed vends (the drinks the main contractor pays for)."""
        q = "SELECT * FROM vends WHERE state = ?"
        args: list[object] = [tx.COMMITTED]
        if scope is not None:
            q += " AND scope = ?"
            args.append(scope)
        if period is not None:
            q += " AND period = ?"
            args.append(period)
        rows = self._db.execute(q + " ORDER BY vend_id", args).fetchall()
        return [VendRecord(*r) for r in rows]

    def events(self, vend_id: int) -> list[tuple[str, str, str]]:
        """(event, old_state, new_state) in order."""
        return list(
            self._db.execute(
                "SELECT event, old_state, new_state FROM vend_events WHERE vend_id = ? ORDER BY id",
                (vend_id,),
            )
        )

    # ---------------------------------------------------------------- changes

    def reserve(self, key: AllowanceKey, limit: int, now_ms: int, slot: int | None = None) -> VendRecord:
        """Hold one unit of the allowance, durably, before any vend starts. Raises LimitReached."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                u = self.usage(key)
                if u.used >= limit:
                    raise LimitReached(key, u.used, limit)
                cur = self._db.execute(
                    "INSERT INTO vends (technician, scope, period, slot, state, created_ms,"
                    " updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key.technician, key.scope, key.period, slot, tx.RESERVED, now_ms, now_ms),
                )
                vend_id = int(cur.lastrowid or 0)
                self._db.execute(
                    "INSERT INTO vend_events (vend_id, at_ms, event, old_state, new_state)"
                    " VALUES (?, ?, 'reserve', '', ?)",
                    (vend_id, now_ms, tx.RESERVED),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(vend_id)

    def apply(
        self,
        vend_id: int,
        event: str,
        now_ms: int,
        reason: str | None = None,
        board_result: int | None = None,
        slot: int | None = None,
    ) -> Applied:
        """Apply one state-machine event durably. Raises InvalidTransition or KeyError."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rec = self.get(vend_id)
                t = tx.transition(rec.state, event)
                if not t.duplicate:
                    self._db.execute(
                        "UPDATE vends SET state = ?, updated_ms = ?,"
                        " reason = COALESCE(?, reason),"
                        " board_result = COALESCE(?, board_result),"
                        " slot = COALESCE(?, slot) WHERE vend_id = ?",
                        (t.new, now_ms, reason, board_result, slot, vend_id),
                    )
                self._db.execute(
                    "INSERT INTO vend_events (vend_id, at_ms, event, old_state, new_state, reason)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (vend_id, now_ms, event, t.old, t.new, reason),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Applied(t, self.get(vend_id))

    def recover(self, now_ms: int) -> list[Applied]:
        """On start: every open transaction went through a power loss. RESERVED ones were never
        sent (released); VENDING ones may have dispensed (indeterminate)."""
        out = []
        for rec in self.in_state(tx.RESERVED, tx.VENDING):
            out.append(self.apply(rec.vend_id, tx.POWER_LOSS, now_ms, reason="host restarted"))
        return out
