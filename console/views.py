"""Page models (pure): the work-history grid, on-site-now list, touch rows and SVG bar geometry.

Every figure comes from cloud_sink.reports.shape over the store's rows, so the pages show what
`ccus report` prints. A grid cell is 'HH:MM-HH:MM' with '?' for a missing entry or exit; the
CSV of the grid is these same strings.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from cloud_sink.model import WorkDay
from cloud_sink.reports import shape
from cloud_sink.workday import local_time
from console import i18n
from protocol.touch import Touch

MISSING = "?"


@dataclass(frozen=True)
class Cell:
    entry: str
    exit: str
    entry_missing: bool
    exit_missing: bool

    @property
    def text(self) -> str:
        return f"{self.entry or MISSING}-{self.exit or MISSING}"

    @property
    def missing(self) -> bool:
        return self.entry_missing or self.exit_missing


@dataclass(frozen=True)
class Grid:
    site: str
    month: str
    dates: list[str]
    technicians: list[str]
    cells: list[list[Cell | None]]   # [technician][date]

    def days(self, i: int) -> int:
        return sum(c is not None for c in self.cells[i])

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["technician", *self.dates, "days"])
        for i, tech in enumerate(self.technicians):
            w.writerow([tech, *(c.text if c else "" for c in self.cells[i]), self.days(i)])
        return buf.getvalue()


def grid(site: str, month: str, days: list[WorkDay]) -> Grid:
    dates = shape.month_days(month)
    col = {d: i for i, d in enumerate(dates)}
    rows = shape.work_history([d for d in days if d.site == site])
    techs = sorted({r["technician"] for r in rows})
    at = {t: i for i, t in enumerate(techs)}
    cells: list[list[Cell | None]] = [[None] * len(dates) for _ in techs]
    for r in rows:
        if r["work_day"] in col:
            cells[at[r["technician"]]][col[r["work_day"]]] = Cell(
                r["entry"], r["exit"], r["entry_missing"], r["exit_missing"])
    return Grid(site, month, dates, techs, cells)


def on_site(days: list[WorkDay], site: str, day: str) -> list[dict[str, Any]]:
    """Who entered on `day` and has no exit after their first entry, earliest first.
    The work history keeps only the first entry and the last exit, so someone who tapped out
    and back in again counts as left (docs/console.md, 'On site now', says so)."""
    out = []
    for d in days:
        if d.site != site or d.work_day != day or d.first_in_ms is None:
            continue
        if d.last_out_ms is None or d.last_out_ms < d.first_in_ms:
            out.append({"technician": d.tid, "entry": local_time(d.first_in_ms),
                        "entry_ms": d.first_in_ms, "taps": d.taps})
    return sorted(out, key=lambda r: (r["entry_ms"], r["technician"]))


def touch_row(t: Touch) -> dict[str, Any]:
    return {"time": local_time(t.ts_ms) + f":{(t.ts_ms // 1000) % 60:02d}", "ts_ms": t.ts_ms,
            "device": t.device, "site": t.site, "role": t.role.value,
            "direction": str(t.facts.get("dir", "")), "technician": t.tid or "",
            "card": t.card.hex(), "decision": t.decision.value, "reason": t.reason.value,
            "seq": t.seq, "result": str(t.facts.get("result", "")),
            # a gate's passage: `pending` on the tap, the outcome on a follow-up naming its tap
            "passage": str(t.facts.get("passage", "")), "tap": t.facts.get("tap")}


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    series: int
    value: float
    label: str


def bars(labels: list[str], series: list[list[float]], *, height: float = 160.0,
         bar_w: float = 28.0, gap: float = 12.0, stacked: bool = True) -> dict[str, Any]:
    """Bar geometry for a hand-written SVG: one group per label, series stacked (or side by
    side); the scale is the largest group. Pure numbers; the template draws them."""
    n = len(labels)
    totals = [sum(s[i] for s in series) if stacked else max((s[i] for s in series), default=0)
              for i in range(n)]
    top = max(totals, default=0) or 1
    per = bar_w if stacked else bar_w * max(1, len(series))
    out: list[Bar] = []
    for i, label in enumerate(labels):
        x0 = gap + i * (per + gap)
        base = height
        for k, s in enumerate(series):
            v = float(s[i])
            h = height * v / top
            if stacked:
                out.append(Bar(x0, base - h, bar_w, h, k, v, label))
                base -= h
            else:
                out.append(Bar(x0 + k * bar_w, height - h, bar_w, h, k, v, label))
    width = gap + n * (per + gap)
    return {"bars": out, "width": max(width, 120.0), "height": height, "top": top,
            "labels": [(gap + i * (per + gap) + per / 2, lab) for i, lab in enumerate(labels)]}


# (limit in seconds, divisor, ja unit, en unit): seconds under 2 min, minutes under 2 h, hours
AGE_UNITS = ((120, 1, "秒", "s"), (7200, 60, "分", "m"), (None, 3600, "時間", "h"))


def ago(ms: int | None, now_ms: int, lang: str = "ja") -> str:
    """How long ago, in the fleet table's words: '45秒', '3分', '2時間' ('45s' in English)."""
    if ms is None:
        return "-"
    s = max(0, (now_ms - ms) // 1000)
    for limit, div, ja, en in AGE_UNITS:
        if limit is None or s < limit:
            return f"{s // div}{en if lang == 'en' else ja}"
    return "-"


def fleet_rows_html(rows: list[Any], now_ms: int, lang: str) -> str:
    """The fleet table's rows as HTML, built here rather than in Jinja2: a 1,000-device fleet
    is redrawn on every state change, and the template spent ~110 µs a row on calls and
    escaping (bench/bench_console.py). Every value goes through html.escape. Board health is
    the gate's `board` (ops.fleet.Row.gate); disk shows once ops.fleet.Row carries it."""
    from html import escape

    def t(key: str) -> str:
        return escape(i18n.t(key, lang))

    def v(x: Any) -> str:
        return "-" if x is None or x == "" else escape(str(x))

    on, off, ok = t("online"), t("offline"), t("ok")
    out = []
    for r in rows:
        readers = " ".join(
            f'<span class="{"okc" if h == "ok" else "badc"}">{escape(n)}:{escape(h)}</span>'
            for n, h in sorted(r.readers.items())) or "-"
        seen = local_time(r.last_seen_ms) if r.last_seen_ms else "-"
        out.append(
            f'<tr class="{"bad" if r.problems else "good"}" data-device="{escape(r.dev)}">'
            f"<td>{escape(r.site)}</td><td>{escape(r.dev)}</td><td>{v(r.role)}</td>"
            f'<td class="{"on" if r.online else "off"}">{on if r.online else off}</td>'
            f'<td title="{seen}">{ago(r.last_seen_ms, now_ms, lang)}</td><td>{v(r.sw)}</td>'
            f"<td>{v(r.cv)}</td><td>{v(r.lv)}</td><td>{v(r.backlog)}</td>"
            f"<td>{ago(r.oldest_ms, now_ms, lang) if r.oldest_ms else '-'}</td><td>{readers}</td>"
            f"<td>{v((getattr(r, 'gate', None) or {}).get('board'))}</td><td>{v(r.tq)}</td>"
            f"<td>{v(getattr(r, 'disk', None))}</td>"
            f'<td class="problems">{escape(", ".join(r.problems)) or ok}</td></tr>')
    return "\n".join(out)


def manifest_row(topic: str, payload: bytes) -> dict[str, Any]:
    """A retained ID-list manifest for the operations page: name, version, records, issued.
    The manifest is a signed envelope {v, kid, sig, body}; the console shows its body without
    verifying it (it holds no operator key; the devices verify), '?' for what it cannot read."""
    import datetime as dt

    import cbor2

    from cloud_sink.workday import JST

    doc: Any = None
    try:
        env = cbor2.loads(payload)
        body = env.get("body") if isinstance(env, dict) else None
        doc = cbor2.loads(body) if isinstance(body, bytes) else env
    except Exception:  # any unreadable manifest is shown as '?', not a crash
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    issued = doc.get("issued_ms")
    return {"topic": topic, "name": str(doc.get("name", "?")),
            "version": doc.get("version", "?"), "records": doc.get("records", "?"),
            "issued": dt.datetime.fromtimestamp(issued / 1000, JST).strftime("%Y-%m-%d %H:%M")
            if isinstance(issued, int) and not isinstance(issued, bool) and 0 <= issued < 1 << 48
            else "?"}
