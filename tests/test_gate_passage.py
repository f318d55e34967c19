"""The gate's passage state machine (edge/roles/passage.py), pure: hypothesis over any sequence
of taps, door edges, timeouts, emergencies and board resets, plus the named cases."""

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.roles import passage as p

T = p.Timing(pulse_ms=300, passage_timeout_s=5.0, held_open_s=20.0)

KINDS = [p.TAP, p.DOOR_OPEN, p.DOOR_CLOSE, p.DOOR_LEVEL_OPEN, p.EMERGENCY_ON, p.EMERGENCY_OFF,
         p.TICK, p.RESET, p.LOST]
steps = st.lists(st.tuples(st.sampled_from(KINDS), st.floats(0, 30, allow_nan=False),
                           st.integers(0, 1)), max_size=60)


def run(seq: list[tuple[str, float, int]]) -> list[tuple[p.Event, p.State, list[p.Action]]]:
    m = p.Passage(T)
    now, tap, log = 0.0, 0, []
    for kind, dt, relay in seq:
        now += dt
        if kind == p.TAP:
            tap += 1
        before = m.state
        e = p.Event(kind, now, tap=tap if kind == p.TAP else 0, relay=relay)
        log.append((e, before, m.feed(e)))
    e = p.Event(p.TICK, now + T.passage_timeout_s + T.held_open_s + 1)
    log.append((e, m.state, m.feed(e)))
    return log


@settings(max_examples=400)
@given(steps)
def test_every_tap_is_pulsed_once_and_ends_once(seq: list[tuple[str, float, int]]) -> None:
    log = run(seq)
    taps = [e for e, s, _ in log if e.kind == p.TAP]
    pulsed = {e.tap for e, s, _ in log if e.kind == p.TAP and s.phase != p.EMERGENCY}
    pulses = [(e, a) for e, _, acts in log for a in acts if a.kind == "pulse"]
    # a pulse only for a tap, of the configured length, on the tap's relay, never in an emergency
    assert all(e.kind == p.TAP and a.tap == e.tap and a.relay == e.relay
               and a.pulse_ms == T.pulse_ms <= 5000 for e, a in pulses)
    assert {a.tap for _, a in pulses} == pulsed and len(pulses) == len(pulsed)
    # never loses a tap: every pulsed tap ends exactly once, and nothing else ends
    ended = [a.tap for _, _, acts in log for a in acts if a.kind == "outcome"]
    assert sorted(ended) == sorted(pulsed)
    assert len(taps) >= len(pulsed)
    m = p.Passage(T)
    for e, _, _ in log:
        m.feed(e)
    assert m.state.pending == ()  # after the final tick nothing is left waiting


@settings(max_examples=400)
@given(steps)
def test_no_passage_without_a_door_edge(seq: list[tuple[str, float, int]]) -> None:
    log = run(seq)
    for e, s, acts in log:
        passed = [a for a in acts if a.outcome == p.PASSED]
        if passed:
            # only a door-open edge (not a boot level report, a tick or a reset) passes, one tap
            assert e.kind == p.DOOR_OPEN and len(passed) == 1
            assert not (s.door_open and s.phase != p.CLOSED)
            assert passed[0].tap == s.pending[0][0]  # the oldest pending tap
        not_passed = [a for a in acts if a.outcome == p.NOT_PASSED]
        if not_passed:
            assert e.kind == p.TICK
            deadlines = dict(s.pending)
            assert all(e.now >= deadlines[a.tap] for a in not_passed)


@settings(max_examples=400)
@given(steps)
def test_relay_never_energized_past_its_pulse(seq: list[tuple[str, float, int]]) -> None:
    """The board as the host drives it: a relay is on from a pulse for pulse_ms, off at once
    at a reset. No event other than a tap ever turns it on, so at any step the relay's on-time
    ends at the last pulse's end at the latest (or at the reset)."""
    relay_until: dict[int, float] = {}
    for e, _, acts in run(seq):
        if e.kind == p.RESET:
            relay_until.clear()
        for a in acts:
            if a.kind == "pulse":
                relay_until[a.relay] = e.now + a.pulse_ms / 1000
        for until in relay_until.values():
            assert until <= e.now + T.pulse_ms / 1000


@settings(max_examples=400)
@given(steps)
def test_alarms_are_raised_once_and_cleared(seq: list[tuple[str, float, int]]) -> None:
    active: set[str] = set()
    for e, s, acts in run(seq):
        for a in acts:
            if a.kind == "alarm":
                assert a.alarm not in active
                active.add(a.alarm)
                if a.alarm == p.ALARM_FORCED:
                    assert e.kind == p.DOOR_OPEN and not s.pending and s.phase == p.CLOSED
                if a.alarm == p.ALARM_HELD_OPEN:
                    assert e.kind == p.TICK and s.opened_at is not None
                    assert e.now - s.opened_at >= T.held_open_s
            elif a.kind == "clear":
                active.remove(a.alarm)
    m = p.Passage(T)
    for e, _, _ in run(seq):
        m.feed(e)
    assert m.state.alarms == frozenset(active)


def feed(m: p.Passage, *events: tuple[str, float]) -> list[p.Action]:
    out: list[p.Action] = []
    for i, (kind, now) in enumerate(events):
        out += m.feed(p.Event(kind, now, tap=i + 1 if kind == p.TAP else 0))
    return out


def test_allowed_then_door_is_passed() -> None:
    m = p.Passage(T)
    acts = feed(m, (p.TAP, 0), (p.DOOR_OPEN, 0.8), (p.DOOR_CLOSE, 1.5))
    assert [(a.kind, a.outcome) for a in acts] == [("pulse", ""), ("outcome", p.PASSED)]
    assert m.state.phase == p.CLOSED and not m.state.pending


def test_allowed_no_door_is_not_passed_after_the_timeout() -> None:
    m = p.Passage(T)
    assert [a.kind for a in feed(m, (p.TAP, 0), (p.TICK, 4.9))] == ["pulse"]
    assert [a.outcome for a in m.feed(p.Event(p.TICK, 5.0))] == [p.NOT_PASSED]


def test_forced_and_held_open_are_alarms() -> None:
    m = p.Passage(T)
    acts = feed(m, (p.DOOR_OPEN, 1), (p.TICK, 21), (p.DOOR_CLOSE, 22))
    assert [(a.kind, a.alarm) for a in acts] == [
        ("alarm", p.ALARM_FORCED), ("alarm", p.ALARM_HELD_OPEN),
        ("clear", p.ALARM_FORCED), ("clear", p.ALARM_HELD_OPEN)]


def test_emergency_no_pulse_and_pending_unconfirmed() -> None:
    m = p.Passage(T)
    acts = feed(m, (p.TAP, 0), (p.EMERGENCY_ON, 1), (p.TAP, 2), (p.DOOR_OPEN, 3),
                (p.EMERGENCY_OFF, 4))
    assert [(a.kind, a.outcome or a.alarm) for a in acts] == [
        ("pulse", ""), ("outcome", p.UNCONFIRMED), ("alarm", p.ALARM_EMERGENCY),
        ("clear", p.ALARM_EMERGENCY)]
    assert m.state.phase == p.OPEN  # the door still open after the release: held timer runs


def test_reset_closes_and_boot_level_is_not_an_edge() -> None:
    m = p.Passage(T)
    feed(m, (p.TAP, 0))
    acts = feed(m, (p.RESET, 1), (p.DOOR_LEVEL_OPEN, 1.1))
    assert acts == [] and len(m.state.pending) == 1 and m.state.phase == p.OPEN
