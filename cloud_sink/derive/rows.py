"""A touch as a store row (pure): work day, month, person, the role facts the derived tables use, flag.

Fact keys the sink reads: gate `dir` (in|out) and `passage`; training `course`; vending `slot`,
`result` (dispensed|failed|indeterminate) and `contractor` (the main contractor's 事業者ID).

A gate touch whose `passage` is `pending` (the tap's own touch; its outcome record follows) or
`not_passed` (the gate opened, nobody went through) gets no `dir`, so the work history does not
count it (derive/sql.py counts gate touches with a dir). docs/architecture.md, "The gate loop".
"""

import json
from collections.abc import Mapping
from functools import lru_cache

from cloud_sink.model import Policy
from cloud_sink.workday import work_day
from protocol.touch import Touch

COLUMNS = ("device", "seq", "site", "role", "ts_ms", "tq", "card", "card_tech", "tid", "decision",
           "reason", "lv", "cv", "facts", "dir", "work_day", "received_ms",
           "flag", "month", "person", "course", "contractor", "slot", "result")

VEND_RESULTS = ("dispensed", "failed", "indeterminate")

Row = tuple[object, ...]


def time_flag(ts_ms: int, received_ms: int, policy: Policy) -> str | None:
    """'ts_future' / 'ts_past' when the device clock is beyond the policy's skew, else None."""
    if ts_ms - received_ms > policy.max_future_ms:
        return "ts_future"
    if received_ms - ts_ms > policy.max_past_ms:
        return "ts_past"
    return None


@lru_cache(maxsize=4096)
def _day_of_hour(hour: int, cut_hour: int) -> str:
    return work_day(hour * 3600_000, cut_hour)


def day_of(ts_ms: int, cut_hour: int) -> str:
    """work_day(), cached per UTC hour: Asia/Tokyo is a whole-hour offset and the cut is on the
    hour, so every moment of one UTC hour falls on the same work day."""
    return _day_of_hour(ts_ms // 3600_000, cut_hour)


def person_of(tid: str | None, card: bytes) -> str | None:
    """Who touched: the technician ID, else the card's identifier (an unlisted card holder)."""
    if tid:
        return tid
    return "card:" + card.hex() if card else None


NO_PASSAGE = ("pending", "not_passed")


def gate_dir(facts: Mapping[str, object]) -> str | None:
    """The work-history direction of a gate touch: its `dir`, or None when it is no passage."""
    v = facts.get("dir")
    return None if v is None or facts.get("passage") in NO_PASSAGE else str(v)


def person(t: Touch) -> str | None:
    return person_of(t.tid, t.card)


def _text(facts: Mapping[str, object], key: str) -> str | None:
    v = facts.get(key)
    return None if v is None else str(v)


def row_of(device: str, seq: int, site: str, role: str, ts_ms: int, tq: str, card: bytes,
           card_tech: str, tid: str | None, decision: str, reason: str, lv: int, cv: int,
           facts: Mapping[str, object], received_ms: int, policy: Policy) -> Row:
    """THE row builder: a touch's wire values (enums as their strings) -> its store row, in
    COLUMNS order. touch_row() and the sink's fast path (cloud_sink.ingest.fastpath) both
    build their rows here, so the two cannot drift apart."""
    day = day_of(ts_ms, policy.cut_hour)
    vend = role == "vending"
    return (
        device, seq, site, role, ts_ms, tq, card, card_tech, tid, decision, reason, lv, cv,
        json.dumps(facts, sort_keys=True), gate_dir(facts) if role == "gate" else None, day,
        received_ms, time_flag(ts_ms, received_ms, policy), day[:7], person_of(tid, card),
        _text(facts, "course") if role == "training" else None,
        _text(facts, "contractor") if vend else None,
        _text(facts, "slot") if vend else None,
        _text(facts, "result") if vend else None,
    )


def touch_row(t: Touch, received_ms: int, policy: Policy) -> Row:
    return row_of(t.device, t.seq, t.site, t.role.value, t.ts_ms, t.tq.value, bytes(t.card),
                  t.card_tech.value, t.tid, t.decision.value, t.reason.value, t.list_version,
                  t.config_version, t.facts, received_ms, policy)
