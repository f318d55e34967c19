"""The fleet view from retained state messages, pure: parse, find problems, sort, render.

A state message (CBOR, ccus/v1/{site}/{dev}/state, retained; the LWT sets online false) carries
online, ts (device clock, UTC ms), tq (clock quality), sw/lv/cv (software, list, config
versions), backlog and oldest_ms (outbox), readers {name: health}; a gate with a board adds
gate {board, alarms, emergency, ...} (docs/protocol.md).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import cbor2

from protocol import topics
from protocol.touch import MAX_SEQ, MAX_TS_MS

MAX_TEXT = 64          # names and health words are short: a longer text is cut for the table

STALE_S = 300          # no state for 5 state intervals (60 s each): something is wrong
BACKLOG_MAX = 100      # touches waiting in the outbox
BACKLOG_AGE_S = 600    # the oldest waiting touch


@dataclass
class Row:
    site: str
    dev: str
    online: bool = False
    last_seen_ms: int | None = None
    role: str = ""
    sw: str = ""
    lv: Any = None
    cv: Any = None
    backlog: int | None = None
    oldest_ms: int | None = None
    readers: dict[str, str] = field(default_factory=dict)
    tq: str = ""
    gate: dict[str, Any] = field(default_factory=dict)  # a gate's board health and alarms
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

    row.online = bool(typed("online", bool))
    row.last_seen_ms = typed("ts", int, MAX_TS_MS)
    row.role = typed("role", str) or ""
    row.sw = typed("sw", str) or ""
    row.lv, row.cv = typed("lv", int), typed("cv", int)
    row.backlog = typed("backlog", int)
    row.oldest_ms = typed("oldest_ms", int, MAX_TS_MS)
    readers = m.get("readers")
    row.readers = {k[:MAX_TEXT]: v[:MAX_TEXT] for k, v in readers.items()
                   if isinstance(k, str) and isinstance(v, str)} if isinstance(readers, dict) else {}
    row.tq = typed("tq", str) or ""
    gate = m.get("gate")
    row.gate = gate if isinstance(gate, dict) else {}
    return row


def diagnose(row: Row, now_ms: int) -> Row:
    p = row.problems
    if not row.online:
        p.append("offline")
    if row.last_seen_ms is None:
        p.append("never seen")
    elif row.online and now_ms - row.last_seen_ms > STALE_S * 1000:
        p.append("stale state")
    if row.backlog is not None and row.backlog > BACKLOG_MAX:
        p.append(f"backlog {row.backlog}")
    if row.oldest_ms is not None and now_ms - row.oldest_ms > BACKLOG_AGE_S * 1000:
        p.append("old backlog")
    p += [f"reader {n} {h}" for n, h in sorted(row.readers.items()) if h != "ok"]
    if row.tq and row.tq != "synced":
        p.append(f"clock {row.tq}")
    if row.lv is None and row.online:
        p.append("no id list")
    if row.gate and row.online:
        if row.gate.get("board") not in ("ok", None):
            p.append(f"gate board {row.gate.get('board')}")
        alarms = row.gate.get("alarms")
        p += [f"gate {a}" for a in sorted(map(str, alarms))] if isinstance(alarms, list) else []
    return row


def fleet(messages: dict[str, bytes], now_ms: int) -> list[Row]:
    """Problems first (most first), then by site and device."""
    rows = [diagnose(r, now_ms) for t, b in messages.items() if (r := parse(t, b)) is not None]
    return sorted(rows, key=lambda r: (not r.problems, -len(r.problems), r.site, r.dev))


def _ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    s = max(0, (now_ms - ms) // 1000)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


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
