"""Page models (pure): the work-history grid, on-site-now list, touch rows and SVG bar geometry.

Every figure comes from cloud_sink.reports.shape over the store's rows, so the pages show what
`ccus report` prints. A grid cell is 'HH:MM-HH:MM' with '?' for a missing entry or exit; the
CSV of the grid is these same strings.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud_sink.model import WorkDay
from cloud_sink.reports import shape
from cloud_sink.workday import local_time
from console import i18n
from protocol.touch import Touch

MISSING = "?"


def escaper() -> Callable[[Any], str]:
    """html escaping (markupsafe's C speedups: & < > " ') memoized for one page: a fleet or a
    grid repeats the same few values (site, role, software, HH:MM) hundreds of times, and
    escaping was the fleet rows' largest cost under cProfile (15 calls a row)."""
    from markupsafe import escape

    seen: dict[Any, str] = {}

    def esc(x: Any) -> str:
        out = seen.get(x)
        if out is None:
            out = seen[x] = str(escape(x))
        return out
    return esc


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


def grid_rows_html(g: Grid, lang: str) -> str:
    """The work-history grid's body rows as HTML, built here rather than in Jinja2: a site-month
    is ~40 technicians x 30 days, and the template's per-cell calls and escaping made the page
    1.52x the report (bench/bench_console.py); this keeps it within 1.5x. Every value goes
    through escaper(); the markup is the template's (tests/test_console_e2e.py reads it)."""
    escape = escaper()
    l_entry, l_exit, l_missing = (escape(i18n.t(k, lang)) for k in ("entry", "exit", "missing"))
    month = escape(g.month)
    out = []
    for i, tech in enumerate(g.technicians):
        te = escape(tech)
        cells = []
        for d, c in zip(g.dates, g.cells[i], strict=True):
            if c is None:
                cells.append("<td></td>")
                continue
            en = escape(c.entry) if c.entry else l_missing
            ex = escape(c.exit) if c.exit else l_missing
            cells.append(f'<td class="{"miss" if c.missing else "ok"}" data-date="{d}" '
                         f'title="{l_entry} {en} / {l_exit} {ex}">{escape(c.text)}</td>')
        out.append(f'<tr data-technician="{te}"><th><a href="/technicians/{te}?month={month}">'
                   f'{te}</a></th>\n{"".join(cells)}\n<td class="num">{g.days(i)}</td></tr>')
    return "\n".join(out)


def on_site(rows: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """The roll call from the store's `on_site(site, day)`: (technician, entry of the current
    stay) of whoever's last passage that day is an entry, earliest entry first."""
    return [{"technician": who, "entry": local_time(ms), "entry_ms": ms}
            for who, ms in sorted(rows, key=lambda r: (r[1], r[0]))]


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
    escaping (bench/bench_console.py). Every value goes through escaper(). Board health is
    the gate's `board` (ops.fleet.Row.gate), disk the outbox's (ops.fleet.Row.disk)."""
    escape = escaper()

    def t(key: str) -> str:
        return escape(i18n.t(key, lang))

    def v(x: Any) -> str:
        return "-" if x is None or x == "" else escape(x)

    on, off, ok = t("online"), t("offline"), t("ok")
    minutes: dict[int, str] = {}

    def hhmm(ms: int) -> str:
        # 'HH:MM' depends on the minute only (JST is a whole-hour offset): 1,000 devices seen in
        # the last minutes share a few strftime calls
        m = ms // 60_000
        if m not in minutes:
            minutes[m] = local_time(m * 60_000)
        return minutes[m]
    out = []
    for r in rows:
        readers = " ".join(
            f'<span class="{"okc" if h == "ok" else "badc"}">{escape(n)}:{escape(h)}</span>'
            for n, h in sorted(r.readers.items())) or "-"
        seen = hhmm(r.last_seen_ms) if r.last_seen_ms else "-"
        out.append(
            f'<tr class="{"bad" if r.problems else "good"}" data-device="{escape(r.dev)}">'
            f"<td>{escape(r.site)}</td><td>{escape(r.dev)}</td><td>{v(r.role)}</td>"
            f'<td class="{"on" if r.online else "off"}">{on if r.online else off}</td>'
            f'<td title="{seen}">{ago(r.last_seen_ms, now_ms, lang)}</td><td>{v(r.sw)}</td>'
            f"<td>{v(r.cv)}</td><td>{v(r.lv)}</td><td>{v(r.backlog)}</td>"
            f"<td>{ago(r.oldest_ms, now_ms, lang) if r.oldest_ms else '-'}</td><td>{readers}</td>"
            f"<td>{v((getattr(r, 'gate', None) or {}).get('board'))}</td><td>{v(r.tq)}</td>"
            f"<td>{v(r.disk)}</td>"
            f'<td class="problems">{escape(", ".join(r.problems)) or ok}</td></tr>')
    return "\n".join(out)


def _cbor_map(payload: bytes) -> dict[str, Any]:
    import cbor2
    try:
        doc = cbor2.loads(payload)
    except Exception:  # an unreadable retained payload is shown as '?', not a crash
        return {}
    return doc if isinstance(doc, dict) else {}


def _sealed_body(payload: bytes) -> dict[str, Any]:
    """The body of a signed envelope {v, kid, sig, body} without verifying it: the console holds
    no operator key (the devices verify); {} for anything it cannot read."""
    body = _cbor_map(payload).get("body")
    return _cbor_map(body) if isinstance(body, bytes) else {}


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def config_rows(configs: dict[str, bytes], acks: dict[str, bytes],
                devices: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Config pushes and their acknowledgements per device, from the retained topics: the push
    that applies to a device is the newer of its own and its site's (versions are issue times,
    docs/config.md), its ack the device's retained config/ack. status: applied (the ack names
    that version and says applied), refused (it names it and says anything else, or names no
    version, as for a bad signature, and came after the push), waiting (no ack for it yet).
    An ack is attributed to its topic's device, as ops.configpush does.
    `devices` (the fleet's) adds the devices a site-wide push is waiting for."""
    from protocol import topics

    pushed: dict[tuple[str, str], dict[str, Any]] = {}   # (site, dev or _site) -> push
    for topic, payload in configs.items():
        parts = topic.split("/")
        doc = _sealed_body(payload)
        pushed[(parts[2], parts[3])] = {"version": _int(doc.get("version")),
                                        "issued_ms": _int(doc.get("issued_ms"))}
    got: dict[tuple[str, str], dict[str, Any]] = {}
    for topic, payload in acks.items():
        where = topics.parse_config_ack(topic)
        if where is not None:
            got[where] = _cbor_map(payload)
    keys = {k for k in pushed if k[1] != topics.SITE_LEVEL} | set(got)
    keys |= {d for d in devices if (d[0], topics.SITE_LEVEL) in pushed}
    out = []
    for site, dev in sorted(keys):
        own, whole = pushed.get((site, dev)), pushed.get((site, topics.SITE_LEVEL))
        cands = [(p["version"], scope, p) for scope, p in (("device", own), ("site", whole))
                 if p is not None and p["version"] is not None]
        version, scope, push = max(cands, key=lambda c: c[0]) if cands else (None, "-", {})
        ack = got.get((site, dev), {})
        acked = _int(ack.get("version"))
        result = str(ack.get("result", "")) if ack else ""
        issued, ts = push.get("issued_ms"), _int(ack.get("ts"))
        status = ("waiting" if version is None or acked != version
                  else "applied" if result == "applied" else "refused")
        if version is None and ack:
            status = "applied" if result == "applied" else "refused"
        # a push the device cannot verify is refused by an ack naming no version (it could not
        # read one): it answers this push when it came after the push was issued
        if (acked is None and ack and result == "refused" and ts is not None
                and issued is not None and ts >= issued):
            status = "refused"
        out.append({"site": site, "device": dev, "scope": scope,
                    "version": "-" if version is None else version,
                    "issued": local_time(issued) if issued is not None and 0 <= issued < 1 << 48
                    else "-",
                    "acked": "-" if acked is None else acked, "result": result or "-",
                    "reason": str(ack.get("reason") or ""), "cv": ack.get("cv", "-"),
                    "ack_time": local_time(ts) if ts is not None and 0 <= ts < 1 << 48 else "-",
                    "status": status})
    # problems first, as the fleet: refused, then waiting, then applied
    rank = {"refused": 0, "waiting": 1, "applied": 2}
    return sorted(out, key=lambda r: rank[r["status"]])


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
