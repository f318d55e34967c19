"""PostgreSQL touches partitioned by month (migrations 6): a version 5 store migrates keeping every
touch, exactly once by (device, seq) across partitions, partitions made as months arrive, old
months detached (`ccus sink archive`). Real PostgreSQL: this module's own databases."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import PG_ADMIN_URL
from sink_support import NOW, SITE, derived, fresh_store, postgres_at, touch

from cloud_sink.derive.rows import touch_row
from cloud_sink.model import Policy, StoreError
from cloud_sink.registry import SiteRule
from cloud_sink.store import open_store
from cloud_sink.stores import migrations
from cloud_sink.stores.base import STORE_COLUMNS
from cloud_sink.workday import jst_ms
from protocol.touch import Touch

ROOT = Path(__file__).resolve().parents[1]
MAIN = "20000000000001"


def _month_touches() -> list[Touch]:
    """Gate entries and exits, training and vending touches over October..December 2026."""
    out: list[Touch] = []
    seq = 0
    for month, day in ((10, 5), (10, 31), (11, 26), (12, 1), (12, 24)):
        for who in range(1, 5):
            for hour, d in ((7, "in"), (18, "out")):
                seq += 1
                out.append(touch(seq, who=who, ts=jst_ms(2026, month, day, hour, who), dir=d))
        seq += 1
        out.append(touch(seq, device="train-01", site="27200000000001", role="training",
                         who=1, ts=jst_ms(2026, month, day, 10), facts={"course": "C1"}))
        seq += 1
        out.append(touch(seq, device="vend-01", role="vending", who=2,
                         ts=jst_ms(2026, month, day, 12),
                         facts={"contractor": MAIN, "slot": "A1", "result": "dispensed"}))
    return out


def _partitions(url: str) -> dict[str, str]:
    with psycopg.connect(url) as db:
        return dict(db.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'touches'::regclass"
            " ORDER BY 1").fetchall())


@pytest.fixture
def v5_url() -> Iterator[str]:
    """A database of its own at schema 5, empty."""
    name = f"ccus_test_v5_{__import__('uuid').uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
            with psycopg.connect(url, autocommit=True) as db:
                postgres_at(db, 5)
            yield url
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_statements_keep_a_function_body_whole() -> None:
    script = ("CREATE TABLE a (x INT);\nCREATE FUNCTION f() RETURNS int AS $$ BEGIN; RETURN 1;"
              " END $$;\nSELECT 1")
    assert migrations.statements(script) == [
        "CREATE TABLE a (x INT)", "CREATE FUNCTION f() RETURNS int AS $$ BEGIN; RETURN 1; END $$",
        "SELECT 1"]


def test_a_version_5_store_is_partitioned_by_month_keeping_every_touch_and_equals_a_rederive(
        v5_url: str, pg_url: str, tmp_path: Path) -> None:
    touches = _month_touches()
    rows = [touch_row(t, NOW, Policy()) + (4,) for t in touches]
    cols = ", ".join(STORE_COLUMNS)
    with psycopg.connect(v5_url, autocommit=True) as db:
        with db.cursor() as cur:
            cur.executemany(f"INSERT INTO touches ({cols}) VALUES"
                            f" ({', '.join(['%s'] * len(STORE_COLUMNS))})", rows)
        before = db.execute(f"SELECT {cols} FROM touches ORDER BY device, seq").fetchall()
    with open_store(v5_url) as s:
        assert s.schema_version == len(migrations.POSTGRES) == 7
        with psycopg.connect(v5_url) as db:
            assert db.execute(f"SELECT {cols} FROM touches ORDER BY device, seq"
                              ).fetchall() == before
        s.rederive()
        migrated = derived(s)
    with psycopg.connect(v5_url) as db:
        assert db.execute("SELECT relkind FROM pg_class WHERE relname='touches'").fetchone() == ("p",)
        assert db.execute("SELECT count(*) FROM touch_keys").fetchone() == (len(touches),)
        assert db.execute("SELECT to_regclass('touches_5')").fetchone() == (None,)
    parts = _partitions(v5_url)
    for m in ("2026_10", "2026_11", "2026_12", "2027_01"):      # each month, and the next ahead
        assert parts[f"touches_{m}"] == f"FOR VALUES IN ('{m.replace('_', '-')}')"
    # the same touches ingested by a sink into a store made at schema 6: the same derived rows
    with fresh_store("postgres", tmp_path, pg_url) as ref:
        ref.ingest(touches, now_ms=NOW)
        assert derived(ref) == migrated
    assert migrated["work_history"] and migrated["training_monthly"] and migrated["vending_ledger"]


def test_a_repeat_whose_content_falls_in_another_month_counts_once(pg_url: str,
                                                                   tmp_path: Path) -> None:
    """The partition key (month) comes from the touch's clock and its site's rules, so it is not
    the same on every resend: the key table, not the partitioned table's key, keeps it once."""
    with fresh_store("postgres", tmp_path, pg_url) as s:
        first = touch(1, ts=jst_ms(2026, 11, 30, 20))
        again = touch(1, ts=jst_ms(2026, 12, 1, 9))           # same (device, seq), December
        assert s.ingest([first], now_ms=NOW).stored == 1
        res = s.ingest([again], now_ms=NOW)
        assert (res.stored, res.repeated) == (0, 1)
        assert s.counts()["touches"] == 1
        assert [(r.work_day, r.taps) for r in s.work_history()] == [("2026-11-30", 1)]
        # what the key table guards against: the partitioned table's own key (device, seq,
        # month) refuses a copy in the same month but takes one in another month
        others = [c for c in STORE_COLUMNS if c not in ("work_day", "month")]
        copy = (f"INSERT INTO touches ({', '.join(others)}, work_day, month) SELECT"
                f" {', '.join(others)}, %s, %s FROM touches WHERE device='gate-01' AND seq=1")
        with psycopg.connect(pg_url) as db:
            with pytest.raises(psycopg.errors.UniqueViolation):
                db.execute(copy, ("2026-11-30", "2026-11"))
            db.rollback()
            assert db.execute(copy, ("2026-12-01", "2026-12")).rowcount == 1
            db.rollback()


def _ccus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccus.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60)


def test_old_months_are_archived_and_their_keys_still_count(pg_url: str, tmp_path: Path) -> None:
    touches = _month_touches()
    with fresh_store("postgres", tmp_path, pg_url) as s:
        s.ingest(touches, now_ms=NOW)
        acks = {d: s.device_prefix(d) for d in ("gate-01", "train-01", "vend-01")}
        wh = s.work_history()
        bad = _ccus("sink", "archive", "--store", pg_url, "--before", "2026-13")
        assert bad.returncode == 2 and "YYYY-MM" in bad.stderr
        done = _ccus("sink", "archive", "--store", pg_url, "--before", "2026-12")
        assert done.returncode == 0, done.stderr
        assert "detached archived_touches_2026_10" in done.stdout
        assert "detached archived_touches_2026_11" in done.stdout
        parts = _partitions(pg_url)
        assert "touches_2026_10" not in parts and "touches_2026_11" not in parts
        assert {"touches_2026_12", "touches_2027_01"} <= set(parts)
        december = sum(1 for t in touches if t.ts_ms >= jst_ms(2026, 12, 1, 4))
        assert s.counts()["touches"] == december
        # a late resend of an archived touch is a repeat; acknowledgements do not move back
        assert s.ingest(touches[:3], now_ms=NOW).repeated == 3
        assert {d: s.device_prefix(d) for d in acks} == acks
        assert s.work_history() == wh                    # derived rows stay
        with pytest.raises(StoreError, match="2026-10, 2026-11 are archived"):
            s.rederive()
        # a new touch of an archived month gets a fresh partition of that month
        assert s.ingest([touch(999, ts=jst_ms(2026, 10, 6, 8))], now_ms=NOW).stored == 1
        assert "touches_2026_10" in _partitions(pg_url)
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT count(*) FROM archived_touches_2026_10").fetchone()[0] > 0
        assert [r[0] for r in db.execute("SELECT tbl FROM touch_archive ORDER BY 1")] == [
            "archived_touches_2026_10", "archived_touches_2026_11"]


def test_archive_on_sqlite_is_a_clear_error(tmp_path: Path) -> None:
    open_store(tmp_path / "s.sqlite").close()
    r = _ccus("sink", "archive", "--store", str(tmp_path / "s.sqlite"), "--before", "2026-12")
    assert r.returncode == 2 and "only a PostgreSQL store" in r.stderr and "Traceback" not in r.stderr


def test_a_registry_change_that_moves_a_touch_into_a_month_without_partition(
        pg_url: str, tmp_path: Path) -> None:
    """March 1st 05:00 is March under the 04:00 cut; a 06:00 cut moves it to February 28, a
    month no batch has made a partition for yet (a month's partition comes with the next one's
    only)."""
    with fresh_store("postgres", tmp_path, pg_url) as s:
        s.ingest([touch(1, ts=jst_ms(2026, 3, 1, 5))], now_ms=NOW)
        assert "touches_2026_02" not in _partitions(pg_url)
        s.import_sites([SiteRule(SITE, "現場", "site", "東京都", MAIN, 6, "2026-01-01")])
        assert [r.work_day for r in s.work_history()] == ["2026-02-28"]
        assert "touches_2026_02" in _partitions(pg_url)


def test_two_sinks_meeting_the_same_new_months_at_once_make_each_partition_once(
        pg_url: str, tmp_path: Path) -> None:
    """Both writers' batches open months nobody stored yet (January..June 2026, one batch a
    month): the partition maker's lock lets one make it, the other finds it made."""
    import threading

    months = [(2026, m) for m in range(1, 7)]
    batches = [[touch(m * 100 + i, who=i % 5 + 1, ts=jst_ms(y, m, 10, 8, i)) for i in range(40)]
               for y, m in months]
    errors: list[BaseException] = []
    with fresh_store("postgres", tmp_path, pg_url) as a, open_store(pg_url) as b:
        start = threading.Barrier(2)

        def write(store: object, order: list[list[Touch]]) -> None:
            try:
                start.wait()
                for batch in order:
                    store.ingest(batch, now_ms=NOW)  # type: ignore[attr-defined]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(a, batches)),
                   threading.Thread(target=write, args=(b, batches[::-1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert a.counts()["touches"] == 240
        assert sum(r[5] for r in a.table("work_history")) == 240
    parts = _partitions(pg_url)
    assert all(f"touches_2026_{m:02d}" in parts for m in range(1, 8))
