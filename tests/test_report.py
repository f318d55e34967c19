"""`ccus report ...` over real stores: CSV and JSON contents, the 建退共 figure, rates, PNG charts."""

import csv
import io
import json
from pathlib import Path

import pytest
from sink_support import CENTER, NOW, SITE, SITE2, tid, touch

from cloud_sink.model import Course, WorkDay
from cloud_sink.report_cli import main
from cloud_sink.reports import shape
from cloud_sink.store import Store, open_store
from cloud_sink.workday import jst_ms


def fill(store: Store) -> None:
    """November 2026 at SITE: technician i works weekdays i..i+9; technician 3 never taps out
    on the 5th; one day at SITE2. Training at CENTER; vending for two contractors."""
    ts, seq = [], 0
    for i in range(1, 6):
        for day in range(i, i + 10):
            seq += 1
            ts.append(touch(seq, who=i, ts=jst_ms(2026, 11, day, 7, 30 + i)))
            if not (i == 3 and day == 5):
                seq += 1
                ts.append(touch(seq, who=i, dir="out", ts=jst_ms(2026, 11, day, 17, i)))
    ts.append(touch(1, device="gate-09", site=SITE2, who=1, ts=jst_ms(2026, 11, 20, 8)))
    for n, (who, course) in enumerate([(1, "C-01"), (2, "C-01"), (2, "C-01"), (3, "C-02"),
                                       (None, "C-01")], start=1):
        ts.append(touch(n, device="train-01", site=CENTER, role="training", who=who,
                        ts=jst_ms(2026, 11, 3 + n, 10), facts={"course": course}))
    for n, (contractor, result) in enumerate([("20000000000001", "dispensed")] * 3
                                             + [("20000000000001", "failed"),
                                                ("20000000000002", "dispensed"),
                                                ("20000000000002", "indeterminate")], start=1):
        ts.append(touch(n, device="vend-01", role="vending", ts=jst_ms(2026, 11, n, 12),
                        facts={"slot": 1, "result": result, "contractor": contractor}))
    store.ingest(ts, now_ms=NOW)
    store.import_courses([Course("C-01", "Scaffolding", "2026-11-01", "2026-11-07", 6, CENTER),
                          Course("C-02", "Slinging", "2026-11-08", "2026-11-09", 0, CENTER)])


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else str(tmp_path / "r.sqlite")
    s = open_store(url)
    s.ingest([], now_ms=NOW)
    if request.param == "postgres":  # the module database is shared by the params: start empty
        import psycopg
        from sink_support import DATA_TABLES

        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY")
    fill(s)
    s.close()
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_work_history_csv_shows_entry_exit_and_missing_exit(db: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(csv.DictReader(io.StringIO(run(capsys, "report", "work-history", "--db", db,
                                                "--site", SITE, "--month", "2026-11"))))
    assert len(rows) == 50
    assert {r["site"] for r in rows} == {SITE}
    r = next(r for r in rows if r["technician"] == tid(3) and r["work_day"] == "2026-11-05")
    assert (r["entry"], r["exit"], r["exit_missing"], r["hours"]) == ("07:33", "", "true", "")
    r = next(r for r in rows if r["technician"] == tid(1) and r["work_day"] == "2026-11-01")
    assert (r["entry"], r["exit"], r["taps"], r["hours"]) == ("07:31", "17:01", "2", "9.5")


def test_days_worked_is_the_kentaikyo_figure(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = json.loads(run(capsys, "report", "days-worked", "--db", db, "--month", "2026-11",
                         "--format", "json"))
    assert out["report"] == "days-worked" and out["month"] == "2026-11"
    got = {(r["site"], r["technician"]): r["days"] for r in out["rows"]}
    assert got == {**{(SITE, tid(i)): 10 for i in range(1, 6)}, (SITE2, tid(1)): 1}


def test_training_tables_and_card_ownership_rate(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    monthly = json.loads(run(capsys, "report", "training-monthly", "--db", db, "--format", "json"))
    assert monthly["rows"] == [
        {"center": CENTER, "month": "2026-11", "persons": 4, "touches": 5, "persons_unique": None},
        {"center": CENTER, "month": "total", "persons": 4, "touches": 5, "persons_unique": 4}]
    courses = {r["course"]: r for r in json.loads(
        run(capsys, "report", "training-courses", "--db", db, "--format", "json",
            "--fold", "-1"))["rows"]}
    # C-01: technicians 1 and 2 and one unlisted card = 3 persons of 6 enrolled
    assert (courses["C-01"]["persons"], courses["C-01"]["touches"]) == (3, 4)
    assert courses["C-01"]["card_ownership_rate_pct"] == 50.0
    assert courses["C-02"]["card_ownership_rate_pct"] is None   # enrolled 0: no rate
    assert courses["C-01"]["starts"] == "2026-11-01" and courses["C-01"]["ends"] == "2026-11-07"


def test_vending_billing_per_contractor_and_month(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(csv.DictReader(io.StringIO(run(capsys, "report", "vending", "--db", db,
                                                "--month", "2026-11"))))
    got = {r["contractor"]: (r["dispensed"], r["failed"], r["indeterminate"], r["machines"])
           for r in rows}
    assert got == {"20000000000001": ("3", "1", "0", "1"), "20000000000002": ("1", "0", "1", "1")}


def test_png_charts_are_written(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    heat, bars, vend = tmp_path / "heat.png", tmp_path / "courses.png", tmp_path / "vend.png"
    run(capsys, "report", "work-history", "--db", db, "--site", SITE, "--month", "2026-11",
        "--png", str(heat), "--out", str(tmp_path / "wh.csv"), "--bom")
    run(capsys, "report", "training-courses", "--db", db, "--png", str(bars))
    run(capsys, "report", "vending", "--db", db, "--png", str(vend))
    days, months = tmp_path / "days.png", tmp_path / "months.png"
    run(capsys, "report", "days-worked", "--db", db, "--month", "2026-11", "--png", str(days))
    run(capsys, "report", "training-monthly", "--db", db, "--png", str(months))
    for png in (heat, bars, vend, days, months):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    assert (tmp_path / "wh.csv").read_bytes().startswith(b"\xef\xbb\xbfsite,work_day")


def test_bad_month_is_a_clear_error(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "days-worked", "--db", db, "--month", "Nov"]) == 2
    assert "month must be YYYY-MM" in capsys.readouterr().err


def test_ownership_rate_rounds_half_up_to_one_decimal() -> None:
    assert shape.ownership_rate(2, 3) == 66.7
    assert shape.ownership_rate(1, 8) == 12.5
    assert shape.ownership_rate(1, 16) == 6.3      # 6.25 -> 6.3, not banker's 6.2
    assert shape.ownership_rate(0, 0) is None


def test_attendance_matrix_marks_missing_and_absent() -> None:
    days = [WorkDay(tid(1), SITE, "2026-02-03", jst_ms(2026, 2, 3, 8), jst_ms(2026, 2, 3, 17), 2),
            WorkDay(tid(2), SITE, "2026-02-28", jst_ms(2026, 2, 28, 8), None, 1)]
    techs, dates, cells, missing = shape.attendance(days, "2026-02")
    assert techs == [tid(1), tid(2)] and len(dates) == 28
    assert cells[0][2] == 9.0 and cells[1][27] is None and cells[0][0] is None
    assert missing == [(1, 27)]


def test_a_day_with_entry_and_exit_is_never_missing_even_at_zero_hours() -> None:
    """A 0.0-hour day (entry and exit in the same minute) was hatched as "missing"."""
    at = jst_ms(2026, 2, 3, 8)
    days = [WorkDay(tid(1), SITE, "2026-02-03", at, at, 2)]
    _, _, cells, missing = shape.attendance(days, "2026-02")
    assert cells[0][2] == 0.0 and missing == []


def test_course_chart_draws_japanese_course_names(tmp_path: Path) -> None:
    """Training-center staff read course names in Japanese: with the CJK font ./dev.sh installs
    they are drawn, not boxes (matplotlib warns 'Glyph ... missing' for a box)."""
    import warnings

    from cloud_sink.reports import charts

    assert charts._cjk_font(), "no CJK font: install fonts-ipafont-gothic (./dev.sh does)"
    rows = [{"course": "K-101", "name": "職長・安全衛生責任者教育", "enrolled": 20, "persons": 17,
             "card_ownership_rate_pct": 85.0}]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Glyph.*missing")
        png = charts.course_bars(rows, "研修センター 2026-12", tmp_path / "courses.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
