"""Report shaping (pure): store rows -> the tables people read, as lists of flat dicts.

Times are Asia/Tokyo 'HH:MM'; a missing entry or exit stays empty with its *_missing flag set,
never invented. The card ownership rate is persons who touched / enrolled, in percent with one
decimal (half up), None when the enrolled count is unknown or zero.
"""

from collections import defaultdict
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from operator import itemgetter
from typing import Any

from cloud_sink.model import CourseStats, TrainingMonth, VendingRow, WorkDay
from cloud_sink.registry import ChainLink, SiteRule, first_tier_of, rule_on
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
                    "taps": d.taps, "hours": hours, "cut_hour": d.cut_hour})
    return out


def days_worked(rows: list[tuple[str, str, str, int]]) -> Table:
    """The 建退共 figure: days worked per technician per site per month."""
    return [{"site": s, "month": m, "technician": t, "days": n} for s, m, t, n in rows]


def month_days(month: str) -> list[str]:
    first = date.fromisoformat(f"{month}-01")
    nxt = (first + timedelta(days=32)).replace(day=1)
    return [(first + timedelta(days=i)).isoformat() for i in range((nxt - first).days)]


Cells = list[list[float | None]]


def attendance(days: list[WorkDay], month: str
               ) -> tuple[list[str], list[str], Cells, list[tuple[int, int]]]:
    """(technicians, dates, cells, missing) for a site-month heat map: cells hold the hours on
    site of a day with both an entry and an exit (0.0 is a real zero-hour day), None otherwise;
    `missing` lists the (row, column) of days worked with an entry or exit missing."""
    dates = month_days(month)
    col = {d: i for i, d in enumerate(dates)}
    techs = sorted({d.tid for d in days})
    row = {t: i for i, t in enumerate(techs)}
    cells: Cells = [[None] * len(dates) for _ in techs]
    missing: list[tuple[int, int]] = []
    for d in days:
        if d.work_day not in col:
            continue
        i, j = row[d.tid], col[d.work_day]
        if d.first_in_ms is None or d.last_out_ms is None:
            missing.append((i, j))
        else:
            cells[i][j] = round(max(0.0, (d.last_out_ms - d.first_in_ms) / 3600_000), 2)
    return techs, dates, cells, missing


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


def month_range(first: str, last: str) -> list[str]:
    """'YYYY-MM'..'YYYY-MM' inclusive."""
    y, m = int(first[:4]), int(first[5:7])
    out = []
    while f"{y:04d}-{m:02d}" <= last:
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def training_monthly_table(rows: list[TrainingMonth], unique: dict[str, int],
                           first: str | None = None, last: str | None = None) -> Table:
    """Per center: one row per month first..last (default: the center's first to last month
    with touches), months without touches as 0, 0; then a total row: the sum of the monthly
    rows (as the centers publish it) with the persons unique over the period beside it."""
    by_center: dict[str, dict[str, TrainingMonth]] = defaultdict(dict)
    for r in rows:
        by_center[r.site][r.month] = r
    for c in unique:
        by_center.setdefault(c, {})
    out: Table = []
    for center in sorted(by_center):
        months = by_center[center]
        lo, hi = first or min(months, default=None), last or max(months, default=None)
        span = month_range(lo, hi) if lo and hi else []
        persons = touches = 0
        for m in span:
            got = months.get(m)
            p, n = (got.persons, got.touches) if got else (0, 0)
            persons, touches = persons + p, touches + n
            out.append({"center": center, "month": m, "persons": p, "touches": n,
                        "persons_unique": None})
        out.append({"center": center, "month": "total", "persons": persons, "touches": touches,
                    "persons_unique": unique.get(center, 0)})
    return out


OTHER_COURSES = "other courses"


FOLD_DEFAULT = 6


def training_course_table(stats: list[CourseStats], folds: dict[str, int],
                          unique: dict[str, int]) -> Table:
    """Per center: each course with more than the center's fold (folds[center], else
    FOLD_DEFAULT) persons, the rest folded into one "other courses" row (sums), then a total
    row (sums, with the persons unique over the center's course touches beside it)."""
    by_center: dict[str, list[CourseStats]] = defaultdict(list)
    for c in stats:
        by_center[c.center or ""].append(c)
    out: Table = []
    for center in sorted(by_center):
        courses = sorted(by_center[center], key=lambda c: c.course)
        fold = folds.get(center, FOLD_DEFAULT)
        kept = [c for c in courses if c.persons > fold]
        folded = [c for c in courses if c.persons <= fold]
        out += [r for r in training_courses(kept)]
        for r in out[len(out) - len(kept):]:
            r["persons_unique"] = None
        if folded:
            out.append({"course": OTHER_COURSES, "center": center,
                        "name": f"{len(folded)} course{'s' * (len(folded) != 1)} with at most"
                                f" {fold} person{'s' * (fold != 1)}",
                        "starts": "", "ends": "",
                        "enrolled": sum(c.enrolled or 0 for c in folded),
                        "persons": sum(c.persons for c in folded),
                        "touches": sum(c.touches for c in folded),
                        "card_ownership_rate_pct": None, "persons_unique": None})
        out.append({"course": "total", "center": center, "name": "", "starts": "", "ends": "",
                    "enrolled": sum(c.enrolled or 0 for c in courses),
                    "persons": sum(c.persons for c in courses),
                    "touches": sum(c.touches for c in courses),
                    "card_ownership_rate_pct": None, "persons_unique": unique.get(center, 0)})
    return out


DAYS_BY = ("main", "site", "first-tier", "technician")
DAYS_COLUMNS = ["contractor", "contractor_name", "site", "site_name", "month", "technician",
                "technician_name", "employer", "days"]
DAYS_JA = {"contractor": "事業者ID", "contractor_name": "事業者名", "site": "現場ID",
           "site_name": "現場名", "month": "年月", "technician": "技能者ID",
           "technician_name": "技能者氏名", "employer": "所属事業者ID", "days": "就業日数"}


def days_worked_by(rows: list[tuple[str, str, str, int, str, str]], by: str,
                   sites: dict[str, list[SiteRule]], chain: list[ChainLink],
                   contractor: str | None = None) -> Table:
    """The 建退共 figure in CCUS's three ways, one row per (contractor, site, month, technician),
    from Store.days_worked_named() rows (site, month, technician, days, employer, name):
    - main (元請一括): the contractor is the site's main contractor (the registry row in force
      on the month's last day), for all its sites;
    - site (現場別): the same rows (the main contractor named) in site order, one site after
      the other: the per-site export with names;
    - first-tier (一次下請一括): the first-tier subcontractor on that site the technician's
      employer works under (the employer itself, or one below it in the site's chain);
      technicians of the main contractor itself or outside the chain are in no first tier's;
    - technician: the contractor is the technician's own employer (所属事業者).
    """
    if by not in DAYS_BY:
        raise ValueError(f"--by must be one of {', '.join(DAYS_BY)}")
    names: dict[str, str] = {}
    links: dict[str, list[ChainLink]] = defaultdict(list)
    for link in chain:
        links[link.site].append(link)
        if link.name:
            names.setdefault(link.contractor, link.name)
    tiers: dict[str, dict[str, str]] = {}
    rules: dict[tuple[str, str], SiteRule | None] = {}   # one lookup a site-month, not a row
    out: Table = []
    for site, month, tid, days, employer, tech_name in rows:
        key = (site, month)
        if key not in rules:
            rules[key] = rule_on(sites.get(site), f"{month}-31")
        rule = rules[key]
        main = rule.main_contractor if rule else ""
        if by in ("main", "site"):
            who = main
        elif by == "technician":
            who = employer
        else:
            if site not in tiers:
                tiers[site] = first_tier_of(links.get(site, []), main)
            who = tiers[site].get(employer, "")
            if not who:
                continue
        if contractor and who != contractor:
            continue
        out.append({"contractor": who, "contractor_name": names.get(who, ""), "site": site,
                    "site_name": rule.name if rule else "", "month": month, "technician": tid,
                    "technician_name": tech_name, "employer": employer, "days": days})
    first = ("site", "contractor") if by == "site" else ("contractor", "site")
    out.sort(key=itemgetter(*first, "month", "technician"))
    return out


def work_history_text(site: str, name: str, month: str, cuts: list[int], registered: bool,
                      rows: Table, names: dict[str, str]) -> str:
    """The site-month view for people: a header with the site's name and the cut(s) its rows
    were made with, then one line per technician and work day."""
    cut = ", ".join(f"{c:02d}:00" for c in cuts) or "-"
    head = [f"site {site} {name or '(not in the site registry: default cut)'}, {month}",
            f"work day cut {cut} Asia/Tokyo" + ("" if registered else ", unregistered site"),
            f"{'work day':<10}  {'technician':<14}  {'name':<12}  {'entry':>5}  {'exit':>5}"
            f"  {'hours':>5}  taps  cut"]
    lines = []
    for r in rows:
        hours = "" if r["hours"] is None else f"{r['hours']:.2f}"
        lines.append(f"{r['work_day']:<10}  {r['technician']:<14}  "
                     f"{_pad(names.get(r['technician'], ''), 12)}  {r['entry'] or 'miss':>5}  "
                     f"{r['exit'] or 'miss':>5}  {hours:>5}  {r['taps']:>4}  "
                     f"{'' if r['cut_hour'] is None else r['cut_hour']:>3}")
    return "\n".join(head + lines) + "\n"


def _pad(text: str, width: int) -> str:
    """Left-justify counting East Asian wide characters as two columns."""
    import unicodedata

    w = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(0, width - w)
