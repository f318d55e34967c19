"""The site registry on both backends: each site's own cut, live and re-derived; flags re-derived.

- property: touches over sites with different cuts (one with a rule change), delivered in any
  order, repeated, in any batches, the registry imported before, between or after them, give
  the tables computed from scratch with each site's own rules (SQLite and PostgreSQL);
- a cut change re-derives exactly that site; a wider skew window admits exactly what it admits;
- the CSV refuses a bad line naming line and column; the import says how to admit what it flagged.
"""

import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sink_support import CENTER, NOW, fresh_store, tid, touch

from ccus.cli import main
from cloud_sink.courses import CsvError
from cloud_sink.importer import touch_json
from cloud_sink.model import DAY_MS, Policy
from cloud_sink.registry import SiteRule, by_site, cut_for, first_tier_of, parse_chain, parse_sites
from cloud_sink.store import Store
from cloud_sink.workday import jst_ms, work_day
from protocol.touch import Touch

DAY_SITE, NIGHT_SITE, MOVED_SITE, LOOSE_SITE = ("13100000000001", "13100000000002",
                                                "13100000000003", "13100000000009")
MAIN = "20000000000001"
RULES = [
    SiteRule(DAY_SITE, "日勤現場", "site", "東京都", MAIN, 4, "2026-01-01"),
    SiteRule(NIGHT_SITE, "夜間現場", "site", "東京都", MAIN, 12, "2026-01-01"),
    # cut at 04:00, then at 18:00 from the work day 2026-11-22 on
    SiteRule(MOVED_SITE, "切替現場", "site", "神奈川県", MAIN, 4, "2026-01-01"),
    SiteRule(MOVED_SITE, "切替現場", "site", "神奈川県", MAIN, 18, "2026-11-22"),
    SiteRule(CENTER, "研修センター", "training", "静岡県", MAIN, 4, "2026-01-01"),
]
DEVICES = {"gate-d": DAY_SITE, "gate-n": NIGHT_SITE, "gate-m": MOVED_SITE, "gate-l": LOOSE_SITE,
           "train-c": CENTER}
BASE = jst_ms(2026, 11, 20)
DEFAULT_CUT = 5   # the sink's default, for the site not in the registry


def scratch(touches: list[Touch], rules: list[SiteRule], policy: Policy, now: int
            ) -> dict[str, list[tuple[object, ...]]]:
    """The derived work history and training months, computed here from nothing but the
    touches, each with its own site's rules (the first copy of a (device, seq) counts)."""
    first: dict[tuple[str, int], Touch] = {}
    for t in touches:
        first.setdefault((t.device, t.seq), t)
    sites = by_site(rules)
    wh: dict[tuple[str, str, str], list[object]] = {}
    tm: dict[tuple[str, str], tuple[set[str], list[int]]] = defaultdict(lambda: (set(), [0]))
    for t in first.values():
        if t.ts_ms - now > policy.max_future_ms or now - t.ts_ms > policy.max_past_ms:
            continue
        if t.decision.value != "allow":
            continue
        cut = cut_for(sites.get(t.site), t.ts_ms, t.role.value, policy.cut_hour)
        day = work_day(t.ts_ms, cut)
        if t.role.value == "gate" and t.tid:
            # first entry, last exit, taps, cut, last entry (work_history's column order)
            row = wh.setdefault((t.tid, t.site, day), [None, None, 0, cut, None])
            if t.facts.get("dir") == "in":
                row[0] = t.ts_ms if row[0] is None else min(row[0], t.ts_ms)  # type: ignore[type-var]
                row[4] = t.ts_ms if row[4] is None else max(row[4], t.ts_ms)  # type: ignore[type-var]
            if t.facts.get("dir") == "out":
                row[1] = t.ts_ms if row[1] is None else max(row[1], t.ts_ms)  # type: ignore[type-var]
            row[2] += 1  # type: ignore[operator]
            row[3] = max(row[3], cut)  # type: ignore[call-overload]
        if t.role.value == "training":
            persons, n = tm[(t.site, day[:7])]
            persons.add(t.tid or "card:" + t.card.hex())
            n[0] += 1
    return {"work_history": sorted((*k, *v) for k, v in wh.items()),
            "training_monthly": sorted((s, m, len(p), n[0]) for (s, m), (p, n) in tm.items())}


def tables(store: Store) -> dict[str, list[tuple[object, ...]]]:
    return {"work_history": sorted(store.table("work_history")),
            "training_monthly": sorted(store.table("training_monthly"))}


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Touch], list[list[Touch]], int]:
    keys = draw(st.lists(st.tuples(st.sampled_from(sorted(DEVICES)), st.integers(1, 60)),
                         min_size=1, max_size=40, unique=True))
    base = []
    for dev, seq in keys:
        site = DEVICES[dev]
        role = "training" if site == CENTER else "gate"
        when = draw(st.one_of(
            st.builds(lambda d, h, m: BASE + d * DAY_MS + h * 3600_000 + m * 60_000,
                      st.integers(0, 11), st.integers(0, 23), st.sampled_from([0, 59])),
            st.sampled_from([NOW + 2 * DAY_MS, NOW - 401 * DAY_MS])))
        base.append(touch(seq, device=dev, site=site, role=role, ts=when,
                          who=draw(st.one_of(st.none(), st.integers(1, 3))),
                          dir=draw(st.sampled_from(["in", "out"])),
                          decision=draw(st.sampled_from(["allow", "allow", "deny"])),
                          facts={"course": "K1"} if role == "training" else None))
    extra = draw(st.lists(st.sampled_from(base), max_size=len(base)))
    shuffled = draw(st.permutations(base + extra))
    cuts = sorted(draw(st.lists(st.integers(0, len(shuffled)), max_size=4)))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
    return base, batches, draw(st.integers(0, len(batches)))


POLICY = Policy(cut_hour=DEFAULT_CUT)


def _check(kind: str, pg_url: str | None, case: tuple[list[Touch], list[list[Touch]], int]) -> None:
    base, batches, registry_at = case
    want = scratch(base, RULES, POLICY, NOW)
    with tempfile.TemporaryDirectory() as tmp, fresh_store(kind, Path(tmp), pg_url, POLICY) as s:
        for i, b in enumerate(batches):
            if i == registry_at:
                s.import_sites(RULES)
            s.ingest(b, now_ms=NOW)
        if registry_at >= len(batches):
            s.import_sites(RULES)
        assert tables(s) == want
        s.rederive()
        assert tables(s) == want


@settings(max_examples=50, deadline=None)
@given(deliveries())
def test_sqlite_each_site_gets_its_own_cut_whatever_the_order_repeats_batches_and_registry_time(
        case: tuple[list[Touch], list[list[Touch]], int]) -> None:
    _check("sqlite", None, case)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=deliveries())
def test_postgres_each_site_gets_its_own_cut_whatever_the_order_repeats_batches_and_registry_time(
        pg_url: str, case: tuple[list[Touch], list[list[Touch]], int]) -> None:
    _check("postgres", pg_url, case)


def night_shift(device: str, site: str, seq: int, who: int, day: int) -> list[Touch]:
    """In at 21:00, out at 05:30 the next morning."""
    return [touch(seq, device=device, site=site, who=who, ts=jst_ms(2026, 11, day, 21)),
            touch(seq + 1, device=device, site=site, who=who, dir="out",
                  ts=jst_ms(2026, 11, day + 1, 5, 30))]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_one_store_serves_a_day_site_and_a_night_site_and_a_cut_change_rederives_only_it(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    day_rule, night_rule = RULES[0], RULES[1]
    wrong_night = SiteRule(NIGHT_SITE, "夜間現場", "site", "東京都", MAIN, 4, "2026-01-01")
    with fresh_store(kind, tmp_path, url) as s:
        s.import_sites([day_rule, wrong_night])
        touches = night_shift("gate-n", NIGHT_SITE, 1, 1, 24) + night_shift("gate-d", DAY_SITE, 1, 2, 24)
        s.ingest(touches, now_ms=NOW)
        # a cut at 04:00 splits the night shift at both sites: 21:00 without exit, 05:30 without entry
        split = [r for r in s.work_history() if r.site == NIGHT_SITE]
        assert [(r.work_day, r.entry_missing, r.exit_missing, r.cut_hour) for r in split] == [
            ("2026-11-24", False, True, 4), ("2026-11-25", True, False, 4)]
        day_before = [r for r in s.work_history() if r.site == DAY_SITE]
        res = s.import_sites([night_rule])   # the correction: the night site is cut at 12:00
        assert res.sites == (NIGHT_SITE,) and (res.touches, res.recut, res.moved) == (2, 2, 1)
        night = [r for r in s.work_history() if r.site == NIGHT_SITE]
        assert [(r.work_day, r.first_in_ms, r.last_out_ms, r.taps, r.cut_hour) for r in night] == [
            ("2026-11-24", jst_ms(2026, 11, 24, 21), jst_ms(2026, 11, 25, 5, 30), 2, 12)]
        assert [r for r in s.work_history() if r.site == DAY_SITE] == day_before
        assert tables(s) == scratch(touches, [day_rule, night_rule], Policy(), NOW)
        # importing the same rules again re-derives nothing
        assert s.import_sites([night_rule, day_rule]).sites == ()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_wider_window_admits_exactly_the_touches_it_admits_and_a_narrower_one_flags_them(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    ages = [10, 300, 450, 800, 2000]      # days before receipt
    touches = [touch(i, who=i, ts=NOW - age * DAY_MS) for i, age in enumerate(ages, start=1)]
    touches.append(touch(9, who=9, ts=NOW + 2 * DAY_MS))     # ahead of receipt
    with fresh_store(kind, tmp_path, url) as s:
        s.ingest(touches, now_ms=NOW)
        assert sorted(r[1] for r in s.flagged()) == [3, 4, 5, 9]
        wide = Policy(max_past_ms=1000 * DAY_MS)
        s.policy = wide
        res = s.rederive_all()
        assert (res.admitted, res.newly_flagged, res.still_flagged) == (2, 0, 2)
        assert sorted(r[1] for r in s.flagged()) == [5, 9]
        assert tables(s) == scratch(touches, [], wide, NOW)
        assert {r.tid for r in s.work_history()} == {tid(i) for i in (1, 2, 3, 4)}
        s.policy = Policy()
        res = s.rederive_all()
        assert (res.admitted, res.newly_flagged) == (0, 2)
        assert tables(s) == scratch(touches, [], Policy(), NOW)


def test_an_unregistered_site_gets_the_default_cut_and_is_reported_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with fresh_store("sqlite", tmp_path, None, Policy(cut_hour=6)) as s:
        s.ingest(night_shift("gate-l", LOOSE_SITE, 1, 1, 24), now_ms=NOW)
        s.ingest(night_shift("gate-l", LOOSE_SITE, 3, 1, 25), now_ms=NOW)
        assert [site for site, _ in s.unregistered_sites()] == [LOOSE_SITE]
        assert sum("not in the site registry" in r.message for r in caplog.records) == 1
        assert {r.cut_hour for r in s.work_history()} == {6}
        s.policy = Policy(cut_hour=7)      # `ccus sink rederive --cut-hour 7`
        assert s.rederive_all().recut == 4
        assert {r.cut_hour for r in s.work_history()} == {7}
        s.import_sites([SiteRule(LOOSE_SITE, "x", "site", "", MAIN, 12, "2026-01-01")])
        assert s.unregistered_sites() == []
        assert {r.cut_hour for r in s.work_history()} == {12}


def test_site_csv_errors_name_the_line_and_the_column() -> None:
    head = "site,name,kind,prefecture,main_contractor,day_cut_hour,valid_from\n"
    ok = f"{DAY_SITE},日勤現場,site,東京都,{MAIN},4,2026-01-01\n"
    assert parse_sites(head + ok)[0].day_cut_hour == 4
    for line, column in [(f"{DAY_SITE},a,site,東京都,{MAIN},24,2026-01-01", "day_cut_hour"),
                         (f"1310000000000,a,site,東京都,{MAIN},4,2026-01-01", "site"),
                         (f"{DAY_SITE},a,office,東京都,{MAIN},4,2026-01-01", "kind"),
                         (f"{DAY_SITE},a,site,東京都,2000,4,2026-01-01", "main_contractor"),
                         (f"{DAY_SITE},a,site,東京都,{MAIN},4,2026-13-01", "valid_from"),
                         (f"{DAY_SITE},a,site,東京都,{MAIN},4,2026-01-01", "valid_from")]:  # twice
        with pytest.raises(CsvError, match=f"^line 3, column {column}: "):
            parse_sites(head + ok + line + "\n")
    with pytest.raises(CsvError, match="^line 1: header lacks day_cut_hour"):
        parse_sites("site,name,kind,prefecture,main_contractor,valid_from\n")


def test_sites_cli_import_list_show_and_a_bad_file(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "s.sqlite")
    good = tmp_path / "sites.csv"
    good.write_text("\ufeffsite,name,kind,prefecture,main_contractor,day_cut_hour,valid_from\n"
                    f"{NIGHT_SITE},夜間現場,site,東京都,{MAIN},12,2026-01-01\n", encoding="utf-8")
    assert main(["sink", "sites", "import", "--store", db, str(good)]) == 0
    assert "1 registry rows imported" in capsys.readouterr().out
    assert main(["sink", "sites", "list", "--store", db]) == 0
    assert f"{NIGHT_SITE}  site      12:00  2026-01-01" in capsys.readouterr().out
    assert main(["sink", "sites", "show", "--store", db, NIGHT_SITE]) == 0
    assert "work day cut 12:00 Asia/Tokyo" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text(good.read_text(encoding="utf-8").replace(",12,", ",noon,"), encoding="utf-8")
    assert main(["sink", "sites", "import", "--store", db, str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ccus sink sites import: {bad}: line 2, column day_cut_hour: 'noon': an hour"
                   " 0..23 (Asia/Tokyo) is needed"]


def test_importing_last_years_touches_says_how_many_were_flagged_and_what_admits_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, f = str(tmp_path / "h.sqlite"), tmp_path / "old.jsonl"
    f.write_text("\n".join(touch_json(touch(i, who=1, ts=jst_ms(2024, 11, 1 + i, 8)))
                           for i in range(1, 6)) + "\n")
    assert main(["sink", "import", "--store", db, str(f), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("5 stored, 0 already stored, 5 flagged (clock)")
    advice = out[1]
    assert advice.startswith("flagged, kept out of the reports: 5 stamped up to ")
    option = advice.split("`")[1].split()
    days = option[option.index("--max-past-days") + 1]
    assert main(["sink", "rederive", "--store", db, "--max-past-days", days]) == 0
    assert "5 admitted" in capsys.readouterr().out
    assert main(["sink", "flagged", "--store", db]) == 0
    assert "no flagged touches" in capsys.readouterr().out


def test_first_tier_follows_the_chain_up_to_the_contractor_under_the_main_one() -> None:
    text = ("site,contractor,parent,name\n"
            f"{DAY_SITE},{MAIN},,元請建設\n"
            f"{DAY_SITE},30000000000001,{MAIN},一次A\n"
            f"{DAY_SITE},30000000000002,30000000000001,二次B\n"
            f"{DAY_SITE},30000000000003,30000000000002,三次C\n"
            f"{DAY_SITE},30000000000004,{MAIN},一次D\n"
            f"{DAY_SITE},30000000000005,30000000000099,宙に浮いた\n")
    tiers = first_tier_of(parse_chain(text), MAIN)
    assert tiers == {"30000000000001": "30000000000001", "30000000000002": "30000000000001",
                     "30000000000003": "30000000000001", "30000000000004": "30000000000004"}


def test_an_imported_night_shift_at_a_registered_night_site_is_one_work_day(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, sites, f = str(tmp_path / "n.sqlite"), tmp_path / "sites.csv", tmp_path / "n.jsonl"
    sites.write_text("site,name,kind,prefecture,main_contractor,day_cut_hour,valid_from\n"
                     f"{NIGHT_SITE},夜間現場,site,東京都,{MAIN},12,2026-01-01\n", encoding="utf-8")
    assert main(["sink", "sites", "import", "--store", db, str(sites)]) == 0
    f.write_text("\n".join(touch_json(t) for t in night_shift("gate-n", NIGHT_SITE, 1, 1, 24)) + "\n")
    assert main(["sink", "import", "--store", db, str(f), "--no-progress"]) == 0
    assert main(["sink", "work-history", "--store", db]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].split() == ["2026-11-24", NIGHT_SITE, tid(1), "21:00", "05:30", "2", "12"]


@st.composite
def rule_lists(draw: st.DrawFn) -> list[SiteRule]:
    days = sorted(draw(st.sets(st.integers(0, 60), min_size=1, max_size=4)))
    return [SiteRule(DAY_SITE, "x", draw(st.sampled_from(["site", "site", "training"])), "", MAIN,
                     draw(st.integers(0, 23)), work_day(BASE + d * DAY_MS, 0)) for d in days]


@settings(max_examples=300, deadline=None)
@given(rule_lists(), st.lists(st.integers(BASE - 5 * DAY_MS, BASE + 70 * DAY_MS), min_size=2))
def test_a_sites_work_days_never_go_backwards_and_a_rule_starts_on_its_day(
        rules: list[SiteRule], stamps: list[int]) -> None:
    days = []
    for ts in sorted(stamps):
        cut = cut_for(rules, ts, "gate", 4)
        day = work_day(ts, cut)
        chosen = [r for r in rules if (0 if r.kind == "training" else r.day_cut_hour) == cut]
        # the rule that cut it is in force on that day, or no rule is yet (the first one)
        assert any(r.valid_from <= day for r in chosen) or day < rules[0].valid_from
        days.append(day)
    assert days == sorted(days)


SITE_CSV_HEAD = "site,name,kind,prefecture,main_contractor,day_cut_hour,valid_from\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**14 - 1), st.text(min_size=1, max_size=20).filter(
           lambda t: t.strip() == t and t.strip() != "" and "\x00" not in t),
           st.sampled_from(["site", "training"]), st.integers(0, 23), st.dates()),
           max_size=6, unique_by=lambda r: (r[0], r[4])))
def test_site_csv_written_by_any_tool_reads_back_the_same(rows: list[tuple]) -> None:  # type: ignore[type-arg]
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SITE_CSV_HEAD.strip().split(","))
    for site, name, kind, cut, valid in rows:
        w.writerow([f"{site:014d}", name, kind, "東京都", MAIN, cut, valid.isoformat()])
    try:
        got = parse_sites(buf.getvalue())
    except CsvError as exc:   # only a name csv/strip cannot keep (line breaks, > 200 chars)
        assert "column name" in str(exc)
        return
    assert [(r.site, r.name, r.kind, r.day_cut_hour, r.valid_from) for r in got] == [
        (f"{s:014d}", n, k, c, v.isoformat()) for s, n, k, c, v in rows]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_as_a_registry_csv_is_rows_or_one_csv_error(text: str) -> None:
    for parse in (parse_sites, parse_chain):
        try:
            parse(SITE_CSV_HEAD + text if parse is parse_sites else text)
        except CsvError as exc:
            assert str(exc).startswith("line ")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_machine_without_its_own_contractor_bills_the_sites_main_contractor(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`ccus ops site add` writes no `[vending] contractor`: the bill goes to the main contractor
    of the site's registry row in force that day, the machine's own setting wins, and a registry
    change of the main contractor (or a site registered after its drinks) re-derives the bill."""
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    other, own = "20000000000002", "20000000000009"

    def vend(seq: int, device: str, day: int, **facts: str) -> Touch:
        return touch(seq, device=device, site=DAY_SITE, role="vending", who=seq,
                     ts=jst_ms(2026, 11, day, 12), facts={"slot": "3", "result": "dispensed", **facts})

    def bill(s: Store) -> list[tuple[str, str, int]]:
        return sorted((r.contractor, r.device, r.dispensed) for r in s.vending_ledger("2026-11"))

    with fresh_store(kind, tmp_path, url) as s:
        s.ingest([vend(1, "vend-a", 10), vend(2, "vend-a", 24), vend(1, "vend-b", 10, contractor=own)],
                 now_ms=NOW)
        # before the site is registered nobody is known to pay for vend-a's drinks
        assert bill(s) == [("", "vend-a", 2), (own, "vend-b", 1)]
        s.import_sites([RULES[0]])
        assert bill(s) == [(MAIN, "vend-a", 2), (own, "vend-b", 1)]
        assert [r.contractor for r in s.vending_ledger("2026-11", MAIN)] == [MAIN]
        # from the 20th another main contractor takes the site over: the drink of the 24th is theirs
        res = s.import_sites([SiteRule(DAY_SITE, "日勤現場", "site", "東京都", other, 4, "2026-11-20")])
        assert res.sites == (DAY_SITE,)
        assert bill(s) == [(MAIN, "vend-a", 1), (other, "vend-a", 1), (own, "vend-b", 1)]
        s.ingest([vend(3, "vend-a", 25)], now_ms=NOW)          # live, after the change
        assert bill(s) == [(MAIN, "vend-a", 1), (other, "vend-a", 2), (own, "vend-b", 1)]
        assert s.rederive_all() and bill(s) == [(MAIN, "vend-a", 1), (other, "vend-a", 2),
                                                 (own, "vend-b", 1)]
