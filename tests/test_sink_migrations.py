"""A store written before the folded work history (SQLite 3, PostgreSQL 2) opens, migrates and
folds new touches into its old rows.

Real SQLite and real PostgreSQL (this module's own database, so its schema starts empty)."""

import sqlite3
from pathlib import Path

import psycopg
from sink_support import NOW, postgres_at, sqlite_at, touch

from cloud_sink.derive.rows import COLUMNS, touch_row
from cloud_sink.model import Policy
from cloud_sink.store import Store, open_store
from cloud_sink.stores import migrations
from cloud_sink.workday import jst_ms

DAY = "2026-11-26"
IN, OUT, LATE_IN = (jst_ms(2026, 11, 26, h) for h in (8, 17, 7))
_INSERT = f"INSERT INTO touches ({', '.join(COLUMNS)}) VALUES ({', '.join(['?'] * len(COLUMNS))})"


def _old_rows() -> tuple[tuple[object, ...], tuple[object, ...]]:
    """One stored entry and the work-history row the old sink derived from it."""
    t = touch(1, who=1, ts=IN, dir="in")
    return touch_row(t, NOW, Policy()), (t.tid, t.site, DAY, IN, None, 1)


def _fold_and_check(store: Store) -> None:
    # an exit, the stored entry again (a replay) and an earlier entry from another gate
    res = store.ingest([touch(1, who=1, ts=IN, dir="in"), touch(2, who=1, ts=OUT, dir="out"),
                        touch(1, device="gate-02", who=1, ts=LATE_IN, dir="in")], now_ms=NOW)
    assert (res.stored, res.repeated) == (2, 1)
    [day] = store.work_history()
    assert (day.work_day, day.first_in_ms, day.last_out_ms, day.taps) == (DAY, LATE_IN, OUT, 3)
    folded = store.table("work_history")
    store.rederive()
    assert store.table("work_history") == folded


def test_sqlite_store_at_schema_3_keeps_and_extends_its_work_history(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite"
    db = sqlite3.connect(path)
    sqlite_at(db, 3)
    touch_values, day = _old_rows()
    db.execute(_INSERT, touch_values)
    db.execute("INSERT INTO work_history VALUES (?,?,?,?,?,?)", day)
    db.commit()
    db.close()

    with open_store(path) as s:
        assert s.schema_version == len(migrations.SQLITE)
        _fold_and_check(s)
    db = sqlite3.connect(path)
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    db.close()
    assert "touches_work_history" not in indexes and "work_history_by_site" not in indexes


def test_postgres_store_at_schema_2_keeps_and_extends_its_work_history(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as db:
        postgres_at(db, 2)
        touch_values, day = _old_rows()
        db.execute(_INSERT.replace("?", "%s"), touch_values)  # type: ignore[arg-type]
        db.execute("INSERT INTO work_history VALUES (%s,%s,%s,%s,%s,%s)", day)

    with open_store(pg_url) as s:
        assert s.schema_version == len(migrations.POSTGRES)
        _fold_and_check(s)
    with psycopg.connect(pg_url) as db:
        indexes = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE tablename IN"
                                            " ('touches', 'work_history')")}
    assert "touches_work_history" not in indexes and "work_history_by_site" not in indexes
