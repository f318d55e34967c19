"""The store on both backends, real SQLite and real PostgreSQL: ingest, derivation, bad input, migrations."""

import sqlite3
from pathlib import Path

import pytest
from sink_support import CENTER, NOW, SITE, SITE2, derived, fresh_store, tid, touch

from cloud_sink.model import DAY_MS, Course, DeadLetter, Device, Policy
from cloud_sink.store import Store, open_store
from cloud_sink.stores import migrations
from cloud_sink.workday import jst_ms
from protocol.touch import Touch


def test_work_history_first_in_last_out_taps_and_missing_exit(store: Store) -> None:
    at = lambda h, m=0: jst_ms(2026, 11, 26, h, m)  # noqa: E731
    res = store.ingest([
        touch(1, who=1, ts=at(7, 30)), touch(2, who=1, ts=at(12), dir="out"),
        touch(3, who=1, ts=at(13)), touch(4, who=1, ts=at(17, 5), dir="out"),
        touch(5, who=2, ts=at(7, 40)),                          # never taps out
        touch(6, who=3, ts=at(7, 50), decision="deny"),          # denied: not work history
        touch(7, who=None, ts=at(7, 55)),                        # no technician: not either
    ], now_ms=NOW)
    assert (res.stored, res.repeated, res.dead) == (7, 0, 0)
    rows = {r.tid: r for r in store.work_history()}
    assert set(rows) == {tid(1), tid(2)}
    assert (rows[tid(1)].first_in_ms, rows[tid(1)].last_out_ms, rows[tid(1)].taps) == \
        (at(7, 30), at(17, 5), 4)
    assert rows[tid(2)].exit_missing and rows[tid(2)].last_out_ms is None
    assert rows[tid(2)].work_day == "2026-11-26"


def test_night_shift_is_one_work_day_and_cut_hour_is_configurable(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    night = [touch(1, ts=jst_ms(2026, 11, 26, 22)), touch(2, ts=jst_ms(2026, 11, 27, 3), dir="out")]
    with fresh_store(kind, tmp_path, url, Policy(cut_hour=4)) as s:
        s.ingest(night, now_ms=NOW)
        assert [(r.work_day, r.taps) for r in s.work_history()] == [("2026-11-26", 2)]
    with fresh_store(kind, tmp_path, url, Policy(cut_hour=0)) as s:
        s.ingest(night, now_ms=NOW)
        days = [(r.work_day, r.exit_missing, r.entry_missing) for r in s.work_history()]
        assert days == [("2026-11-26", True, False), ("2026-11-27", False, True)]


def test_replay_is_ignored_and_derived_rows_do_not_double(store: Store) -> None:
    batch = [touch(1), touch(2, dir="out", ts=jst_ms(2026, 11, 26, 17))]
    store.ingest(batch, now_ms=NOW)
    before = derived(store)
    res = store.ingest(batch + batch, now_ms=NOW)
    assert (res.stored, res.repeated) == (0, 4)
    assert derived(store) == before
    assert store.counts()["touches"] == 2
    assert store.rederive() == 1
    assert derived(store) == before


def test_training_never_enters_work_history_and_counts_per_center_month_and_course(
        store: Store) -> None:
    t = lambda seq, who, day, course="C-01", **kw: touch(  # noqa: E731
        seq, device="train-01", site=CENTER, role="training", who=who,
        ts=jst_ms(2026, 11, day, 10), facts={"course": course}, **kw)
    store.ingest([t(1, 1, 2), t(2, 1, 3), t(3, 2, 3), t(4, 3, 4, course="C-02"),
                  t(5, 4, 5, decision="deny"),                 # unreadable: nothing to count
                  t(6, None, 6)], now_ms=NOW)                   # unlisted card: counted by card
    assert store.work_history() == []
    [m] = store.training_monthly()
    assert (m.site, m.month, m.persons, m.touches) == (CENTER, "2026-11", 4, 5)
    store.import_courses([Course("C-01", "足場組立", "2026-11-01", "2026-11-30", 10, CENTER),
                          Course("C-09", "玉掛け", "2026-12-01", "2026-12-05", 8)])
    stats = {c.course: c for c in store.training_courses()}
    assert set(stats) == {"C-01", "C-02", "C-09"}
    assert (stats["C-01"].persons, stats["C-01"].touches, stats["C-01"].enrolled) == (3, 4, 10)
    assert stats["C-02"].name is None and stats["C-02"].touches == 1   # touched, not defined
    assert (stats["C-09"].touches, stats["C-09"].name) == (0, "玉掛け")  # defined, not touched
    store.import_courses([Course("C-01", "足場組立 II", "2026-11-01", "2026-11-30", 12, CENTER)])
    assert {c.course: c.enrolled for c in store.courses()}["C-01"] == 12


def test_vending_ledger_keeps_failed_and_indeterminate_apart(store: Store) -> None:
    v = lambda seq, result, month=11, dev="vend-01", contractor="20000000000001": touch(  # noqa: E731
        seq, device=dev, role="vending", ts=jst_ms(2026, month, 10, 12),
        facts={"slot": 3, "result": result, "contractor": contractor})
    store.ingest([v(1, "dispensed"), v(2, "dispensed"), v(3, "failed"), v(4, "indeterminate"),
                  v(5, "dispensed", month=10), v(6, "dispensed", dev="vend-02"),
                  touch(7, device="vend-01", role="vending", decision="deny"),  # no vend
                  v(8, "dispensed", contractor="")], now_ms=NOW)
    rows = {(r.device, r.contractor, r.month): (r.dispensed, r.failed, r.indeterminate)
            for r in store.vending_ledger()}
    assert rows == {("vend-01", "20000000000001", "2026-11"): (2, 1, 1),
                    ("vend-01", "20000000000001", "2026-10"): (1, 0, 0),
                    ("vend-02", "20000000000001", "2026-11"): (1, 0, 0),
                    ("vend-01", "", "2026-11"): (1, 0, 0)}
    assert len(store.vending_ledger(month="2026-10")) == 1


def test_clock_out_of_range_is_stored_flagged_and_kept_out_of_derived_tables(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    policy = Policy(max_future_ms=DAY_MS, max_past_ms=400 * DAY_MS)
    with fresh_store(kind, tmp_path, url, policy) as s:
        res = s.ingest([touch(1, ts=NOW + 2 * DAY_MS), touch(2, ts=NOW - 401 * DAY_MS),
                        touch(3, ts=NOW - 3 * DAY_MS), touch(4, ts=NOW + 3600_000)], now_ms=NOW)
        assert (res.stored, res.flagged) == (4, 2)
        assert sorted((f[1], f[6]) for f in s.flagged()) == [(1, "ts_future"), (2, "ts_past")]
        assert len(s.work_history()) == 2
        s.rederive()
        assert len(s.work_history()) == 2
        assert len(s.flagged()) == 2 and s.counts()["touches"] == 4


def test_unregistered_devices_are_dead_lettered_when_the_registry_is_on(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    with fresh_store(kind, tmp_path, url, Policy(require_registered=True)) as s:
        s.register_devices([Device("gate-01", SITE, "gate")])
        res = s.ingest([touch(1), touch(1, device="rogue-9"), touch(2)], now_ms=NOW)
        assert (res.stored, res.dead) == (2, 1)
        [dl] = s.dead_letters()
        assert dl[3] == "unregistered_device" and "rogue-9" in dl[2]
        assert [d.device for d in s.devices()] == ["gate-01"]


def test_dead_letters_keep_payload_and_reason_beside_good_touches(store: Store) -> None:
    res = store.ingest([touch(1)], [DeadLetter("ccus/v1/x/y/touch", b"\xff\x00", "malformed_cbor",
                                               "junk")], now_ms=NOW)
    assert (res.stored, res.dead) == (1, 1)
    [(_id, received, topic, reason, _detail, payload)] = store.dead_letters()
    assert (received, topic, reason, payload) == (NOW, "ccus/v1/x/y/touch", "malformed_cbor",
                                                 b"\xff\x00")


def test_reports_filter_by_site_and_month(store: Store) -> None:
    store.ingest([touch(1, site=SITE, ts=jst_ms(2026, 10, 31, 8)),
                  touch(2, site=SITE, ts=jst_ms(2026, 11, 2, 8)),
                  touch(3, site=SITE, ts=jst_ms(2026, 11, 3, 8)),
                  touch(1, device="gate-02", site=SITE2, ts=jst_ms(2026, 11, 2, 8))], now_ms=NOW)
    assert [r.work_day for r in store.work_history(SITE, "2026-11")] == ["2026-11-02", "2026-11-03"]
    assert store.days_worked(month="2026-11") == [(SITE, "2026-11", tid(1), 2),
                                                   (SITE2, "2026-11", tid(1), 1)]
    with pytest.raises(ValueError):
        store.work_history(SITE, "2026-1")


def test_store_url_selects_backend(tmp_path: Path, pg_url: str) -> None:
    for url in (tmp_path / "a.sqlite", f"sqlite:///{tmp_path / 'b.sqlite'}"):
        s = open_store(url)
        assert type(s).__name__ == "SqliteStore" and s.schema_version == len(migrations.SQLITE)
        s.close()
    assert (tmp_path / "b.sqlite").exists()
    s = open_store(pg_url)
    assert type(s).__name__ == "PostgresStore" and s.schema_version == len(migrations.POSTGRES)
    s.close()
    s = open_store(pg_url)  # migrations run once: a second open changes nothing
    assert s.schema_version == len(migrations.POSTGRES)
    s.close()
    with pytest.raises(ValueError, match="unknown store URL"):
        open_store("mysql://x/y")


def test_unreachable_postgres_is_a_clear_error() -> None:
    from cloud_sink.stores.postgres import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL at postgresql://u:\\*\\*\\*@"):
        open_store("postgresql://u:secret@127.0.0.1:1/none")


def test_a_version_1_sqlite_store_is_migrated_and_rederived(tmp_path: Path) -> None:
    """A store written by the first sink (schema 1) opens, migrates and keeps its data."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(migrations.SQLITE[0] + ";PRAGMA user_version=1;")
    t = touch(1, ts=jst_ms(2026, 11, 26, 8))
    db.execute("INSERT INTO touches VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               (t.device, t.seq, t.site, "gate", t.ts_ms, "synced", t.card, "felica", t.tid,
                "allow", "ok", 3, 1, '{"dir": "in"}', "in", "2026-11-26", NOW))
    db.execute("INSERT INTO touches VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               ("vend-01", 1, SITE, "vending", t.ts_ms, "synced", t.card, "felica", t.tid,
                "allow", "ok", 3, 1, '{"contractor": "20000000000001", "result": "dispensed",'
                ' "slot": 2}', None, "2026-11-26", NOW))
    db.commit()
    db.close()
    s = open_store(path)
    assert s.schema_version == len(migrations.SQLITE)
    s.rederive()
    assert [(r.tid, r.exit_missing) for r in s.work_history()] == [(tid(1), True)]
    assert [(r.contractor, r.dispensed) for r in s.vending_ledger()] == [("20000000000001", 1)]
    s.close()


def test_two_postgres_writers_storing_the_same_touches_at_once_count_each_once(
        tmp_path: Path, pg_url: str) -> None:
    """Two sinks given overlapping batches (a redelivery after a reconnect): each touch is
    stored and folded into the work history once, whoever wins its insert."""
    import threading

    days = [jst_ms(2026, 11, d, 7) for d in (24, 25, 26)]
    touches = [touch(seq, who=seq % 9 + 1, ts=days[seq % 3] + seq * 60_000,
                     dir="in" if seq % 2 else "out") for seq in range(1, 601)]
    errors: list[BaseException] = []
    with fresh_store("postgres", tmp_path, pg_url) as a, open_store(pg_url) as b:
        start = threading.Barrier(2)

        def write(store: Store, order: list[Touch], size: int) -> None:
            try:
                start.wait()
                for i in range(0, len(order), size):
                    store.ingest(order[i:i + size], now_ms=NOW)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(a, touches, 50)),
                   threading.Thread(target=write, args=(b, touches[::-1], 37))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert a.counts()["touches"] == 600
        folded = a.table("work_history")
        assert sum(r[5] for r in folded) == 600
        a.rederive()
        assert a.table("work_history") == folded
