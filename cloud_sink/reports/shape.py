"""Report shaping (pure): store rows -> the tables people read, as lists of flat dicts.

Times are Asia/Tokyo 'HH:MM'; a missing entry or exit stays empty with its *_missing flag set,
never invented. The card ownership rate is persons who touched / enrolled, in percent with one
decimal (half up), None when the enrolled count is unknown or zero.
"""

from collections import defaultdict
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from cloud_sink.model import CourseStats, TrainingMonth, VendingRow, WorkDay
from cloud_sink.workday import local_time

Table = list[dict[str, Any]]


def work_history(days: list[WorkDay]) -> Table:
    out = []
    for d in days:
        hours = None
        if d.first_in_ms is not None and d.last_out_ms is not None and d.last_out_ms >= d.first_in_ms:
            hours = round((d.last_out_ms - d.first_in_ms) / 3600_000, 2)
        out.append({"site": d.site, "work_day": d.work_day, "technician": d.tid,
                    "entry": local_time(d.first_in_ms) if d.first_in_ms is not None else "",
                    "exit": local_time(d.last_out_ms) if d.last_out_ms is not None else "",
                    "entry_missing": d.entry_missing, "exit_missing": d.exit_missing,
                    "taps": d.taps, "hours": hours})
    return out


def days_worked(rows: list[tuple[str, str, str, int]]) -> Table:
    """The 建退共 figure: days worked per technician per site per month."""
    return [{"site": s, "month": m, "technician": t, "days": n} for s, m, t, n in rows]


def month_days(month: str) -> list[str]:
    first = date.fromisoformat(f"{month}-01")
    nxt = (first + timedelta(days=32)).replace(day=1)
    return [(first + timedelta(days=i)).isoformat() for i in range((nxt - first).days)]


def attendance(days: list[WorkDay], month: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(technicians, dates, cells) for a site-month heat map: hours on site, 0.0 for a day with
    an entry or exit missing (present, duration unknown), None for a day not worked."""
    dates = month_days(month)
    col = {d: i for i, d in enumerate(dates)}
    techs = sorted({d.tid for d in days})
    row = {t: i for i, t in enumerate(techs)}
    cells: list[list[float | None]] = [[None] * len(dates) for _ in techs]
    for d in days:
        if d.work_day not in col:
            continue
        h = 0.0
        if d.first_in_ms is not None and d.last_out_ms is not None:
            h = max(0.0, (d.last_out_ms - d.first_in_ms) / 3600_000)
        cells[row[d.tid]][col[d.work_day]] = round(h, 2)
    return techs, dates, cells


def training_monthly(rows: list[TrainingMonth]) -> Table:
    return [{"center": r.site, "month": r.month, "persons": r.persons, "touches": r.touches}
            for r in rows]


def ownership_rate(persons: int, enrolled: int | None) -> float | None:
    if not enrolled:
        return None
    pct = (Decimal(persons) * 100 / Decimal(enrolled)).quantize(Decimal("0.1"), ROUND_HALF_UP)
    return float(pct)


def training_courses(rows: list[CourseStats]) -> Table:
    return [{"course": c.course, "name": c.name or "", "center": c.center or "",
             "starts": c.starts or "", "ends": c.ends or "", "enrolled": c.enrolled,
             "persons": c.persons, "touches": c.touches,
             "card_ownership_rate_pct": ownership_rate(c.persons, c.enrolled)} for c in rows]


def vending_billing(rows: list[VendingRow]) -> Table:
    """Per main contractor and month: billable drinks (dispensed) and the vends not billed."""
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    machines: dict[tuple[str, str], set[str]] = defaultdict(set)
    sites: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        k = (r.contractor, r.month)
        a = acc.setdefault(k, {"contractor": r.contractor or "unknown", "month": r.month,
                               "machines": 0, "sites": 0, "dispensed": 0, "failed": 0,
                               "indeterminate": 0})
        a["dispensed"] += r.dispensed
        a["failed"] += r.failed
        a["indeterminate"] += r.indeterminate
        machines[k].add(r.device)
        sites[k].add(r.site)
    for k, a in acc.items():
        a["machines"], a["sites"] = len(machines[k]), len(sites[k])
    return [acc[k] for k in sorted(acc)]


def vending_machines(rows: list[VendingRow]) -> Table:
    return [{"contractor": r.contractor or "unknown", "month": r.month, "site": r.site,
             "machine": r.device, "dispensed": r.dispensed, "failed": r.failed,
             "indeterminate": r.indeterminate} for r in rows]
