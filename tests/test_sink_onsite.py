"""Who is on site now (SqlStore.on_site) on both backends, real SQLite and real PostgreSQL: the last
passage of each technician-day by the touch's own time, whatever the arrival order; a store at
the schema before it (SQLite 6, PostgreSQL 5) migrates and equals a rederive."""

import sqlite3
import tempfile
from pathlib import Path

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sink_support import NOW, SITE, fresh_store, postgres_at, sqlite_at, tid, touch

from cloud_sink.derive.rows import touch_row
from cloud_sink.model import Policy
from cloud_sink.store import Store, open_store
from cloud_sink.stores.base import STORE_COLUMNS
from cloud_sink.workday import jst_ms
from protocol.touch import Touch

DAY = "2026-11-26"
at = lambda h, m=0: jst_ms(2026, 11, 26, h, m)  # noqa: E731


def model(touches: list[Touch], site: str, day: str, cut_hour: int = 4) -> list[tuple[str, int]]:
    """The roll call told as a story: replay each technician's allowed passages of the day in the
    order they happened (an exit before an entry in the same millisecond); whoever's last one
    is an entry is on site since that entry."""
    from cloud_sink.workday import work_day
    last: dict[str, tuple[str, int]] = {}
    mine = [t for t in touches if t.site == site and t.decision.value == "allow" and t.tid
            and t.role.value == "gate" and work_day(t.ts_ms, cut_hour) == day]
    seen = set()
    for t in sorted(mine, key=lambda t: (t.ts_ms, t.facts["dir"] == "in")):
        if (t.device, t.seq) in seen:       # a repeat of a stored touch is the same passage
            continue
        seen.add((t.device, t.seq))
        last[str(t.tid)] = (str(t.facts["dir"]), t.ts_ms)
    return sorted(((who, ms) for who, (d, ms) in last.items() if d == "in"),
                  key=lambda r: (r[1], r[0]))


def test_out_at_noon_and_back_in_is_on_site_since_the_second_entry(store: Store) -> None:
    store.ingest([touch(1, who=1, ts=at(7, 30)), touch(2, who=1, ts=at(12), dir="out"),
                  touch(3, who=1, ts=at(13)),                                  # back from lunch
                  touch(4, who=2, ts=at(7, 40)), touch(5, who=2, ts=at(17), dir="out"),  # left
                  touch(6, who=3, ts=at(8)),                                   # never left
                  touch(7, who=4, ts=at(9), decision="deny")], now_ms=NOW)     # denied: not in
    assert store.on_site(SITE, DAY) == [(tid(3), at(8)), (tid(1), at(13))]
    assert store.on_site(SITE, "2026-11-27") == [] and store.on_site("13100000000009", DAY) == []


def test_a_late_entry_arriving_after_the_exit_is_placed_by_its_own_time(store: Store) -> None:
    # the gate's outbox held the 08:00 entry; the 17:00 exit from the other gate arrived first
    store.ingest([touch(1, device="gate-02", who=1, ts=at(17), dir="out")], now_ms=NOW)
    assert store.on_site(SITE, DAY) == []
    store.ingest([touch(1, who=1, ts=at(8))], now_ms=NOW)
    assert store.on_site(SITE, DAY) == []                  # left at 17:00, whatever came last
    # and the other way round: an exit of the morning arriving after the afternoon's entry
    store.ingest([touch(2, who=2, ts=at(13))], now_ms=NOW)
    store.ingest([touch(2, device="gate-02", who=2, ts=at(12), dir="out")], now_ms=NOW)
    assert store.on_site(SITE, DAY) == [(tid(2), at(13))]


WHO = st.integers(1, 4)
PASSAGE = st.tuples(st.sampled_from(["gate-01", "gate-02"]), WHO,
                    # a narrow range too, so entries and exits share a millisecond now and then
                    st.one_of(st.integers(0, 6), st.integers(0, 400)).map(lambda k: at(5) + k * 150_000),
                    st.sampled_from(["in", "out"]), st.sampled_from(["allow", "allow", "deny"]))


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[Touch], list[list[Touch]]]:
    """Passages of one day, and the same with repeats, in any arrival order and batches."""
    raw = draw(st.lists(PASSAGE, min_size=1, max_size=25))
    base = [touch(i + 1, device=dev, who=w, ts=ts, dir=d, decision=dec)
            for i, (dev, w, ts, d, dec) in enumerate(raw)]
    extra = draw(st.lists(st.sampled_from(base), max_size=5))
    shuffled = draw(st.permutations(base + extra))
    cuts = sorted(draw(st.lists(st.integers(0, len(shuffled)), max_size=4)))
    return base, [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]


def _check(kind: str, pg_url: str | None, case: tuple[list[Touch], list[list[Touch]]]) -> None:
    base, batches = case
    with tempfile.TemporaryDirectory() as tmp, fresh_store(kind, Path(tmp), pg_url) as s:
        for b in batches:
            s.ingest(b, now_ms=NOW)
        assert s.on_site(SITE, DAY) == model(base, SITE, DAY)
        s.rederive()
        assert s.on_site(SITE, DAY) == model(base, SITE, DAY)


@settings(max_examples=80, deadline=None)
@given(arrivals())
def test_sqlite_on_site_equals_the_model(case: tuple[list[Touch], list[list[Touch]]]) -> None:
    _check("sqlite", None, case)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals())
def test_postgres_on_site_equals_the_model(pg_url: str,
                                           case: tuple[list[Touch], list[list[Touch]]]) -> None:
    _check("postgres", pg_url, case)


# -- a store from before the last entry was kept -----------------------------------------------
OLD = [touch(1, who=1, ts=at(7, 30)), touch(2, who=1, ts=at(12), dir="out"),
       touch(3, who=1, ts=at(13)), touch(4, who=2, ts=at(8)), touch(5, who=2, ts=at(17), dir="out"),
       touch(6, who=3, ts=at(9)), touch(7, who=4, ts=at(9), decision="deny")]
_INSERT = f"INSERT INTO touches ({', '.join(STORE_COLUMNS)}) VALUES ({', '.join(['?'] * len(STORE_COLUMNS))})"


def _old_rows() -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The touches as the old sink stored them and the work-history rows it derived (no last
    entry): first entry, last exit, taps, cut."""
    cut = Policy().cut_hour
    rows = [(*touch_row(t, NOW, Policy()), cut) for t in OLD]
    days: dict[str, list[Touch]] = {}
    for t in OLD:
        if t.decision.value == "allow":
            days.setdefault(str(t.tid), []).append(t)
    wh = [(who, SITE, DAY, min((t.ts_ms for t in ts if t.facts["dir"] == "in"), default=None),
           max((t.ts_ms for t in ts if t.facts["dir"] == "out"), default=None), len(ts), cut)
          for who, ts in days.items()]
    return rows, wh


def _migrated_equals_a_rederive(s: Store) -> None:
    assert s.on_site(SITE, DAY) == [(tid(3), at(9)), (tid(1), at(13))] == model(OLD, SITE, DAY)
    migrated = s.table("work_history")
    s.rederive()
    assert s.table("work_history") == migrated
    # and it goes on folding: tid 3 leaves
    s.ingest([touch(8, who=3, ts=at(18), dir="out")], now_ms=NOW)
    assert s.on_site(SITE, DAY) == [(tid(1), at(13))]


def test_sqlite_store_at_schema_6_migrates_and_equals_a_rederive(tmp_path: Path) -> None:
    path = tmp_path / "v6.sqlite"
    db = sqlite3.connect(path)
    sqlite_at(db, 6)
    touches, wh = _old_rows()
    db.executemany(_INSERT, touches)
    db.executemany("INSERT INTO work_history VALUES (?,?,?,?,?,?,?)", wh)
    db.commit()
    db.close()
    with open_store(path) as s:
        assert s.schema_version == 7
        _migrated_equals_a_rederive(s)


def test_postgres_store_at_schema_5_migrates_and_equals_a_rederive(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("DROP SCHEMA public CASCADE")
        db.execute("CREATE SCHEMA public")
        postgres_at(db, 5)
        touches, wh = _old_rows()
        with db.cursor() as cur:
            cur.executemany(_INSERT.replace("?", "%s"), touches)  # type: ignore[arg-type]
            cur.executemany("INSERT INTO work_history VALUES (%s,%s,%s,%s,%s,%s,%s)", wh)
    with open_store(pg_url) as s:
        assert s.schema_version >= 6
        _migrated_equals_a_rederive(s)
