"""The SQLite backend: one file, WAL, one writer connection; the embedded default."""

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloud_sink.derive.rows import Row
from cloud_sink.model import Policy, StoreError
from cloud_sink.stores import migrations
from cloud_sink.stores.base import STORE_COLUMNS, SqlStore

_ROW = "(" + ",".join("?" * len(STORE_COLUMNS)) + ")"
_CHUNK = 400  # rows per INSERT: under SQLite's 32,766 variables


class SqliteStore(SqlStore):
    def __init__(self, path: str | Path, *, cut_hour: int | None = None,
                 policy: Policy | None = None) -> None:
        policy = policy or Policy()
        if cut_hour is not None and cut_hour != policy.cut_hour:
            policy = Policy(cut_hour, policy.max_future_ms, policy.max_past_ms,
                            policy.require_registered)
        super().__init__(policy)
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        try:
            # timeout: two sink processes on one file wait for each other's write transaction
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc} (check the path and "
                             "its permissions)") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA temp_store=MEMORY")  # the per-batch stage table
            self._migrate()
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS stage AS SELECT"
                             f" {', '.join(STORE_COLUMNS)} FROM touches WHERE 0")
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS resite (site TEXT PRIMARY KEY)")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise StoreError(f"the store {self.path} is locked by another process: {exc}"
                                 ) from exc
            raise StoreError(f"the store {self.path} is not a usable SQLite store ({exc}): "
                             "restore it from a backup or an export (`ccus sink import`), or "
                             "point --store at the right file") from exc

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for n, script in enumerate(migrations.SQLITE[version:], start=version + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    # another process may have migrated while we waited for the write lock
                    if self._db.execute("PRAGMA user_version").fetchone()[0] >= n:
                        self._db.execute("COMMIT")
                        continue
                    for stmt in migrations.statements(script):
                        self._db.execute(stmt)
                    self._db.execute(f"PRAGMA user_version={n}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _x(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def _load_stage(self, rows: list[Row]) -> None:
        # multi-row INSERTs, not executemany: sqlite3 releases the GIL around every step, and
        # each release hands the GIL to paho's network thread for a whole switch interval
        for i in range(0, len(rows), _CHUNK):
            chunk = rows[i:i + _CHUNK]
            self._db.execute(f"INSERT INTO stage VALUES {','.join([_ROW] * len(chunk))}",
                             [v for r in chunk for v in r])

    def close(self) -> None:
        with self._lock:
            self._db.close()
