"""A training center's published tables rebuilt from raw touches, to the digit (both backends).

The fixture and the expected tables below were written down by hand before the code that
computes them: one row per month including a month with no touches, a total row (the sum of
the months, with the persons unique over the period beside it), courses keyed by center +
course id, courses with at most N persons folded into one "other courses" row, a total row.
"""

import csv
import io
from pathlib import Path

import pytest
from sink_support import CENTER, DATA_TABLES, NOW, tid, touch

from cloud_sink.model import Course
from cloud_sink.registry import SiteRule
from cloud_sink.report_cli import main
from cloud_sink.store import open_store
from cloud_sink.workday import jst_ms

CENTER2 = "27200000000002"

# (month day hour minute, person, course, decision) at CENTER
FIXTURE = [
    # April: K1 by persons 1..7, person 1 twice -> 7 persons, 8 touches
    *[((4, 6 + p, 10, 0), p, "K1", "allow") for p in range(1, 8)],
    ((4, 20, 9, 0), 1, "K1", "allow"),
    ((4, 21, 9, 0), 12, "K1", "deny"),          # a denial never counts
    # May: nothing -> 0, 0
    # June: K2 by 1, 8, 9; K3 by 10 -> 4 persons, 4 touches
    ((6, 2, 10, 0), 1, "K2", "allow"), ((6, 2, 10, 5), 8, "K2", "allow"),
    ((6, 3, 10, 0), 9, "K2", "allow"), ((6, 10, 13, 0), 10, "K3", "allow"),
    # July: K1 by 2; K2 by 11 at 00:30 on the 1st: the calendar month (July), not a work day
    # cut at the sink's 04:00 (which would make it June) -> 2 persons, 2 touches
    ((7, 8, 10, 0), 2, "K1", "allow"), ((7, 1, 0, 30), 11, "K2", "allow"),
]

MONTHLY = """\
center,month,persons,touches,persons_unique
27200000000001,2026-04,7,8,
27200000000001,2026-05,0,0,
27200000000001,2026-06,4,4,
27200000000001,2026-07,2,2,
27200000000001,total,13,14,11
"""

COURSES_FOLD_6 = """\
center,course,name,starts,ends,enrolled,persons,touches,card_ownership_rate_pct,persons_unique
27200000000001,K1,型枠施工,2026-04-01,2026-07-31,10,7,9,70.0,
27200000000001,other courses,2 courses with at most 6 persons,,,7,5,5,,
27200000000001,total,,,,17,12,14,,11
"""

COURSES_FOLD_1 = """\
center,course,name,starts,ends,enrolled,persons,touches,card_ownership_rate_pct,persons_unique
27200000000001,K1,型枠施工,2026-04-01,2026-07-31,10,7,9,70.0,
27200000000001,K2,玉掛け,2026-06-01,2026-07-31,5,4,4,80.0,
27200000000001,other courses,1 course with at most 1 person,,,2,1,1,,
27200000000001,total,,,,17,12,14,,11
"""


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else str(tmp_path / "t.sqlite")
    s = open_store(url)
    if request.param == "postgres":
        import psycopg

        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY")
    s.import_sites([SiteRule(CENTER, "富士教育訓練センター", "training", "静岡県", tid(900), 4,
                             "2026-01-01")])
    touches = [touch(n, device="train-01", site=CENTER, role="training", who=who,
                     decision=dec, ts=jst_ms(2026, mo, d, h, mi), facts={"course": course})
               for n, ((mo, d, h, mi), who, course, dec) in enumerate(FIXTURE, start=1)]
    # the same course id at another center is another course
    touches.append(touch(1, device="train-02", site=CENTER2, role="training", who=1,
                         ts=jst_ms(2026, 4, 8, 10), facts={"course": "K1"}))
    s.ingest(touches, now_ms=NOW)
    s.import_courses([Course("K1", "型枠施工", "2026-04-01", "2026-07-31", 10, CENTER),
                      Course("K2", "玉掛け", "2026-06-01", "2026-07-31", 5, CENTER),
                      Course("K3", "足場", "2026-06-10", "2026-06-10", 2, CENTER)])
    s.close()
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_monthly_table_has_empty_months_and_a_total_with_unique_persons(
        db: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "report", "training-monthly", "--store", db, "--site", CENTER,
              "--from", "2026-04", "--to", "2026-07")
    assert out == MONTHLY


def test_courses_with_few_persons_fold_into_other_courses_with_a_total(
        db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "report", "training-courses", "--store", db, "--site", CENTER) == COURSES_FOLD_6
    assert run(capsys, "report", "training-courses", "--store", db, "--site", CENTER,
               "--fold", "1") == COURSES_FOLD_1


def test_the_other_center_keeps_its_own_course_of_the_same_id(
        db: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(csv.DictReader(io.StringIO(run(
        capsys, "report", "training-courses", "--store", db, "--site", CENTER2, "--fold", "0"))))
    assert [(r["course"], r["persons"], r["touches"]) for r in rows] == [
        ("K1", "1", "1"), ("total", "1", "1")]
    assert rows[0]["name"] == ""     # CENTER's K1 definition is not CENTER2's


def test_a_center_registered_with_its_own_fold_gets_it_by_default(
        db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The two centers publish with 6 and 1: a center's `fold_persons` in the registry is its
    default, --fold still overrides it."""
    s = open_store(db)
    s.import_sites([SiteRule(CENTER, "三田建設技能研修センター", "training", "兵庫県", tid(900), 4,
                             "2026-01-01", fold_persons=1)])
    s.close()
    assert run(capsys, "report", "training-courses", "--store", db, "--site", CENTER) == COURSES_FOLD_1
    assert run(capsys, "report", "training-courses", "--store", db, "--site", CENTER,
               "--fold", "6") == COURSES_FOLD_6
