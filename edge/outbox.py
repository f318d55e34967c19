"""The device outbox: touches made durable before anyone is told, each with its seq.

SQLite in WAL mode with synchronous=FULL: append() returns only once the touch and the next
seq are on disk. seq starts at 1, is persisted with the touch in one transaction and never
reused: deleting delivered rows never lowers it (it lives in the meta table, not in MAX(seq)).
"""

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (k, v) VALUES ('next_seq', 1);
"""


class Outbox:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def append(self, build: Callable[[int], bytes], created_ms: int) -> int:
        """Allocate the next seq, build the payload with it, store both atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (seq,) = self._db.execute("SELECT v FROM meta WHERE k='next_seq'").fetchone()
                payload = build(seq)
                self._db.execute("INSERT INTO outbox (seq, payload, created_ms) VALUES (?,?,?)",
                                 (seq, payload, created_ms))
                self._db.execute("UPDATE meta SET v=? WHERE k='next_seq'", (seq + 1,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(seq)

    def pending(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit)).fetchall()
        return [(int(s), bytes(p)) for s, p in rows]

    def delete(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))

    def delete_upto(self, seq: int) -> int:
        """Forget everything up to and including seq (end-to-end acknowledged)."""
        with self._lock:
            return self._db.execute("DELETE FROM outbox WHERE seq<=?", (seq,)).rowcount

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def oldest_ms(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(created_ms) FROM outbox").fetchone()
        return None if row[0] is None else int(row[0])

    def next_seq(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT v FROM meta WHERE k='next_seq'").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
