"""Property tests: order, duplication and batching never change the derived tables (both backends);
arbitrary bytes become dead letters and never raise."""

import dataclasses
import tempfile
from pathlib import Path

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sink_support import CENTER, NOW, SITE, derived, fresh_store, touch

from cloud_sink.importer import import_file
from cloud_sink.model import DAY_MS, DeadLetter
from cloud_sink.store import open_store
from cloud_sink.validate import validate
from cloud_sink.workday import jst_ms
from protocol.touch import MAX_TS_MS, Decision, Touch

DEVICES = {"gate-01": ("gate", SITE), "gate-02": ("gate", SITE), "train-01": ("training", CENTER),
           "vend-01": ("vending", SITE)}
BASE = jst_ms(2026, 11, 20)


@st.composite
def touch_sets(draw: st.DrawFn) -> list[Touch]:
    keys = draw(st.lists(st.tuples(st.sampled_from(sorted(DEVICES)), st.integers(1, 40)),
                         min_size=1, max_size=30, unique=True))
    out = []
    for dev, seq in keys:
        role, site = DEVICES[dev]
        when = draw(st.one_of(
            st.builds(lambda d, h: BASE + d * DAY_MS + h * 3600_000, st.integers(0, 3),
                      st.integers(0, 23)),
            st.sampled_from([NOW + 2 * DAY_MS, NOW - 401 * DAY_MS])))   # flagged clocks
        facts: dict[str, str | int | bool] = {}
        if role == "training":
            facts["course"] = draw(st.sampled_from(["C-01", "C-02"]))
        if role == "vending":
            facts.update(slot=draw(st.integers(1, 4)),
                         result=draw(st.sampled_from(["dispensed", "failed", "indeterminate", "odd"])),
                         contractor=draw(st.sampled_from(["20000000000001", "20000000000002"])))
        out.append(touch(seq, device=dev, site=site, role=role, ts=when,
                         who=draw(st.one_of(st.none(), st.integers(1, 4))),
                         dir=draw(st.sampled_from(["in", "out"])),
                         decision=draw(st.sampled_from(["allow", "allow", "deny"])), facts=facts))
    return out


@st.composite
def replays(draw: st.DrawFn) -> tuple[list[Touch], list[list[Touch]]]:
    """A set of touches, and the same set permuted, with repeats, cut into batches."""
    base = draw(touch_sets())
    extra = draw(st.lists(st.sampled_from(base), max_size=len(base)))
    shuffled = draw(st.permutations(base + extra))
    cuts = sorted(draw(st.lists(st.integers(0, len(shuffled)), max_size=4)))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
    return base, batches


def _derive_both(kind: str, pg_url: str | None, base: list[Touch],
                 batches: list[list[Touch]]) -> tuple[object, object, object]:
    with tempfile.TemporaryDirectory() as tmp:
        with fresh_store(kind, Path(tmp), pg_url) as s:
            s.ingest(base, now_ms=NOW)
            once = derived(s)
        with fresh_store(kind, Path(tmp), pg_url) as s:
            for b in batches:
                s.ingest(b, now_ms=NOW)
            replayed = derived(s)
            s.rederive()
            rederived = derived(s)
    return once, replayed, rederived


@settings(max_examples=60, deadline=None)
@given(replays())
def test_sqlite_derived_tables_do_not_depend_on_order_repeats_or_batching(
        case: tuple[list[Touch], list[list[Touch]]]) -> None:
    once, replayed, rederived = _derive_both("sqlite", None, *case)
    assert replayed == once
    assert rederived == once


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replays())
def test_postgres_derived_tables_do_not_depend_on_order_repeats_or_batching_and_match_sqlite(
        pg_url: str, case: tuple[list[Touch], list[list[Touch]]]) -> None:
    once, replayed, rederived = _derive_both("postgres", pg_url, *case)
    assert replayed == once
    assert rederived == once
    lite, _, _ = _derive_both("sqlite", None, *case)
    assert once == lite


@st.composite
def conflicting_replays(draw: st.DrawFn) -> list[list[Touch]]:
    """Batches in which some (device, seq) come again with other content (another clock,
    direction or decision): the first stored wins, and what is derived must follow it."""
    base = draw(touch_sets())
    others = [dataclasses.replace(t, ts_ms=t.ts_ms + draw(st.integers(-5, 5)) * 3600_000,
                                  facts={**t.facts, "dir": draw(st.sampled_from(["in", "out"]))},
                                  decision=draw(st.sampled_from(list(Decision))))
              for t in draw(st.lists(st.sampled_from(base), max_size=len(base)))]
    shuffled = draw(st.permutations(base + others))
    cuts = sorted(draw(st.lists(st.integers(0, len(shuffled)), max_size=4)))
    return [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=conflicting_replays(), kind=st.sampled_from(["sqlite", "postgres"]))
def test_derived_tables_follow_the_stored_touch_when_a_key_comes_again_with_other_content(
        pg_url: str, batches: list[list[Touch]], kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            fresh_store(kind, Path(tmp), pg_url if kind == "postgres" else None) as s:
        for b in batches:
            s.ingest(b, now_ms=NOW)
        folded = derived(s)
        s.rederive()    # recomputed from the stored touches alone
        assert derived(s) == folded


def test_the_generated_sets_reach_every_derived_table() -> None:
    """Guard for the property above: its examples do produce rows in all four tables."""
    seen: set[str] = set()

    @settings(max_examples=40, deadline=None)
    @given(touch_sets())
    def collect(ts: list[Touch]) -> None:
        with tempfile.TemporaryDirectory() as tmp, fresh_store("sqlite", Path(tmp), None) as s:
            s.ingest(ts, now_ms=NOW)
            seen.update(name for name, rows in derived(s).items() if rows)

    collect()
    assert seen == {"work_history", "training_monthly", "training_course", "vending_ledger"}


TOPIC = "ccus/v1/13100000000001/gate-01/touch"
wire_maps = st.dictionaries(
    st.sampled_from(["v", "dev", "site", "role", "seq", "ts", "tq", "card", "ct", "tid", "dec",
                     "rsn", "lv", "cv", "x", "zz"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=20),
              st.binary(max_size=40), st.floats(), st.lists(st.integers(), max_size=3),
              st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600), wire_maps.map(cbor2.dumps)),
       st.sampled_from([TOPIC, "ccus/v1/x/y/touch", "junk", "ccus/v1/13100000000001/gate-01/ack"]))
def test_arbitrary_bytes_become_dead_letters_without_raising(payload: bytes, topic: str) -> None:
    item = validate(topic, payload)
    assert isinstance(item, Touch | DeadLetter)
    if isinstance(item, DeadLetter):
        assert item.payload == payload and item.reason


def test_a_store_takes_a_batch_of_garbage_and_keeps_the_good_touches_behind_it(tmp_path: Path) -> None:
    s = open_store(tmp_path / "s.sqlite")
    junk = [b"", b"\xff", cbor2.dumps([1, 2]), cbor2.dumps({"v": 2}), cbor2.dumps({"v": 1}),
            cbor2.dumps({"v": True}), b"\x9f" * 5000]
    items = [validate(TOPIC, p) for p in junk]
    assert all(isinstance(i, DeadLetter) for i in items)
    res = s.ingest([touch(1), touch(2)], [i for i in items if isinstance(i, DeadLetter)], now_ms=NOW)
    assert (res.stored, res.dead) == (2, len(junk))
    reasons = {r[3] for r in s.dead_letters()}
    assert {"malformed_cbor", "not_a_map", "unknown_schema", "missing_field",
            "too_large"} <= reasons
    s.close()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["x.cbor", "x.jsonl"]))
def test_importing_arbitrary_bytes_never_raises(data: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / name
        f.write_bytes(data)
        s = open_store(Path(tmp) / "imp.sqlite")
        res = import_file(s, f, progress=False, now_ms=NOW)
        items = res.stored + res.repeated + res.dead
        assert items >= 1 if (data if name.endswith(".cbor") else data.strip()) else items == 0
        assert s.counts()["dead_letters"] == res.dead
        assert s.counts()["touches"] == res.stored
        s.close()




@settings(max_examples=500)
@given(st.one_of(st.integers(0, 2**42), st.integers(0, MAX_TS_MS),
                 st.integers(MAX_TS_MS - DAY_MS, MAX_TS_MS)), st.integers(0, 23))
def test_cached_work_day_equals_work_day_for_every_clock_a_touch_may_carry(ts: int, cut: int) -> None:
    from cloud_sink.derive.rows import day_of
    from cloud_sink.workday import work_day

    assert day_of(ts, cut) == work_day(ts, cut)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), wire_maps.map(cbor2.dumps)),
       st.sampled_from([TOPIC, "ccus/v1/13100000000001/gate-02/touch", "x/y"]),
       st.sampled_from(["bad_field", "internal_error", "store_refused", "unknown_schema"]))
def test_a_dead_letter_accounts_at_most_for_its_own_devices_seq_and_never_raises(
        payload: bytes, topic: str, reason: str) -> None:
    from cloud_sink.deadletters import dead_letter_key

    key = dead_letter_key(DeadLetter(topic, payload, reason, ""))
    if key is not None:
        m = cbor2.loads(payload)
        assert topic == f"ccus/v1/{key[0]}/{key[1]}/touch" and m["seq"] == key[2] >= 1
        assert reason != "unknown_schema"


@given(touch_sets(), st.sampled_from(["bad_field", "internal_error", "store_refused"]))
def test_a_devices_own_touch_kept_as_a_dead_letter_accounts_for_its_seq(
        ts: list[Touch], reason: str) -> None:
    from cloud_sink.deadletters import dead_letter_key
    from protocol import topics
    from protocol.touch import encode

    for t in ts:
        own, other = topics.touch(t.site, t.device), topics.touch(t.site, t.device + "x")
        assert dead_letter_key(DeadLetter(own, encode(t), reason, "")) == (t.site, t.device, t.seq)
        assert dead_letter_key(DeadLetter(other, encode(t), reason, "")) is None
        assert dead_letter_key(DeadLetter(own, encode(t), "unregistered_device", "")) is None
