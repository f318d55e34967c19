"""The sans-IO delivery core (edge/delivery.py) without a broker: hypothesis drives any
interleaving of new touches, connects and drops, PUBACKs (success and refusal), a broker that
loses touches after its PUBACK, end-to-end acks (live, retained, with a new sink epoch, beyond
what the device made) and time passing. Checked after every step: nothing unacknowledged is
forgotten, at most `inflight` messages are on the wire, every rewind restarts at the oldest
unacknowledged seq and seqs otherwise go out in increasing order; at the end, with the faults
gone, every seq is published and acknowledged. Also the reconnect delay and the fault log."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge.delivery import (
    CAUSES,
    TABLE,
    AckAhead,
    Action,
    Cause,
    Delivery,
    FaultLog,
    Forget,
    Hold,
    Policy,
    Publish,
    Reconnect,
    Replay,
    State,
    Why,
)


class World(RuleBasedStateMachine):
    """The core plus a model of everything around it: outbox, wire, broker, sink."""

    def __init__(self) -> None:
        super().__init__()
        self.inflight = 3
        self.core = Delivery(Policy(inflight=self.inflight, ack_timeout_s=5.0,
                                    ack_timeout_max_s=40.0, holdoff_s=2.0, holdoff_max_s=16.0))
        self.now = 0.0
        self.made = 0                 # seqs 1..made exist
        self.forgotten = 0            # the outbox deleted seq <= this
        self.wire: dict[int, int] = {}  # mid -> seq, sent on this connection, no PUBACK yet
        self.next_mid = 1
        self.stored: set[int] = set()  # what the sink committed
        self.claimed = 0              # the highest upto any ack said
        self.epoch = 1
        self.connected = False
        self.last_sent: int | None = None  # the last seq published since the last rewind
        self.published: set[int] = set()
        self.waived: set[int] = set()  # forgotten on an ack-ahead claim before being published

    # -- the adapter: carry out the core's actions ---------------------------------------
    def carry(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Forget):
                assert a.upto <= min(self.claimed, self.made)  # never beyond the sink's word
                self.forgotten = max(self.forgotten, a.upto)
            elif isinstance(a, Replay):
                assert a.start == self.core.acked + 1
                self.last_sent = None
            elif isinstance(a, Publish):
                assert self.connected and self.core.state is State.SENDING
                after = a.after
                for seq in range(max(after, self.forgotten) + 1, self.made + 1)[:a.count]:
                    if self.last_sent is None:  # the first after a rewind: the oldest unacked
                        assert seq == max(self.core.acked, self.forgotten) + 1
                    else:
                        assert seq > self.last_sent
                    mid, self.next_mid = self.next_mid, self.next_mid + 1
                    self.core.sent(seq, mid, self.now)
                    self.wire[mid] = seq
                    self.last_sent = seq
                    self.published.add(seq)
                    assert len(self.wire) <= self.inflight
            elif isinstance(a, Hold):
                assert a.until > self.now
            elif isinstance(a, AckAhead):
                assert a.upto > a.made

    def prefix(self) -> int:
        n = 0
        while n + 1 in self.stored:
            n += 1
        return n

    # -- the world's events ---------------------------------------------------------------
    @rule(n=st.integers(1, 5))
    def make(self, n: int) -> None:
        self.made += n

    @precondition(lambda self: not self.connected)
    @rule()
    def connect(self) -> None:
        self.connected = True
        self.wire.clear()
        self.carry(self.core.connected(self.now))

    @precondition(lambda self: self.connected)
    @rule()
    def drop(self) -> None:
        self.connected = False
        self.wire.clear()
        self.carry(self.core.disconnected(self.now))

    @rule(dt=st.sampled_from([0.0, 0.5, 3.0, 10.0, 50.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        if self.connected:
            self.carry(self.core.tick(self.now))

    @precondition(lambda self: self.wire)
    @rule(i=st.integers(0, 10), outcome=st.sampled_from(["stored", "lost", "refused"]))
    def puback(self, i: int, outcome: str) -> None:
        mid = sorted(self.wire)[i % len(self.wire)]
        seq = self.wire.pop(mid)
        if outcome == "stored":
            self.stored.add(seq)
        self.carry(self.core.puback(mid, outcome == "refused", "Not authorized (135)", self.now))

    @precondition(lambda self: self.connected)
    @rule(new_epoch=st.booleans(), retained=st.booleans())
    def ack(self, new_epoch: bool, retained: bool) -> None:
        if new_epoch:
            self.epoch += 1
        upto = self.prefix()
        self.claimed = max(self.claimed, upto)
        self.carry(self.core.ack(upto, self.epoch, self.made, self.now, retained))

    @precondition(lambda self: self.connected)
    @rule(extra=st.integers(1, 100))
    def ack_ahead(self, extra: int) -> None:
        """A sink that claims seqs this device never made (its outbox was reset)."""
        upto = self.made + extra
        self.claimed = max(self.claimed, upto)
        before = self.core.acked
        self.carry(self.core.ack(upto, self.epoch, self.made, self.now))
        assert self.core.acked <= self.made
        if before < self.made:
            assert self.core.ack_ahead == upto
        # the model's sink now "has" what the device forgot on that word
        claimed = set(range(1, self.core.acked + 1))
        self.waived |= claimed - self.stored - self.published
        self.stored |= claimed

    @invariant()
    def bounded(self) -> None:
        assert len(self.core.window) <= self.inflight
        assert len(self.wire) <= self.inflight
        assert self.core.acked <= self.made
        assert set(range(1, self.forgotten + 1)) <= self.stored  # forgotten only when stored

    def teardown(self) -> None:
        """The faults stop: the broker delivers, the sink acks. Everything must drain."""
        if not self.connected:
            self.connect()
        for _ in range(10 * (self.made + 10)):
            if self.forgotten >= self.made:
                break
            self.now += 50.0
            self.carry(self.core.tick(self.now))
            for mid in sorted(self.wire):
                self.stored.add(self.wire.pop(mid))
                self.carry(self.core.puback(mid, False, "", self.now))
            upto = self.prefix()
            self.claimed = max(self.claimed, upto)
            self.carry(self.core.ack(upto, self.epoch, self.made, self.now))
        assert self.forgotten == self.made, (self.forgotten, self.made, self.core.state)
        # every seq went out, but those a sink claimed (ack beyond made) before they could
        assert set(range(1, self.made + 1)) - self.waived <= self.published


World.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestWorld = World.TestCase


# -- targeted cases ---------------------------------------------------------------------------
def _drive(core: Delivery, now: float, rows: range) -> list[int]:
    """Publish what the core asks for from `rows`; returns the seqs sent (mid = seq)."""
    out = []
    for a in core.tick(now):
        if isinstance(a, Publish):
            for seq in [s for s in rows if s > a.after][:a.count]:
                core.sent(seq, seq * 1000 + len(out), now)
                out.append(seq)
    return out


def test_new_sink_epoch_replays_at_once_retained_does_not() -> None:
    core = Delivery(Policy(inflight=10, ack_timeout_s=30.0))
    core.connected(0.0)
    assert _drive(core, 0.0, range(1, 6)) == [1, 2, 3, 4, 5]
    for mid in list(core.window):
        core.puback(mid, False, "", 0.1)
    assert core.ack(2, 7, 5, 0.2) == [Forget(2)]          # first epoch seen: recorded only
    assert core.ack(2, 8, 5, 0.3, retained=True) == []    # the copy handed over on subscribe
    acts = core.ack(2, 9, 5, 0.4)                         # a live ack from a new sink epoch
    assert acts == [Replay(3, Why.SINK_EPOCH, acts[0].waited_s)]  # type: ignore[union-attr]
    assert _drive(core, 0.5, range(1, 6)) == [3, 4, 5]    # long before the 30 s timeout
    assert core.ack(2, 9, 5, 0.6) == []                   # the same epoch again: nothing


def test_ack_timeout_doubles_and_progress_resets_it() -> None:
    core = Delivery(Policy(inflight=10, ack_timeout_s=30.0, ack_timeout_max_s=100.0))
    core.connected(0.0)
    _drive(core, 0.0, range(1, 3))
    for mid in list(core.window):
        core.puback(mid, False, "", 0.0)
    replays = []
    now = 0.0
    for _ in range(6):
        now += 1.0
        acts = core.tick(now)
        while not any(isinstance(a, Replay) for a in acts):
            now += 1.0
            acts = core.tick(now)
        replays.append(now)
        for a in acts:
            if isinstance(a, Publish):
                for seq in (1, 2):
                    core.sent(seq, int(now * 10) + seq, now)
        for mid in list(core.window):
            core.puback(mid, False, "", now)
    gaps = [b - a for a, b in zip([0.0, *replays], replays, strict=False)]
    assert gaps == [31.0, 61.0, 101.0, 101.0, 101.0, 101.0]  # 30, 60, then capped at 100
    core.ack(1, None, 2, now)
    assert core.timeout == 30.0


def test_refusal_holds_once_per_burst_and_doubles() -> None:
    core = Delivery(Policy(inflight=10, holdoff_s=5.0, holdoff_max_s=12.0))
    core.connected(0.0)
    _drive(core, 0.0, range(1, 4))
    holds = [a for mid in list(core.window) for a in core.puback(mid, True, "x", 1.0)]
    assert holds == [Hold(6.0, 1, "x", 5.0)] and core.refused == 3
    assert _drive(core, 5.9, range(1, 4)) == []           # holding: nothing sent
    assert _drive(core, 6.0, range(1, 4)) == [1, 2, 3]     # then from the oldest again
    core.puback(next(iter(core.window)), True, "x", 7.0)
    assert core.hold_until == 17.0                          # 10 s the second time
    assert [(a.start, a.why) for a in core.connected(8.0) if isinstance(a, Replay)] == \
        [(1, Why.CONNECT)]
    assert core.state is State.SENDING                      # a new connection ends the hold


def test_table_covers_every_state_and_the_states_are_reachable() -> None:
    assert {s for s, _ in TABLE} == set(State) == set(TABLE.values())


# -- reconnecting ------------------------------------------------------------------------------
@given(st.lists(st.tuples(st.sampled_from(list(Cause)), st.floats(0, 1)), max_size=40))
def test_reconnect_delay_bounds(failures: list[tuple[Cause, float]]) -> None:
    r = Reconnect(1.0, 60.0, 4.0)
    for cause, rnd in failures:
        wait = r.failed(cause, rnd)
        assert 0.5 <= wait <= (4.0 if CAUSES[cause][2] else 60.0)
    # whatever happened before: a CONNACK starts over
    r.connected()
    assert r.failed(Cause.LOST, 1.0) == 1.0


def test_a_refusing_broker_is_retried_within_the_fast_cap_after_any_history() -> None:
    r = Reconnect(1.0, 60.0, 4.0)
    for _ in range(20):
        r.failed(Cause.TIMEOUT, 1.0)   # a long network outage: the step is at its 60 s top
    assert r.failed(Cause.TIMEOUT, 1.0) == 60.0
    waits = [r.failed(Cause.REFUSED, random.random()) for _ in range(50)]
    assert max(waits) <= 4.0 and min(waits) >= 2.0  # equal jitter: 50-100 % of the 4 s cap


def test_fault_log_warns_once_per_cause_and_closes() -> None:
    f = FaultLog(remind_s=600.0)
    assert f.failed(Cause.REFUSED, "[Errno 111]", 0.0)
    assert not any(f.failed(Cause.REFUSED, "[Errno 111]", t) for t in range(1, 100))
    assert f.failed(Cause.TLS_VERIFY, "unable to get local issuer certificate", 100.0)
    assert f.failed(Cause.TLS_VERIFY, "unable to get local issuer certificate", 700.0)  # reminder
    assert f.recovered(710.0) == (710.0, 102, Cause.TLS_VERIFY)
    assert f.recovered(711.0) is None


@pytest.mark.parametrize("cause", list(Cause))
def test_every_cause_has_words(cause: Cause) -> None:
    words, _hint, fast = CAUSES[cause]
    assert words and isinstance(fast, bool)
