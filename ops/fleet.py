"""The fleet view from retained state messages, pure: parse, merge, find problems, sort, render.

A state message (CBOR, ccus/v1/{site}/{dev}/state, retained) carries online, ts (device clock,
UTC ms), tq (clock quality), role, sw/lv/cv (software, list, config versions), backlog,
oldest_ms/oldest_age_s (outbox), disk (ok|low|reserve|full), board (controller-board health,
vending), readers {name: health}; a gate with a board adds gate {board, alarms, emergency, ...}.
The last will replaces it with `online: false` and little else, so the view merges each
device's retained message with the last full state it saw (`merge`, kept by the CLI in a cache
file): an offline device keeps its last known role, software, versions and last-seen time
(docs/protocol.md, "State message and last will"). Problems are a table (`PROBLEM_TABLE`),
checked in order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from protocol import topics
from protocol.timequality import TimeQuality
from protocol.touch import MAX_SEQ

MAX_TEXT = 64          # names and health words are short: a longer text is cut for the table

STALE_S = 300          # no state for 5 state intervals (60 s each): something is wrong
BACKLOG_MAX = 100      # touches waiting in the outbox
BACKLOG_AGE_S = 600    # the oldest waiting touch: older than this, the outbox is stuck
DISK_PROBLEM = ("low", "reserve", "full")   # edge/outbox.py disk_state(); "ok" is fine
# what a merged row keeps from the last full state when the newest message (a last will)
# lacks it: identity and versions, and when the device was last heard of
MAX_MS = 253_402_300_799_999   # 9999-12-31T23:59:59.999Z
REMEMBERED = ("role", "sw", "lv", "cv", "last_seen_ms")


@dataclass
class Row:
    site: str
    dev: str
    online: bool = False
    last_seen_ms: int | None = None
    role: str = ""
    sw: str = ""
    lv: int | None = None
    cv: int | None = None
    backlog: int | None = None
    oldest_ms: int | None = None
    oldest_age_s: int | None = None
    disk: str = ""
    board: str = ""
    readers: dict[str, str] = field(default_factory=dict)
    tq: str = ""
    gate: dict[str, Any] = field(default_factory=dict)  # a gate's board health and alarms
    remembered: bool = False        # some fields come from an earlier state, not this message
    problems: list[str] = field(default_factory=list)


def parse(topic: str, payload: bytes) -> Row | None:
    """One retained state message -> a row (with a problem if it cannot be read), or None."""
    where = topics.parse_device_topic(topic)
    if where is None or where[2] != "state":
        return None
    row = Row(where[0], where[1])
    try:
        m = cbor2.loads(payload)
    except Exception:  # any undecodable state is a problem to show, not a crash
        m = None
    if not isinstance(m, dict):
        row.problems.append("state unreadable")
        return row

    def typed(key: str, kind: type, hi: int = MAX_SEQ) -> Any:
        # numbers in 0..hi only: a bignum has no decimal text, a ts past year 9999 no date
        v = m.get(key)
        if kind is bool:
            return v if isinstance(v, bool) else None
        if kind is str:
            return v[:MAX_TEXT] if isinstance(v, str) else None
        return v if type(v) is int and 0 <= v <= hi else None

    def ms(key: str) -> int | None:  # a time a datetime can show: 1970 .. 9999
        v = typed(key, int)
        return v if v is not None and 0 <= v <= MAX_MS else None

    def count(key: str) -> int | None:
        v = typed(key, int)
        return v if v is not None and 0 <= v < 2**63 else None

    row.online = bool(typed("online", bool))
    row.last_seen_ms = ms("ts")
    row.role = typed("role", str) or ""
    row.sw = typed("sw", str) or ""
    row.lv, row.cv = count("lv"), count("cv")
    row.backlog = count("backlog")
    row.oldest_ms = ms("oldest_ms")
    row.oldest_age_s = count("oldest_age_s")
    row.disk = typed("disk", str) or ""
    board = m.get("board")
    if isinstance(board, dict):  # {"health": ..., ...} or a bare health string
        board = board.get("health")
    row.board = board if isinstance(board, str) else ""
    readers = m.get("readers")
    row.readers = {k[:MAX_TEXT]: v[:MAX_TEXT] for k, v in readers.items()
                   if isinstance(k, str) and isinstance(v, str)} if isinstance(readers, dict) else {}
    row.tq = typed("tq", str) or ""
    gate = m.get("gate")
    row.gate = gate if isinstance(gate, dict) else {}
    return row


def merge(row: Row, known: dict[str, Any] | None) -> Row:
    """Fill what the newest message lacks (a last will: online false only) from the last full
    state seen for this device (`remember(row)` of an earlier row). Never overrides a field the
    newest message carries; volatile fields (backlog, disk, readers, clock) are never
    borrowed: they are unknown while the device is away."""
    if not known:
        return row
    for key in REMEMBERED:
        if getattr(row, key) in (None, "") and _fits(key, known.get(key)):
            setattr(row, key, known[key])
            row.remembered = True
    return row


def _fits(key: str, v: Any) -> bool:
    """A remembered value of the right type and range (a cache edited by hand is not trusted)."""
    if key in ("role", "sw"):
        return isinstance(v, str) and v != ""
    if not isinstance(v, int) or isinstance(v, bool):
        return False
    return 0 <= v <= (MAX_MS if key == "last_seen_ms" else 2**63 - 1)


def remember(row: Row, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """What to keep about a device for the next merge: its fields, the newer of each."""
    out = dict(known or {})
    for key in REMEMBERED:
        v = getattr(row, key)
        if v not in (None, ""):
            out[key] = v
    if known and isinstance(known.get("last_seen_ms"), int) and row.last_seen_ms is not None:
        out["last_seen_ms"] = max(known["last_seen_ms"], row.last_seen_ms)
    return out


def _stuck(row: Row, now_ms: int) -> str | None:
    # the device's own age (its clock against its clock) beats ours against its timestamp
    if not row.backlog:
        return None
    age = row.oldest_age_s if row.oldest_age_s is not None else (
        None if row.oldest_ms is None else max(0, (now_ms - row.oldest_ms) // 1000))
    if age is not None and age > BACKLOG_AGE_S:
        return f"outbox stuck ({row.backlog} waiting, oldest {_dur(age)})"
    return None


def _clock(row: Row, _now: int) -> str | None:
    # an offline device's clock is unknown, not a problem of its own ("offline" says it)
    if not row.online or not row.tq or row.tq == TimeQuality.SYNCED:
        return None
    known = {q.value for q in TimeQuality}
    return f"clock {row.tq}" if row.tq in known else f"clock unknown ({row.tq[:20]})"


def _gate(row: Row, _now: int) -> list[str] | None:
    # a gate with a board: its health, and every alarm in force (forced, held_open, emergency)
    if not row.gate or not row.online:
        return None
    out = []
    if row.gate.get("board") not in ("ok", None):
        out.append(f"gate board {str(row.gate.get('board'))[:MAX_TEXT]}")
    alarms = row.gate.get("alarms")
    if isinstance(alarms, list):
        out += [f"gate {str(a)[:MAX_TEXT]}" for a in sorted(map(str, alarms))]
    return out


# (check, problem text or None); in the order they are listed
PROBLEM_TABLE: tuple[Callable[[Row, int], str | list[str] | None], ...] = (
    lambda r, _n: None if r.online else "offline",
    lambda r, _n: "never seen" if r.last_seen_ms is None else None,
    lambda r, n: "stale state" if r.online and r.last_seen_ms is not None
    and n - r.last_seen_ms > STALE_S * 1000 else None,
    lambda r, _n: f"backlog {r.backlog}" if r.backlog is not None
    and r.backlog > BACKLOG_MAX else None,
    _stuck,
    lambda r, _n: f"disk {r.disk}" if r.online and r.disk in DISK_PROBLEM else None,
    lambda r, _n: f"board {r.board}" if r.online and r.board and r.board != "ok" else None,
    lambda r, _n: [f"reader {k} {h}" for k, h in sorted(r.readers.items()) if h != "ok"]
    if r.online else None,
    _clock,
    lambda r, _n: "no id list" if r.lv is None and r.online else None,
    _gate,
)


def diagnose(row: Row, now_ms: int) -> Row:
    for check in PROBLEM_TABLE:
        got = check(row, now_ms)
        if isinstance(got, list):
            row.problems += got
        elif got:
            row.problems.append(got)
    return row


def fleet(messages: dict[str, bytes], now_ms: int,
          known: dict[str, dict[str, Any]] | None = None) -> list[Row]:
    """Problems first (most first), then by site and device. `known`: topic -> what
    `remember` kept from earlier runs (see merge)."""
    known = known or {}
    rows = [diagnose(merge(r, known.get(t)), now_ms)
            for t, b in messages.items() if (r := parse(t, b)) is not None]
    return sorted(rows, key=lambda r: (not r.problems, -len(r.problems), r.site, r.dev))


def remembered(rows: list[Row], known: dict[str, dict[str, Any]] | None = None
               ) -> dict[str, dict[str, Any]]:
    """The cache to keep after a run: every device's fields, updated by this run's rows."""
    out = dict(known or {})
    for r in rows:
        t = topics.state(r.site, r.dev)
        out[t] = remember(r, out.get(t))
    return out


def _dur(s: int) -> str:
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    return _dur(max(0, (now_ms - ms) // 1000))


def render(rows: list[Row], now_ms: int) -> str:
    head = ("SITE", "DEVICE", "ROLE", "STATUS", "SEEN", "SW", "LIST", "CFG", "BACKLOG", "CLOCK",
            "PROBLEMS")
    lines = [head]
    for r in rows:
        lines.append((r.site, r.dev, r.role, "online" if r.online else "offline",
                      _ago(r.last_seen_ms, now_ms), r.sw, str(r.lv if r.lv is not None else "-"),
                      str(r.cv if r.cv is not None else "-"),
                      str(r.backlog if r.backlog is not None else "-"), r.tq or "-",
                      ", ".join(r.problems) or "ok"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [{**r.__dict__, "last_seen": dt.datetime.fromtimestamp(
        r.last_seen_ms / 1000, dt.UTC).isoformat() if r.last_seen_ms else None} for r in rows]
