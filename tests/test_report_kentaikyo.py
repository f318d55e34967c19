"""Days worked for the 建退共 application in CCUS's three ways (元請一括, 一次下請一括, per
technician), from a store with a site registry, employers and a contractor chain (both backends)."""

import csv
import io
from pathlib import Path

import pytest
from sink_support import DATA_TABLES, NOW, tid, touch

from cloud_sink.registry import ChainLink, SiteRule, Technician
from cloud_sink.report_cli import main
from cloud_sink.store import open_store
from cloud_sink.workday import jst_ms

SITE_A, SITE_B, SITE_X = "13100000000001", "13100000000002", "13100000000003"
MAIN, MAIN2 = "20000000000001", "20000000000002"
TIER1, TIER2 = "30000000000001", "30000000000002"   # TIER2 works under TIER1 on SITE_A


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else str(tmp_path / "k.sqlite")
    s = open_store(url)
    if request.param == "postgres":
        import psycopg

        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY")
    s.import_sites([SiteRule(SITE_A, "日勤現場", "site", "東京都", MAIN, 4, "2026-01-01"),
                    SiteRule(SITE_B, "夜間現場", "site", "東京都", MAIN, 12, "2026-01-01"),
                    SiteRule(SITE_X, "他社現場", "site", "大阪府", MAIN2, 4, "2026-01-01")])
    s.import_chain([ChainLink(SITE_A, MAIN, "", "元請建設"),
                    ChainLink(SITE_A, TIER1, MAIN, "一次工業"),
                    ChainLink(SITE_A, TIER2, TIER1, "二次設備")])
    s.import_technicians([Technician(tid(1), TIER1, "山田 太郎"), Technician(tid(2), TIER2, "佐藤 花子"),
                          Technician(tid(3), MAIN, "鈴木 一郎")])
    seq, touches = 0, []
    # (technician, site, days of November)
    for who, site, days in [(1, SITE_A, (2, 3, 4)), (2, SITE_A, (2, 3)), (2, SITE_B, (5,)),
                            (3, SITE_A, (6,)), (4, SITE_X, (2,))]:
        for d in days:
            seq += 1
            touches.append(touch(seq, device="gate-" + site[-1], site=site, who=who,
                                 ts=jst_ms(2026, 11, d, 8)))
    s.ingest(touches, now_ms=NOW)
    s.close()
    return url


def rows(capsys: pytest.CaptureFixture[str], *argv: str) -> list[tuple[str, ...]]:
    assert main(["report", "days-worked", *argv]) == 0
    got = csv.DictReader(io.StringIO(capsys.readouterr().out))
    return [(r["contractor"], r["site"], r["technician"], r["days"]) for r in got]


def test_main_contractor_gets_all_its_sites(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert rows(capsys, "--store", db, "--month", "2026-11", "--by", "main", "--contractor", MAIN) == [
        (MAIN, SITE_A, tid(1), "3"), (MAIN, SITE_A, tid(2), "2"), (MAIN, SITE_A, tid(3), "1"),
        (MAIN, SITE_B, tid(2), "1")]


def test_per_site_export_names_site_contractor_and_technician(
        db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "days-worked", "--store", db, "--month", "2026-11", "--by", "site"]) == 0
    got = [(r["site"], r["site_name"], r["contractor"], r["contractor_name"], r["technician"],
            r["technician_name"], r["days"])
           for r in csv.DictReader(io.StringIO(capsys.readouterr().out))]
    assert got == [
        (SITE_A, "日勤現場", MAIN, "元請建設", tid(1), "山田 太郎", "3"),
        (SITE_A, "日勤現場", MAIN, "元請建設", tid(2), "佐藤 花子", "2"),
        (SITE_A, "日勤現場", MAIN, "元請建設", tid(3), "鈴木 一郎", "1"),
        (SITE_B, "夜間現場", MAIN, "元請建設", tid(2), "佐藤 花子", "1"),
        (SITE_X, "他社現場", MAIN2, "", tid(4), "", "1")]


def test_first_tier_gets_its_own_and_those_below_it_on_sites_with_a_chain(
        db: str, capsys: pytest.CaptureFixture[str]) -> None:
    # SITE_B has no chain: nobody there can be put under a first tier; tid(3) is the main's own
    assert rows(capsys, "--store", db, "--month", "2026-11", "--by", "first-tier") == [
        (TIER1, SITE_A, tid(1), "3"), (TIER1, SITE_A, tid(2), "2")]


def test_per_technician_names_the_employer(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert rows(capsys, "--store", db, "--month", "2026-11", "--by", "technician") == [
        ("", SITE_X, tid(4), "1"), (MAIN, SITE_A, tid(3), "1"), (TIER1, SITE_A, tid(1), "3"),
        (TIER2, SITE_A, tid(2), "2"), (TIER2, SITE_B, tid(2), "1")]


def test_export_opens_in_excel_with_japanese_names(db: str, tmp_path: Path) -> None:
    out = tmp_path / "genuke.csv"
    assert main(["report", "days-worked", "--store", db, "--month", "2026-11", "--by", "main",
                 "--contractor", MAIN, "--ja", "--bom", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith("\ufeff事業者ID,事業者名,現場ID,現場名,年月,技能者ID,技能者氏名,"
                           "所属事業者ID,就業日数\n".encode())
    lines = data.decode("utf-8-sig").splitlines()
    assert lines[1] == f"{MAIN},元請建設,{SITE_A},日勤現場,2026-11,{tid(1)},山田 太郎,{TIER1},3"
    assert len(lines) == 5


def test_work_history_text_view_names_the_site_and_its_cut(
        db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "work-history", "--store", db, "--site", SITE_B, "--month", "2026-11",
                 "--format", "text"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"site {SITE_B} 夜間現場, 2026-11"
    assert out[1] == "work day cut 12:00 Asia/Tokyo"
    assert out[3].split()[:4] == ["2026-11-04", tid(2), "佐藤", "花子"]   # 08:00 on the 5th: cut at 12
