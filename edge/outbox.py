"""The device outbox: touches made durable before anyone is told, each with its seq.

Rules of this file:

- SQLite in WAL mode with synchronous=FULL: append() returns only once the touch and the next
  seq are on disk (one transaction, committed). The caller answers the person after that.
- seq starts at 1, is persisted with the touch in the same transaction and never reused:
  deleting delivered rows never lowers it (it lives in the meta table, not in MAX(seq)).
- A touch is forgotten only by delete_upto(), called when the sink's end-to-end
  acknowledgement covers it (docs/delivery.md). A broker PUBACK deletes nothing.
- Disk full (SQLITE_FULL) never loses a tap silently. Policy, in order:
  1. a ballast file (``reserve_bytes``, made at start while there is room) is deleted and the
     write retried: touches stay durable for a while longer;
  2. still full: the touch goes to a bounded in-memory emergency ring *without* a seq (a seq
     handed out in memory could be reused after a power cut, and a reused seq is a silent
     loss at the sink). The ring is written, oldest first and before any newer touch, as soon
     as a write succeeds again, so seq order stays decision order;
  3. the ring is full: the touch is counted in ``lost`` and logged as an error.
  The caller (the agent) keeps deciding and answering in every case; ``disk_state()`` and the
  counters are reported in the state message.
"""

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (k, v) VALUES ('next_seq', 1);
"""

RESERVE_BYTES = 4 * 1024 * 1024       # ballast: ~20,000 touches of room once it is released
LOW_WATER_BYTES = 64 * 1024 * 1024    # below this free space the state says disk "low"
RING_MAX = 20_000                     # emergency ring: ~a busy gate's day, ~4 MB of memory

Build = Callable[[int], bytes]


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or "full" in str(exc).lower())


class Outbox:
    def __init__(self, path: str | Path, *, reserve_bytes: int = RESERVE_BYTES,
                 low_water_bytes: int = LOW_WATER_BYTES, ring_max: int = RING_MAX) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self.low_water_bytes = low_water_bytes
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # a small WAL: it is reused after each checkpoint, so the disk it takes stays bounded
        self._db.execute("PRAGMA wal_autocheckpoint=64")
        self._db.execute("PRAGMA journal_size_limit=1048576")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._ring: deque[tuple[Build, int]] = deque()
        self.ring_max = ring_max
        self.lost = 0                 # touches neither on disk nor in the ring (ring full)
        self.full_events = 0          # times a write met a full disk
        self.reserve_released = False
        self.reserve_bytes = reserve_bytes
        self._make_reserve(reserve_bytes)

    # -- disk-full machinery --------------------------------------------------------------
    def _make_reserve(self, size: int) -> None:
        if size <= 0 or self.reserve_path.exists():
            return
        try:
            if shutil.disk_usage(self.path.parent).free < 2 * size:
                log.warning("outbox: too little disk for a %d-byte reserve; running without", size)
                return
            with open(self.reserve_path, "wb") as f:
                f.write(b"\0" * size)  # real blocks, not a sparse file
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            log.warning("outbox: cannot make the disk reserve: %s", exc)
            self.reserve_path.unlink(missing_ok=True)

    def _release_reserve(self) -> bool:
        if not self.reserve_path.exists():
            return False
        self.reserve_path.unlink()
        self.reserve_released = True
        log.error("outbox: disk full: released the %s reserve; free disk space now",
                  self.reserve_path.name)
        return True

    def _write(self, build: Build, created_ms: int) -> int:
        """One durable append. Lock held. Raises sqlite3.Error (SQLITE_FULL included)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            (seq,) = self._db.execute("SELECT v FROM meta WHERE k='next_seq'").fetchone()
            payload = build(seq)
            self._db.execute("INSERT INTO outbox (seq, payload, created_ms) VALUES (?,?,?)",
                             (seq, payload, created_ms))
            self._db.execute("UPDATE meta SET v=? WHERE k='next_seq'", (seq + 1,))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back itself
                    self._db.execute("ROLLBACK")
            raise
        return int(seq)

    def _write_retrying(self, build: Build, created_ms: int) -> int | None:
        """A durable append; on a full disk first a WAL checkpoint (the WAL is then reused from
        its start), then the reserve is released. None: still full."""
        for attempt in range(3):
            try:
                return self._write(build, created_ms)
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise
                self.full_events += 1
                if attempt == 0:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("PRAGMA wal_checkpoint(RESTART)")
                elif not self._release_reserve():
                    return None
        return None

    def _flush_ring_locked(self) -> int:
        n = 0
        while self._ring:
            build, created_ms = self._ring[0]
            if self._write_retrying(build, created_ms) is None:
                break
            self._ring.popleft()
            n += 1
        if n:
            log.warning("outbox: wrote %d touch(es) from the emergency ring to disk (%d left)",
                        n, len(self._ring))
        return n

    # -- the API --------------------------------------------------------------------------
    def append(self, build: Build, created_ms: int) -> int | None:
        """Allocate the next seq, build the payload with it, store both atomically.

        Returns the seq once the touch is on disk, or None when the disk is full and the
        touch is held in the emergency ring (or, ring full, counted as lost).
        """
        with self._lock:
            if self._ring:
                self._flush_ring_locked()
            if not self._ring:
                seq = self._write_retrying(build, created_ms)
                if seq is not None:
                    return seq
            if len(self._ring) >= self.ring_max:
                self.lost += 1
                log.critical("outbox: disk full and emergency ring full (%d): touch LOST "
                             "(%d so far)", self.ring_max, self.lost)
                return None
            self._ring.append((build, created_ms))
            log.error("outbox: disk full: touch held in memory only (%d in the emergency ring)",
                      len(self._ring))
            return None

    def maintain(self) -> int:
        """Called periodically: write the emergency ring to disk when there is room again, and
        make the reserve again once the disk has recovered. Returns touches written."""
        n = 0
        if self._ring:
            with self._lock:
                n = self._flush_ring_locked()
        if self.reserve_released and not self._ring and \
                self.disk_free() > 2 * self.reserve_bytes + self.low_water_bytes:
            self._make_reserve(self.reserve_bytes)
            self.reserve_released = not self.reserve_path.exists()
            if not self.reserve_released:
                log.warning("outbox: disk has room again; reserve restored")
        return n

    def pending(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit)).fetchall()
        return [(int(s), bytes(p)) for s, p in rows]

    def delete_upto(self, seq: int) -> int:
        """Forget everything up to and including seq (end-to-end acknowledged)."""
        with self._lock:
            try:
                return self._db.execute("DELETE FROM outbox WHERE seq<=?", (seq,)).rowcount
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise
                self.full_events += 1
                if self._release_reserve():
                    return self._db.execute("DELETE FROM outbox WHERE seq<=?", (seq,)).rowcount
                log.error("outbox: disk full: cannot forget acknowledged touches yet")
                return 0

    def depth(self) -> int:
        """Touches not yet acknowledged end to end (on disk plus the emergency ring)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]) + len(self._ring)

    def oldest_ms(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(created_ms) FROM outbox").fetchone()
            ring = self._ring[0][1] if self._ring else None
        values = [v for v in (row[0], ring) if v is not None]
        return min(values) if values else None

    def next_seq(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT v FROM meta WHERE k='next_seq'").fetchone()[0])

    @property
    def ring_depth(self) -> int:
        return len(self._ring)

    def disk_free(self) -> int:
        try:
            return int(shutil.disk_usage(self.path.parent).free)
        except OSError:
            return -1

    def disk_state(self) -> str:
        """ok | low (under the low-water mark) | reserve (ballast spent) | full (ring in use)."""
        if self._ring or self.lost:
            return "full"
        if self.reserve_released:
            return "reserve"
        free = self.disk_free()
        return "low" if 0 <= free < self.low_water_bytes else "ok"

    def close(self) -> None:
        with self._lock:
            self._db.close()
