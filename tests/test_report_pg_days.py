"""The named 建退共 export written by PostgreSQL (cloud_sink.reports.pg_days) against the Python
path (shape.days_worked_by + output.to_csv) on the same real PostgreSQL store: byte for byte,
--by site and --by main, with names holding commas, quotes, line breaks, backslashes, control
characters and Japanese, registry rows before and after the month, unregistered sites and
technicians, and IDs whose code-point order is not a collation's."""

import argparse
import csv
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import PG_ADMIN_URL
from sink_support import DATA_TABLES, NOW, tid, touch

from cloud_sink import report_cli
from cloud_sink.registry import ChainLink, SiteRule, Technician
from cloud_sink.reports import output, pg_days
from cloud_sink.store import Store, open_store
from cloud_sink.workday import jst_ms

SITE_A, SITE_B, SITE_C, SITE_D, SITE_E = ("13100000000001", "13100000000002", "13100000000003",
                                          "13100000000004", "13100000000005")
MAIN, MAIN2, MAIN3 = "20000000000001", "20000000000002", "20000000000003"
TIER1 = "30000000000001"
AWKWARD = ['山田, "太郎"', "改行\nあり", "復帰\rあり", "タブ\tと\\バック", "\\N", "\\.",
           " 前後の空白 ", '"', ",", "\x08\x0b\x0c\x07", "ＦＵＬＬ　ＷＩＤＴＨ", "😀 絵文字"]


@pytest.fixture(scope="module")
def ja_url() -> Iterator[str]:
    """A database whose default collation is ICU's Japanese, not code points: what the SQL
    leaves to the collation (store.chain()'s order) and what it must not (the sort) differ."""
    name = f"ccus_test_ja_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\''
                      " LOCALE_PROVIDER icu ICU_LOCALE 'ja-JP' LOCALE 'C.UTF-8'")
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["C.UTF-8", "ja-JP-x-icu"])
def url(request: pytest.FixtureRequest) -> str:
    pg_url = request.getfixturevalue("pg_url" if request.param == "C.UTF-8" else "ja_url")
    s = open_store(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY")
    s.import_sites([
        SiteRule(SITE_A, '日勤現場, "品川"', "site", "東京都", MAIN, 4, "2026-01-01"),
        # in force from December: November's rule is the row before it (MAIN)
        SiteRule(SITE_A, "十二月から", "site", "東京都", MAIN2, 4, "2026-12-01"),
        # from the month's last day on: in force (rule_on's day is YYYY-MM-31)
        SiteRule(SITE_B, "旧名", "site", "東京都", MAIN, 4, "2026-01-01"),
        SiteRule(SITE_B, "夜間\n現場", "site", "東京都", MAIN2, 4, "2026-11-30"),
        # only rows after the month: the first one is used
        SiteRule(SITE_C, "来年の現場", "site", "大阪府", MAIN3, 4, "2027-02-01"),
        SiteRule(SITE_C, "再来年", "site", "大阪府", MAIN, 4, "2028-01-01"),
        # registered without a main contractor: with the unregistered sites, by site
        SiteRule(SITE_E, "元請なし", "site", "東京都", "", 4, "2026-01-01")])
    # MAIN is named on two sites (the first in chain order wins), MAIN3 with '' on its own
    s.import_chain([ChainLink(SITE_A, MAIN, "", "元請建設, 本店"),
                    ChainLink(SITE_A, TIER1, MAIN, "一次\r工業"),
                    ChainLink(SITE_B, MAIN, "", "別名の元請"),
                    ChainLink(SITE_B, MAIN2, "", '"二番" 元請'),
                    ChainLink(SITE_C, MAIN3, "", ""),
                    # which of these names MAIN3 is the collation's say (store.chain() order)
                    ChainLink("a-site", MAIN3, "", "a名の元請"),
                    ChainLink("B,site", MAIN3, "", "B名の元請"),
                    # a contractor '' named: what an unregistered site's contractor '' is called
                    ChainLink("ｱ", "", "", '空の"元請"')])
    s.import_technicians([Technician(tid(i), TIER1 if i % 2 else MAIN, name)
                          for i, name in enumerate(AWKWARD, start=1)]
                         + [Technician(tid(50), "", "")])
    seq, touches = 0, []
    for who in range(1, len(AWKWARD) + 3):   # the last two are not registered
        for site, days in [(SITE_A, (2, 3, 4)), (SITE_B, (5,)), (SITE_C, (6, 7)),
                           (SITE_D, (9,)), (SITE_E, (11,))]:
            for d in days[: 1 + who % len(days)]:
                seq += 1
                touches.append(touch(seq, device="gate-" + site[-1], site=site, who=who,
                                     ts=jst_ms(2026, 11, d, 8)))
    seq += 1
    touches.append(touch(seq, device="gate-1", site=SITE_A, who=50, ts=jst_ms(2026, 11, 10, 8)))
    seq += 1   # October: outside the month
    touches.append(touch(seq, device="gate-1", site=SITE_A, who=1, ts=jst_ms(2026, 10, 10, 8)))
    s.ingest(touches, now_ms=NOW)
    s.close()
    # IDs a collation would order differently from code points (the store takes any text; a
    # site topic or card may carry them): straight into the derived table, as both paths read it
    with psycopg.connect(pg_url, autocommit=True) as c:
        for site, t in [("a-site", "Zed"), ("B,site", "zed"), ('é"site', "éa"), ("a-site", "a b"),
                        ("_x", "Ä"), ("ｱ", "\\t\ttab")]:
            c.execute("INSERT INTO work_history (tid, site, work_day, first_in_ms, last_out_ms,"
                      " taps, cut_hour) VALUES (%s, %s, '2026-11-12', 1, 2, 2, 4)", (t, site))
    return pg_url


def _args(by: str, out: str | None, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    report_cli.register(p.add_subparsers(dest="cmd"))
    argv = ["report", "days-worked", "--store", "x", "--month", "2026-11", "--by", by, *extra]
    return p.parse_args(argv + (["--out", out] if out else []))


CASES = [(), ("--ja", "--bom"), ("--contractor", MAIN), ("--contractor", MAIN3, "--ja"),
         ("--site", SITE_B), ("--site", "a-site", "--bom"), ("--contractor", "19999999999999")]


@pytest.mark.parametrize("by", ["site", "main"])
@pytest.mark.parametrize("extra", CASES, ids=lambda e: " ".join(e) or "all")
def test_database_export_is_byte_identical_to_the_python_one(
        url: str, tmp_path: Path, by: str, extra: tuple[str, ...]) -> None:
    store = open_store(url, create=False)
    try:
        py, db = tmp_path / "python.csv", tmp_path / "database.csv"
        report_cli.days_worked_by_python(_args(by, str(py), *extra), store)
        args = _args(by, str(db), *extra)
        assert report_cli.days_in_database(args, store)
        report_cli.days_worked_by_database(args, store)
    finally:
        store.close()
    assert db.read_bytes() == py.read_bytes()
    if not extra:   # the whole month: every row there, every awkward name in it
        assert b"\n20000000000003," in db.read_bytes()
        # an unregistered site: contractor '', named as the chain names ''
        assert ',"空の""元請""",13100000000004,,2026-11,'.encode() in db.read_bytes()
        text = db.read_bytes().decode("utf-8")
        for name in AWKWARD:   # as the csv writer puts it in a field
            assert f",{output.to_csv([{'x': name}], ['x'])[2:-1]}," in text


def test_to_stdout_the_same_text(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(url, create=False)
    try:
        for by in ("site", "main"):
            report_cli.days_worked_by_python(_args(by, None, "--ja"), store)
            py = capsys.readouterr().out
            report_cli.days_worked_by_database(_args(by, None, "--ja"), store)
            assert capsys.readouterr().out == py
            assert py.startswith("事業者ID,事業者名,現場ID,")
    finally:
        store.close()


def test_the_cli_writes_it_from_the_database_and_a_csv_reader_gets_the_names_back(
        url: str, tmp_path: Path) -> None:
    out = tmp_path / "e.csv"
    assert report_cli.main(["report", "days-worked", "--store", url, "--month", "2026-11",
                            "--by", "site", "--out", str(out)]) == 0
    with out.open(encoding="utf-8", newline="") as f:
        got = list(csv.DictReader(f))
    # a field with '\r' is written unquoted by Python's csv (and so here): a reader splits it
    by_tid = {r["technician"]: r for r in got if r["site"] == SITE_A}
    for i, name in enumerate(AWKWARD, start=1):
        if "\r" not in name:
            assert by_tid[tid(i)]["technician_name"] == name
            assert by_tid[tid(i)]["site_name"] == '日勤現場, "品川"'
            assert by_tid[tid(i)]["contractor_name"] == "元請建設, 本店"
    assert by_tid[tid(50)]["technician_name"] == "" and by_tid[tid(50)]["employer"] == ""
    sites = [r["site"] for r in got if r["month"] == "2026-11"]   # not the pieces of a split row
    assert sites == sorted(sites)   # code-point order, as Python sorts


def test_json_other_ways_and_sqlite_stay_in_python(url: str, tmp_path: Path) -> None:
    pg: Store = open_store(url, create=False)
    lite: Store = open_store(tmp_path / "s.sqlite")
    try:
        assert report_cli.days_in_database(_args("main", None), pg)
        assert not report_cli.days_in_database(_args("main", None, "--format", "json"), pg)
        assert not report_cli.days_in_database(_args("first-tier", None), pg)
        assert not report_cli.days_in_database(_args("technician", None), pg)
        assert not report_cli.days_in_database(_args("main", None), lite)
    finally:
        pg.close()
        lite.close()


def test_a_failing_export_leaves_no_file(url: str, tmp_path: Path) -> None:
    out = tmp_path / "never.csv"
    store = open_store(url, create=False)
    try:
        with pytest.raises(psycopg.Error):
            pg_days.write(_Broken(store), "main", None, "2026-11", None, str(out))
    finally:
        store.close()
    assert not out.exists()


class _Broken:
    """A store whose COPY query fails in the server (a column that is not there)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def copy_out(self, sql: str, params: object, settings: object = None) -> object:
        return self.store.copy_out(sql.replace("d.n::text", "d.no_such_column::text"), params,  # type: ignore[attr-defined]
                                   settings)


def test_quoted_characters_are_asked_of_the_python_writer() -> None:
    assert {",", '"', "\n"} <= set(pg_days.quoted_chars())
    assert "a" not in pg_days.quoted_chars() and " " not in pg_days.quoted_chars()
