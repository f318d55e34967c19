"""A touch as a store row (pure): work day, month, person, the role facts the derived tables use, flag.

Fact keys the sink reads: gate `dir` (in|out); training `course`; vending `slot`, `result`
(dispensed|failed|indeterminate) and `contractor` (the main contractor's 事業者ID).
"""

import json
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


def _fact(t: Touch, key: str) -> str | None:
    v = t.facts.get(key)
    return None if v is None else str(v)


def person(t: Touch) -> str | None:
    """Who touched: the technician ID, else the card's identifier (an unlisted card holder)."""
    if t.tid:
        return t.tid
    return "card:" + t.card.hex() if t.card else None


def touch_row(t: Touch, received_ms: int, policy: Policy) -> Row:
    day = day_of(t.ts_ms, policy.cut_hour)
    role = t.role.value
    return (
        t.device, t.seq, t.site, role, t.ts_ms, t.tq.value, bytes(t.card), t.card_tech.value, t.tid,
        t.decision.value, t.reason.value, t.list_version, t.config_version,
        json.dumps(t.facts, sort_keys=True), _fact(t, "dir") if role == "gate" else None, day,
        received_ms, time_flag(t.ts_ms, received_ms, policy), day[:7], person(t),
        _fact(t, "course") if role == "training" else None,
        _fact(t, "contractor") if role == "vending" else None,
        _fact(t, "slot") if role == "vending" else None,
        _fact(t, "result") if role == "vending" else None,
    )
