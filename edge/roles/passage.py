"""The gate's passage state machine (pure): taps, door edges, timers and board resets in;
relay pulses, passage outcomes and alarms out. No I/O, no clock: every event carries `now`
(monotonic seconds).

Rules of this file:
- The door's phase moves only by TABLE: (phase, event) -> (next phase, actions). An event
  the table does not name for a phase changes nothing.
- An allowed tap (board online, no emergency) asks for one relay pulse and becomes a pending
  passage; each pending passage ends exactly once: `passed` at a door-open edge (the oldest
  pending one), `not_passed` when its passage timeout runs out without one, `unconfirmed`
  when the board is lost (the door sensor is unreadable) or an emergency release opens the
  gate for everyone: the person may have passed.
- A door that opens with nothing pending is `forced`; a door open longer than held_open_s is
  `held_open`. Both are alarms, raised once per opening and cleared when the door closes.
- In an emergency the board holds the gate open: no pulses, no passages, no door alarms; a tap
  is recorded as emergency_open.
- A board reset (BOOT) shuts every relay: the door's phase starts again from CLOSED and the
  board's boot level reports (an open door, an emergency in force) set it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# door phases
CLOSED, OPEN, FORCED, HELD, EMERGENCY = "closed", "open", "forced", "held_open", "emergency"

# events (what the adapter feeds in)
TAP = "tap"                       # an allowed tap that opens the gate
DOOR_OPEN, DOOR_CLOSE = "door_open", "door_close"
DOOR_LEVEL_OPEN = "door_level_open"   # board's boot report: the door is open now (not an edge)
EMERGENCY_ON, EMERGENCY_OFF = "emergency_on", "emergency_off"
TICK = "tick"                     # time passes (timeouts)
RESET = "reset"                   # the board restarted (BOOT): relays shut
LOST = "lost"                     # the board stopped answering

# passage outcomes (the follow-up record's `passage` fact)
PASSED, NOT_PASSED, UNCONFIRMED = "passed", "not_passed", "unconfirmed"
# alarms (events on the device's event topic, and in the state message)
ALARM_FORCED, ALARM_HELD_OPEN, ALARM_EMERGENCY = "forced", "held_open", "emergency_open"

# refined events the table is keyed by (the door-open edge splits on whether a tap is pending;
# leaving an emergency splits on the door's level; a tick becomes `held` when the door has
# been open past held_open_s)
_OPEN_EXPECTED, _OPEN_UNEXPECTED, _HELD = "open_expected", "open_unexpected", "held"
_CLEAR_TO_CLOSED, _CLEAR_TO_OPEN = "clear_closed", "clear_open"

# actions the table names
A_PASS = "pass_oldest"
A_RAISE_FORCED, A_RAISE_HELD, A_RAISE_EMERGENCY = "raise_forced", "raise_held", "raise_emergency"
A_CLEAR_DOOR, A_CLEAR_EMERGENCY = "clear_door", "clear_emergency"
A_START_OPEN = "start_open"       # the door is open from now: the held-open timer starts

_NORMAL = (CLOSED, OPEN, FORCED, HELD)

TABLE: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    (CLOSED, _OPEN_EXPECTED): (OPEN, (A_START_OPEN, A_PASS)),
    (CLOSED, _OPEN_UNEXPECTED): (FORCED, (A_START_OPEN, A_RAISE_FORCED)),
    (CLOSED, DOOR_LEVEL_OPEN): (OPEN, (A_START_OPEN,)),    # open since before the reset
    (OPEN, DOOR_CLOSE): (CLOSED, ()),
    (FORCED, DOOR_CLOSE): (CLOSED, (A_CLEAR_DOOR,)),
    (HELD, DOOR_CLOSE): (CLOSED, (A_CLEAR_DOOR,)),
    (OPEN, _HELD): (HELD, (A_RAISE_HELD,)),
    (FORCED, _HELD): (HELD, (A_RAISE_HELD,)),
    **{(p, EMERGENCY_ON): (EMERGENCY, (A_CLEAR_DOOR, A_RAISE_EMERGENCY)) for p in _NORMAL},
    (EMERGENCY, _CLEAR_TO_CLOSED): (CLOSED, (A_CLEAR_EMERGENCY,)),
    (EMERGENCY, _CLEAR_TO_OPEN): (OPEN, (A_CLEAR_EMERGENCY, A_START_OPEN)),
    **{(p, RESET): (CLOSED, (A_CLEAR_DOOR, A_CLEAR_EMERGENCY)) for p in (*_NORMAL, EMERGENCY)},
}


@dataclass(frozen=True)
class Event:
    kind: str
    now: float
    tap: int = 0          # TAP: the tap's id (its touch seq)
    relay: int = 0        # TAP: the relay to pulse


@dataclass(frozen=True)
class Action:
    kind: str             # "pulse", "outcome", "alarm", "clear"
    tap: int = 0
    relay: int = 0
    pulse_ms: int = 0
    outcome: str = ""     # PASSED / NOT_PASSED / UNCONFIRMED
    alarm: str = ""       # ALARM_*


@dataclass(frozen=True)
class Timing:
    pulse_ms: int = 500
    passage_timeout_s: float = 8.0
    held_open_s: float = 30.0


@dataclass(frozen=True)
class State:
    phase: str = CLOSED
    pending: tuple[tuple[int, float], ...] = ()   # (tap, deadline), oldest first
    opened_at: float | None = None                 # the door open since (held-open timer)
    door_open: bool = False                        # the last level the board reported
    alarms: frozenset[str] = field(default_factory=frozenset)


def _refine(s: State, e: Event, t: Timing) -> str:
    if e.kind == DOOR_OPEN:
        if s.door_open and s.phase != CLOSED:
            return "repeat"  # the door was already open: no new edge
        return _OPEN_EXPECTED if s.pending else _OPEN_UNEXPECTED
    if e.kind == EMERGENCY_OFF:
        return _CLEAR_TO_OPEN if s.door_open else _CLEAR_TO_CLOSED
    if e.kind == TICK and s.opened_at is not None and s.phase in (OPEN, FORCED) \
            and e.now - s.opened_at >= t.held_open_s:
        return _HELD
    return e.kind


def transition(s: State, e: Event, t: Timing) -> tuple[State, list[Action]]:
    """One event -> the next state and what to do. Never raises."""
    out: list[Action] = []
    # the door's level is a fact whatever the phase
    if e.kind in (DOOR_OPEN, DOOR_LEVEL_OPEN):
        level: bool | None = True
    elif e.kind == DOOR_CLOSE:
        level = False
    elif e.kind == RESET:
        level = False  # until the board's boot report says otherwise
    else:
        level = None
    refined = _refine(s, e, t)
    if level is not None:
        s = replace(s, door_open=level)

    # taps and time: the pending passages, outside the door table
    if e.kind == TAP:
        if s.phase == EMERGENCY:
            return s, []  # the gate is held open; the tap is recorded as emergency_open
        s = replace(s, pending=(*s.pending, (e.tap, e.now + t.passage_timeout_s)))
        return s, [Action("pulse", tap=e.tap, relay=e.relay, pulse_ms=t.pulse_ms)]
    if e.kind == LOST or (e.kind == EMERGENCY_ON and s.phase != EMERGENCY):
        # the door sensor is unreadable, or the gate is held open for everyone: whoever was
        # on the way may have gone through
        out += [Action("outcome", tap=tap, outcome=UNCONFIRMED) for tap, _ in s.pending]
        s = replace(s, pending=())
        if e.kind == LOST:
            return s, out
    if e.kind == TICK:
        expired = [p for p in s.pending if e.now >= p[1]]
        if expired:
            s = replace(s, pending=tuple(p for p in s.pending if e.now < p[1]))
            out += [Action("outcome", tap=tap, outcome=NOT_PASSED) for tap, _ in expired]

    step = TABLE.get((s.phase, refined))
    if step is None:
        return s, out
    phase, actions = step
    alarms = set(s.alarms)
    opened_at = s.opened_at if phase in (OPEN, FORCED, HELD) else None
    pending = s.pending
    for a in actions:
        if a == A_START_OPEN:
            opened_at = e.now
        elif a == A_PASS:
            (tap, _), pending = pending[0], pending[1:]
            out.append(Action("outcome", tap=tap, outcome=PASSED))
        elif a in (A_RAISE_FORCED, A_RAISE_HELD, A_RAISE_EMERGENCY):
            kind = {A_RAISE_FORCED: ALARM_FORCED, A_RAISE_HELD: ALARM_HELD_OPEN,
                    A_RAISE_EMERGENCY: ALARM_EMERGENCY}[a]
            if kind not in alarms:
                alarms.add(kind)
                out.append(Action("alarm", alarm=kind))
        elif a in (A_CLEAR_DOOR, A_CLEAR_EMERGENCY):
            kinds = (ALARM_FORCED, ALARM_HELD_OPEN) if a == A_CLEAR_DOOR else (ALARM_EMERGENCY,)
            for kind in kinds:
                if kind in alarms:
                    alarms.discard(kind)
                    out.append(Action("clear", alarm=kind))
    return State(phase, pending, opened_at, s.door_open, frozenset(alarms)), out


class Passage:
    """The state machine with its state, for the adapter (one per door)."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.state = State()

    def feed(self, e: Event) -> list[Action]:
        self.state, actions = transition(self.state, e, self.timing)
        return actions
