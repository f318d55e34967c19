"""The work-history store on SQLite: touches inserted-or-ignored on (device, seq), dead letters,
and the work-history table derived incrementally in the same transaction as the touches.

Derivation is a recomputation per (technician, site, work day) from the stored touches, so
running it again, or after a replay, gives the same rows: nothing doubles.
"""

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cloud_sink.workday import work_day
from edge.touch import Touch

MIGRATIONS = [
    # 1: touches, dead letters, work history
    """
    CREATE TABLE touches (
        device TEXT NOT NULL, seq INTEGER NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
        ts_ms INTEGER NOT NULL, tq TEXT NOT NULL, card BLOB NOT NULL, card_tech TEXT NOT NULL,
        tid TEXT, decision TEXT NOT NULL, reason TEXT NOT NULL, lv INTEGER NOT NULL,
        cv INTEGER NOT NULL, facts TEXT NOT NULL, dir TEXT, work_day TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    CREATE INDEX touches_by_person ON touches (tid, site, work_day);
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY, received_ms INTEGER NOT NULL, topic TEXT NOT NULL,
        payload BLOB NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL
    );
    CREATE TABLE work_history (
        tid TEXT NOT NULL, site TEXT NOT NULL, work_day TEXT NOT NULL,
        first_in_ms INTEGER, last_out_ms INTEGER, taps INTEGER NOT NULL,
        PRIMARY KEY (tid, site, work_day)
    ) WITHOUT ROWID;
    """,
]


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str
    detail: str


@dataclass(frozen=True)
class WorkDay:
    tid: str
    site: str
    work_day: str
    first_in_ms: int | None
    last_out_ms: int | None
    taps: int

    @property
    def exit_missing(self) -> bool:
        return self.last_out_ms is None

    @property
    def entry_missing(self) -> bool:
        return self.first_in_ms is None


@dataclass
class IngestResult:
    stored: int = 0      # new touches
    repeated: int = 0    # already stored (a replay): ignored
    dead: int = 0


class SqliteStore:
    def __init__(self, path: str | Path, *, cut_hour: int = 4) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.cut_hour = cut_hour
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for n, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                self._db.execute("BEGIN IMMEDIATE")
                for stmt in filter(str.strip, sql.split(";")):
                    self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version={n}")
                self._db.execute("COMMIT")

    def ingest(self, touches: Iterable[Touch], dead: Iterable[DeadLetter] = ()) -> IngestResult:
        """Store a batch in one transaction: touches, dead letters, derived rows. Then commit."""
        now = int(time.time() * 1000)
        res = IngestResult()
        affected: set[tuple[str, str, str]] = set()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for t in touches:
                    day = work_day(t.ts_ms, self.cut_hour)
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO touches VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (t.device, t.seq, t.site, t.role.value, t.ts_ms, t.tq.value, t.card,
                         t.card_tech.value, t.tid, t.decision.value, t.reason.value,
                         t.list_version, t.config_version, json.dumps(t.facts, sort_keys=True),
                         t.facts.get("dir") if t.role.value == "gate" else None, day, now))
                    if cur.rowcount:
                        res.stored += 1
                        if t.role.value == "gate" and t.tid and t.decision.value == "allow":
                            affected.add((t.tid, t.site, day))
                    else:
                        res.repeated += 1
                for d in dead:
                    self._db.execute(
                        "INSERT INTO dead_letters (received_ms, topic, payload, reason, detail) "
                        "VALUES (?,?,?,?,?)", (now, d.topic, d.payload, d.reason, d.detail))
                    res.dead += 1
                for key in affected:
                    self._derive(*key)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return res

    def _derive(self, tid: str, site: str, day: str) -> None:
        first_in, last_out, taps = self._db.execute(
            "SELECT MIN(CASE WHEN dir='in' THEN ts_ms END), MAX(CASE WHEN dir='out' THEN ts_ms END),"
            " COUNT(*) FROM touches WHERE tid=? AND site=? AND work_day=? AND role='gate'"
            " AND decision='allow'", (tid, site, day)).fetchone()
        self._db.execute("INSERT OR REPLACE INTO work_history VALUES (?,?,?,?,?,?)",
                         (tid, site, day, first_in, last_out, taps))

    def rederive(self) -> int:
        """Recompute the whole work-history table from the touches (idempotent)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM work_history")
            keys = self._db.execute(
                "SELECT DISTINCT tid, site, work_day FROM touches WHERE role='gate'"
                " AND decision='allow' AND tid IS NOT NULL").fetchall()
            for key in keys:
                self._derive(*key)
            self._db.execute("COMMIT")
        return len(keys)

    # -- reading --------------------------------------------------------------------------
    def work_history(self, site: str | None = None) -> list[WorkDay]:
        sql = "SELECT tid, site, work_day, first_in_ms, last_out_ms, taps FROM work_history"
        args: tuple[str, ...] = ()
        if site:
            sql, args = sql + " WHERE site=?", (site,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY site, work_day, tid", args).fetchall()
        return [WorkDay(*r) for r in rows]

    def dead_letters(self, limit: int = 100) -> list[tuple[int, int, str, str, str, bytes]]:
        with self._lock:
            return self._db.execute(
                "SELECT id, received_ms, topic, reason, detail, payload FROM dead_letters"
                " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()

    def counts(self) -> dict[str, int]:
        with self._lock:
            total, allowed = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(decision='allow'),0) FROM touches").fetchone()
            dead = self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        return {"touches": total, "allowed": allowed, "denied": total - allowed, "dead_letters": dead}

    def close(self) -> None:
        with self._lock:
            self._db.close()
