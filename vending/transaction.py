"""The vend transaction state machine, as a table (h11 style): states, events, effects on the allowance."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import VendingError

# States
RESERVED = "reserved"  # allowance held, journaled; the board has not been asked yet
VENDING = "vending"  # journaled as about to be / being sent to the board
COMMITTED = "committed"  # dispense confirmed: the allowance is used, the drink is billable
RELEASED = "released"  # not dispensed: the allowance is given back
INDETERMINATE = "indeterminate"  # nobody knows whether a drink fell: held, reported, never guessed

STATES = (RESERVED, VENDING, COMMITTED, RELEASED, INDETERMINATE)
FINAL = (COMMITTED, RELEASED)
HELD = (RESERVED, VENDING, INDETERMINATE)  # count against the limit, not billable

# Events
START = "start"  # vend request about to be sent to the board
CONFIRMED = "confirmed"  # board: drop sensor saw the drink (or later query says so)
NOT_DISPENSED = "not_dispensed"  # board: no drop before its timeout, busy, bad slot, never started
CANCEL = "cancel"  # technician or agent cancels before the vend starts
TIMEOUT = "timeout"  # host-side deadline passed
LINK_FAILED = "link_failed"  # the board never acknowledged the request (silent)
INTERRUPTED = "interrupted"  # board reset while the vend was in progress
POWER_LOSS = "power_loss"  # host restarted and found this transaction open
RESOLVE_DISPENSED = "resolve_dispensed"  # an operator settles an indeterminate vend
RESOLVE_NOT_DISPENSED = "resolve_not_dispensed"

EVENTS = (
    START,
    CONFIRMED,
    NOT_DISPENSED,
    CANCEL,
    TIMEOUT,
    LINK_FAILED,
    INTERRUPTED,
    POWER_LOSS,
    RESOLVE_DISPENSED,
    RESOLVE_NOT_DISPENSED,
)

# Effects on the allowance ledger
COMMIT = "commit"
RELEASE = "release"

# (state, event) -> new state. Anything missing is an InvalidTransition.
TABLE: dict[tuple[str, str], str] = {
    (RESERVED, START): VENDING,
    (RESERVED, CANCEL): RELEASED,
    (RESERVED, TIMEOUT): RELEASED,
    (RESERVED, POWER_LOSS): RELEASED,  # never sent: VENDING is journaled before sending
    (VENDING, CONFIRMED): COMMITTED,
    (VENDING, NOT_DISPENSED): RELEASED,
    (VENDING, TIMEOUT): INDETERMINATE,  # acknowledged but no result: it may have fallen
    (VENDING, LINK_FAILED): INDETERMINATE,  # the board may have heard us and lost the ack
    (VENDING, INTERRUPTED): INDETERMINATE,
    (VENDING, POWER_LOSS): INDETERMINATE,
    (INDETERMINATE, CONFIRMED): COMMITTED,  # the board's journal settles it later
    (INDETERMINATE, NOT_DISPENSED): RELEASED,
    (INDETERMINATE, RESOLVE_DISPENSED): COMMITTED,
    (INDETERMINATE, RESOLVE_NOT_DISPENSED): RELEASED,
    (INDETERMINATE, INTERRUPTED): INDETERMINATE,
    (INDETERMINATE, TIMEOUT): INDETERMINATE,
    (INDETERMINATE, LINK_FAILED): INDETERMINATE,
    (INDETERMINATE, POWER_LOSS): INDETERMINATE,
}

# Repeats that are harmless and change nothing (a duplicate confirmation counts once).
IDEMPOTENT: frozenset[tuple[str, str]] = frozenset(
    {
        (COMMITTED, CONFIRMED),
        (COMMITTED, RESOLVE_DISPENSED),
        (RELEASED, NOT_DISPENSED),
        (RELEASED, CANCEL),
        (RELEASED, TIMEOUT),
        (RELEASED, RESOLVE_NOT_DISPENSED),
        (RELEASED, POWER_LOSS),
        (COMMITTED, POWER_LOSS),
    }
)


class InvalidTransition(VendingError):
    """An event that makes no sense in this state (e.g. a confirmation after a release)."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"event {event!r} is not allowed in state {state!r}")
        self.state = state
        self.event = event


@dataclass(frozen=True)
class Transition:
    old: str
    event: str
    new: str
    effect: str | None  # COMMIT, RELEASE or None
    duplicate: bool = False


def transition(state: str, event: str) -> Transition:
    """Apply one event to one state; pure. Raises InvalidTransition."""
    if (state, event) in IDEMPOTENT:
        return Transition(state, event, state, None, duplicate=True)
    new = TABLE.get((state, event))
    if new is None:
        raise InvalidTransition(state, event)
    effect = None
    if new == COMMITTED and state != COMMITTED:
        effect = COMMIT
    elif new == RELEASED and state != RELEASED:
        effect = RELEASE
    return Transition(state, event, new, effect)
