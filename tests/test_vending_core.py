"""Vend state machine, allowance ledger, periods and the SQLite journal: properties and recovery."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vending import transaction as tx
from vending.journal import VendJournal
from vending.ledger import AllowanceKey, Ledger, LedgerError, LimitReached
from vending.period import PeriodSpec

JST = ZoneInfo("Asia/Tokyo")


def jst_ms(*a: int) -> int:
    return int(datetime(*a, tzinfo=JST).timestamp() * 1000)


# ---------------------------------------------------------------- transaction table


def test_table_covers_every_pair_explicitly():
    for s in tx.STATES:
        for e in tx.EVENTS:
            try:
                t = tx.transition(s, e)
            except tx.InvalidTransition as err:
                assert (s, e) not in tx.TABLE and (s, e) not in tx.IDEMPOTENT
                assert s in str(err) and e in str(err)
                continue
            assert t.new in tx.STATES
            if t.duplicate:
                assert t.new == s and t.effect is None


def test_final_states_never_move():
    for s in tx.FINAL:
        for e in tx.EVENTS:
            try:
                t = tx.transition(s, e)
            except tx.InvalidTransition:
                continue
            assert t.new == s and t.effect is None


def test_no_guessing_power_loss_timeout_and_link_failure_never_settle_a_started_vend():
    for e in (tx.POWER_LOSS, tx.TIMEOUT, tx.LINK_FAILED, tx.INTERRUPTED):
        assert tx.transition(tx.VENDING, e).new == tx.INDETERMINATE
        assert tx.transition(tx.INDETERMINATE, e).new == tx.INDETERMINATE


def test_duplicate_confirmation_counts_once():
    t1 = tx.transition(tx.VENDING, tx.CONFIRMED)
    t2 = tx.transition(t1.new, tx.CONFIRMED)
    assert (t1.effect, t2.effect, t2.duplicate) == (tx.COMMIT, None, True)


def test_confirmation_after_release_is_an_error():
    with pytest.raises(tx.InvalidTransition):
        tx.transition(tx.RELEASED, tx.CONFIRMED)


@given(st.lists(st.sampled_from(tx.EVENTS), max_size=30))
def test_any_event_sequence_commits_or_releases_at_most_once(events):
    state = tx.RESERVED
    effects = []
    for e in events:
        try:
            t = tx.transition(state, e)
        except tx.InvalidTransition:
            continue
        if t.effect:
            effects.append(t.effect)
        state = t.new
    assert len(effects) <= 1
    if effects == [tx.COMMIT]:
        assert state == tx.COMMITTED
    if effects == [tx.RELEASE]:
        assert state == tx.RELEASED
    if not effects:
        assert state in tx.HELD


# ---------------------------------------------------------------- pure ledger

KEYS = [AllowanceKey(f"1000000000000{i}", "machine:VM01", "D2026-11-27") for i in range(3)]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 2)),
        st.tuples(st.just("commit"), st.integers(0, 30)),
        st.tuples(st.just("release"), st.integers(0, 30)),
    ),
    max_size=60,
)


@given(ops, st.integers(0, 3))
def test_ledger_invariants(operations, limit):
    led = Ledger()
    next_id = 1
    committed_ids: set[int] = set()
    for op, arg in operations:
        if op == "reserve":
            try:
                led.reserve(KEYS[arg], next_id, limit)
                next_id += 1
            except LimitReached as e:
                assert e.used >= limit
        else:
            try:
                changed = led.commit(arg) if op == "commit" else led.release(arg)
            except LedgerError:
                continue
            if op == "commit":
                assert changed == (arg not in committed_ids)
                committed_ids.add(arg)
        for k in KEYS:
            u = led.usage(k)
            assert u.held >= 0 and u.committed >= 0
            assert u.held + u.committed <= limit
    assert sum(led.usage(k).committed for k in KEYS) == len(committed_ids)


def test_ledger_refuses_commit_after_release_and_release_after_commit():
    led = Ledger()
    led.reserve(KEYS[0], 1, 2)
    led.reserve(KEYS[0], 2, 2)
    assert led.commit(1) and not led.commit(1)
    assert led.release(2) and not led.release(2)
    with pytest.raises(LedgerError, match="released"):
        led.commit(2)
    with pytest.raises(LedgerError, match="committed"):
        led.release(1)
    with pytest.raises(LimitReached, match="limit reached"):
        led.reserve(KEYS[0], 3, 1)


# ---------------------------------------------------------------- periods


def test_day_is_cut_at_the_configured_hour_in_tokyo():
    p = PeriodSpec("day", cut_hour=5)
    assert p.key(jst_ms(2026, 11, 27, 4, 59)) == "D2026-11-26"
    assert p.key(jst_ms(2026, 11, 27, 5, 0)) == "D2026-11-27"
    assert p.key(jst_ms(2026, 11, 28, 4, 0)) == "D2026-11-27"  # night shift lands on one day
    assert p.bounds_ms(jst_ms(2026, 11, 27, 12)) == (
        jst_ms(2026, 11, 27, 5),
        jst_ms(2026, 11, 28, 5),
    )


def test_week_starts_monday_at_the_cut_hour():
    p = PeriodSpec("week", cut_hour=5)
    # 2026-11-23 is a Monday
    assert p.key(jst_ms(2026, 11, 23, 4, 59)) == "W2026-11-16"
    assert p.key(jst_ms(2026, 11, 23, 5, 0)) == "W2026-11-23"
    assert p.key(jst_ms(2026, 11, 30, 4, 59)) == "W2026-11-23"


def test_bad_period_specs_are_refused():
    with pytest.raises(ValueError, match="kind"):
        PeriodSpec("month")
    with pytest.raises(ValueError, match="cut_hour"):
        PeriodSpec("day", cut_hour=24)


@given(
    st.integers(jst_ms(2020, 1, 1), jst_ms(2040, 1, 1)),
    st.sampled_from(["day", "week"]),
    st.integers(0, 23),
)
def test_period_bounds_contain_the_instant(ts, kind, cut):
    p = PeriodSpec(kind, cut_hour=cut)
    start, end = p.bounds_ms(ts)
    assert start <= ts < end
    assert p.key(start) == p.key(ts) == p.key(end - 1)
    assert p.key(end) != p.key(ts)


# ---------------------------------------------------------------- SQLite journal


def test_journal_is_wal_and_synchronous_full(tmp_path):
    with VendJournal(str(tmp_path / "v.db")) as j:
        assert j.pragma("journal_mode") == "wal"
        assert j.pragma("synchronous") == 2  # FULL


def test_reservation_is_on_disk_before_the_vend_starts(tmp_path):
    path = str(tmp_path / "v.db")
    j = VendJournal(path)
    r = j.reserve(KEYS[0], 1, now_ms=1)
    other = sqlite3.connect(path)  # another connection sees it: committed, not cached
    assert other.execute("SELECT state FROM vends WHERE vend_id=?", (r.vend_id,)).fetchone() == (tx.RESERVED,)
    other.close()
    j.close()


def test_recovery_after_power_loss(tmp_path):
    path = str(tmp_path / "v.db")
    j = VendJournal(path)
    a = j.reserve(KEYS[0], 5, 1)
    b = j.reserve(KEYS[0], 5, 1)
    c = j.reserve(KEYS[0], 5, 1)
    j.apply(b.vend_id, tx.START, 2)
    j.apply(c.vend_id, tx.START, 2)
    j.apply(c.vend_id, tx.CONFIRMED, 3)
    j._db.close()  # "power loss": no clean shutdown path
    j2 = VendJournal(path)
    rec = {x.record.vend_id: x.record.state for x in j2.recover(10)}
    assert rec == {a.vend_id: tx.RELEASED, b.vend_id: tx.INDETERMINATE}
    assert j2.get(c.vend_id).state == tx.COMMITTED
    u = j2.usage(KEYS[0])
    assert (u.held, u.committed) == (1, 1)  # the indeterminate one stays held
    assert j2.recover(11) == []  # idempotent
    j2.close()


def test_limit_reached_second_tap_same_day(tmp_path):
    with VendJournal(str(tmp_path / "v.db")) as j:
        r = j.reserve(KEYS[0], 1, 1)
        j.apply(r.vend_id, tx.START, 2)
        j.apply(r.vend_id, tx.CONFIRMED, 3)
        j.apply(r.vend_id, tx.CONFIRMED, 4)  # duplicate confirmation
        assert j.usage(KEYS[0]).committed == 1
        with pytest.raises(LimitReached, match="used 1 of 1"):
            j.reserve(KEYS[0], 1, 5)
        nxt = AllowanceKey(KEYS[0].technician, KEYS[0].scope, "D2026-11-28")
        assert j.reserve(nxt, 1, 6).state == tx.RESERVED
        assert [b.vend_id for b in j.billable()] == [r.vend_id]
        assert [e[0] for e in j.events(r.vend_id)] == ["reserve", "start", "confirmed", "confirmed"]


journal_ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 2)),
        st.tuples(st.sampled_from(tx.EVENTS), st.integers(0, 12)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=40,
)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(journal_ops, st.integers(0, 3))
def test_journal_matches_the_pure_model_and_keeps_the_invariants(tmp_path_factory, operations, limit):
    path = str(tmp_path_factory.mktemp("j") / "v.db")
    j = VendJournal(path)
    model: dict[int, tuple[int, str]] = {}  # vend_id -> (key index, state)
    commits: dict[int, int] = {}
    t = 0
    try:
        for op, arg in operations:
            t += 1
            if op == "reopen":
                j.close()
                j = VendJournal(path)
                for a in j.recover(t):
                    k, s = model[a.record.vend_id]
                    model[a.record.vend_id] = (k, tx.transition(s, tx.POWER_LOSS).new)
            elif op == "reserve":
                used = sum(1 for k, s in model.values() if k == arg and s != tx.RELEASED)
                try:
                    r = j.reserve(KEYS[arg], limit, t)
                    assert used < limit
                    model[r.vend_id] = (arg, tx.RESERVED)
                except LimitReached:
                    assert used >= limit
            else:
                ids = sorted(model)
                if not ids:
                    continue
                vid = ids[arg % len(ids)]
                k, s = model[vid]
                try:
                    expect = tx.transition(s, op)
                except tx.InvalidTransition:
                    with pytest.raises(tx.InvalidTransition):
                        j.apply(vid, op, t)
                    continue
                got = j.apply(vid, op, t)
                assert got.transition == expect
                model[vid] = (k, expect.new)
                if expect.effect == tx.COMMIT:
                    commits[vid] = commits.get(vid, 0) + 1
            for i, key in enumerate(KEYS):
                u = j.usage(key)
                held = sum(1 for k, s in model.values() if k == i and s in tx.HELD)
                com = sum(1 for k, s in model.values() if k == i and s == tx.COMMITTED)
                assert (u.held, u.committed) == (held, com)
                assert u.held >= 0 and u.held + u.committed <= limit
        assert all(n == 1 for n in commits.values()), "a vend was committed twice"
        assert {r.vend_id for r in j.billable()} == set(commits)
    finally:
        j.close()
