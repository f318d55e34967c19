"""The decision core (pure): a card read plus local state in, a decision and reason code out.

Roles share resolution (card -> technician through the card profile and the ID list); each
role then has its own table. Nothing here does I/O or reads a clock.
"""

from dataclasses import dataclass

from edge.idlist.base import Entry, IdList, Status
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision


@dataclass(frozen=True, slots=True)
class CardRead:
    """What a reader backend and card profile made of one tap."""

    card: bytes                 # UID / IDm; empty if even that could not be read
    tech: CardTech
    tid: str | None = None      # technician ID read from the card's data, if the profile does that
    error: Reason | None = None  # set when the card could not be read or resolved


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    reason: Reason
    tid: str | None
    list_version: int


def resolve(read: CardRead, idlist: IdList | None) -> tuple[Entry | None, Reason | None]:
    """Card read -> list entry, or the reason it could not be resolved."""
    if read.error is not None:
        return None, read.error
    if idlist is None:
        return None, Reason.NO_LIST
    if read.tid is not None:
        entry = idlist.by_tid(read.tid)
        return (entry, None) if entry else (None, Reason.UNKNOWN_TECHNICIAN)
    entry = idlist.by_card(read.card)
    return (entry, None) if entry else (None, Reason.UNKNOWN_CARD)


# Gate: the technician's status decides; the table is the whole policy.
GATE_TABLE: dict[Status, tuple[Decision, Reason]] = {
    Status.ACTIVE: (Decision.ALLOW, Reason.OK),
    Status.SUSPENDED: (Decision.DENY, Reason.SUSPENDED),
    Status.REVOKED: (Decision.DENY, Reason.REVOKED),
}


class AntiPassback:
    """Optional gate rule: the same technician may not pass the same direction twice in a row."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def violates(self, tid: str, direction: str) -> bool:
        return self._last.get(tid) == direction

    def record(self, tid: str, direction: str) -> None:
        self._last[tid] = direction


def by_status(read: CardRead, idlist: IdList | None) -> tuple[Verdict, Entry | None]:
    """The verdict the technician's status alone gives (gate table); the entry if resolved."""
    version = idlist.version if idlist is not None else 0
    entry, why = resolve(read, idlist)
    if entry is None:
        assert why is not None
        return Verdict(Decision.DENY, why, read.tid, version), None
    decision, reason = GATE_TABLE[entry.status]
    return Verdict(decision, reason, entry.tid, version), entry


def decide_gate(read: CardRead, idlist: IdList | None, direction: str,
                anti_passback: AntiPassback | None = None) -> Verdict:
    verdict, entry = by_status(read, idlist)
    if entry is not None and verdict.decision is Decision.ALLOW and anti_passback is not None:
        if anti_passback.violates(entry.tid, direction):
            return Verdict(Decision.DENY, Reason.ANTI_PASSBACK, entry.tid, verdict.list_version)
        anti_passback.record(entry.tid, direction)
    return verdict


# Vending: a registered, active technician with allowance left in the period gets a drink.
# The ledger (vending/) says how many are left; this decides with that figure.
def decide_vending(read: CardRead, idlist: IdList | None, remaining: int) -> Verdict:
    verdict, _ = by_status(read, idlist)
    if verdict.decision is Decision.ALLOW and remaining <= 0:
        return Verdict(Decision.DENY, Reason.LIMIT_REACHED, verdict.tid, verdict.list_version)
    return verdict


# Training: every card is counted (a touch experience); whether the holder is registered is
# recorded, never a reason to refuse. Unreadable cards are still denied: nothing to count.
def decide_training(read: CardRead, idlist: IdList | None) -> Verdict:
    version = idlist.version if idlist is not None else 0
    if read.error is not None:
        return Verdict(Decision.DENY, read.error, read.tid, version)
    entry, _ = resolve(read, idlist)
    if entry is None:
        return Verdict(Decision.ALLOW, Reason.UNREGISTERED, read.tid, version)
    return Verdict(Decision.ALLOW, Reason.REGISTERED, entry.tid, version)


def list_age_h(idlist: IdList | None, now_ms: int) -> float | None:
    """Hours since the list in force was issued; None without a list."""
    if idlist is None or not idlist.issued_ms:
        return None
    return max(0.0, (now_ms - idlist.issued_ms) / 3_600_000)


class Debouncer:
    """A card seen again on the same reader within `window_s` is the same tap.

    Every sighting renews the window, so a card wobbling at the edge of the field
    stays one tap. Times are monotonic seconds.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: dict[bytes, float] = {}

    def is_new_tap(self, card: bytes, now: float) -> bool:
        last = self._seen.get(card)
        self._seen[card] = now
        if len(self._seen) > 256:  # forget cards long gone; keeps memory flat all day
            self._seen = {c: t for c, t in self._seen.items() if now - t < self.window_s}
            self._seen[card] = now
        return last is None or now - last >= self.window_s
