"""`ccus report ...`: work history, days worked (建退共), training and vending reports as CSV/JSON/PNG."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sink.registry import by_site, rule_on
from cloud_sink.reports import output, pg_days, shape
from cloud_sink.store import Store, open_store
from cloud_sink.stores.base import month_bounds

Sub = "argparse._SubParsersAction[argparse.ArgumentParser]"

COLUMNS = {
    "work-history": ["site", "work_day", "technician", "entry", "exit", "entry_missing",
                     "exit_missing", "taps", "hours", "cut_hour"],
    "days-worked": ["site", "month", "technician", "days"],
    "days-worked-by": shape.DAYS_COLUMNS,
    "training-monthly": ["center", "month", "persons", "touches", "persons_unique"],
    "training-courses": ["center", "course", "name", "starts", "ends", "enrolled", "persons",
                         "touches", "card_ownership_rate_pct", "persons_unique"],
    "vending": ["contractor", "month", "machines", "sites", "dispensed", "failed", "indeterminate"],
    "vending-machines": ["contractor", "month", "site", "machine", "dispensed", "failed",
                         "indeterminate"],
}


def register(sub: Sub) -> None:  # type: ignore[valid-type]
    """Add the `report` command group to the `ccus` parser's subcommands."""
    p = sub.add_parser("report", help="reports from the store: CSV, JSON and PNG charts")  # type: ignore[attr-defined]
    r = p.add_subparsers(dest="report_cmd", required=True, metavar="REPORT")

    def add(name: str, help: str, func: Callable[[argparse.Namespace, Store], int],
            png: str | None = None) -> argparse.ArgumentParser:
        q = r.add_parser(name, help=help)
        q.add_argument("--db", "--store", dest="store", required=True, metavar="URL",
                       help="a path or sqlite:///path (SQLite), or postgresql://...")
        q.add_argument("--format", choices=["csv", "json", "text"], default="csv",
                       help="text: a table for people (work-history only)")
        q.add_argument("--out", "-o", help="output file (default: stdout)")
        q.add_argument("--bom", action="store_true", help="CSV with a UTF-8 BOM, for Excel")
        if png:
            q.add_argument("--png", metavar="FILE", help=png)
        q.set_defaults(func=lambda args: _with_store(args, func))
        return q

    q = add("work-history", "a site's month: who worked which days, entry and exit times",
            _work_history, png="also draw the site-month attendance heat map")
    q.add_argument("--site", required=True)
    q.add_argument("--month", required=True, help="YYYY-MM")
    q.set_defaults(text_ok=True)

    q = add("days-worked", "days worked per technician per site per month (for 建退共)",
            _days_worked, png="also draw the days per technician")
    q.add_argument("--month", required=True, help="YYYY-MM")
    q.add_argument("--site")
    q.add_argument("--by", choices=shape.DAYS_BY,
                   help="main: 元請一括 (per main contractor, all its sites); site: the same rows "
                   "per site, with the names; first-tier: "
                   "一次下請一括; technician: per technician with the employer")
    q.add_argument("--contractor", help="with --by: one contractor (事業者ID)")
    q.add_argument("--ja", action="store_true", help="Japanese column names (with --by)")

    q = add("training-monthly", "training centers: persons and touches per month, with a total",
            _training_monthly, png="also draw persons and touches per month")
    q.add_argument("--site", help="one training center (site ID)")
    q.add_argument("--month", help="YYYY-MM: only this month")
    q.add_argument("--from", dest="first", metavar="YYYY-MM", help="first month (default: the first"
                   " with touches)")
    q.add_argument("--to", dest="last", metavar="YYYY-MM", help="last month (default: the last"
                   " with touches)")

    q = add("training-courses", "per course: period, persons, touches, card ownership rate",
            _training_courses, png="also draw enrolled vs touched per course")
    q.add_argument("--site", help="one training center (site ID)")
    q.add_argument("--fold", type=int, metavar="N",
                   help="fold courses with at most N persons into one 'other courses' row"
                   " (default: the center's fold_persons in the site registry, else"
                   f" {shape.FOLD_DEFAULT}; 0 folds only untouched courses, -1 none)")

    q = add("vending", "vending billing per main contractor and month", _vending,
            png="also draw the vends per contractor and month")
    q.add_argument("--month", help="YYYY-MM")
    q.add_argument("--contractor", help="one main contractor (事業者ID)")
    q.add_argument("--machines", action="store_true", help="one row per machine and site")


def _with_store(args: argparse.Namespace, func: Callable[[argparse.Namespace, Store], int]) -> int:
    try:
        store = open_store(args.store, create=False)  # a report never creates a store
    except (ValueError, RuntimeError) as exc:
        print(f"ccus report: {exc}", file=sys.stderr)
        return 2
    try:
        return func(args, store)
    except ValueError as exc:
        print(f"ccus report: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _emit(args: argparse.Namespace, name: str, rows: list[dict[str, Any]],
          header: dict[str, str] | None = None, **meta: Any) -> None:
    if args.format == "text":
        raise ValueError(f"--format text is for work-history; {name} writes csv or json")
    output.emit(rows, args.format, args.out, columns=COLUMNS[name], bom=args.bom, header=header,
                meta={"report": name, **{k: v for k, v in meta.items() if v is not None}})


def _work_history(args: argparse.Namespace, store: Store) -> int:
    days = store.work_history(args.site, args.month)
    rules = store.sites(args.site)
    rule = rule_on(rules, f"{args.month}-31")
    cuts = sorted({d.cut_hour for d in days if d.cut_hour is not None})
    name = rule.name if rule else ""
    if args.format == "text":
        text = shape.work_history_text(args.site, name, args.month, cuts, rule is not None,
                                       shape.work_history(days), _names(store))
        if args.out and args.out != "-":
            Path(args.out).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
    else:
        _emit(args, "work-history", shape.work_history(days), site=args.site, site_name=name,
              registered=rule is not None, month=args.month, timezone="Asia/Tokyo",
              cut_hours=cuts)
    if args.png:
        from cloud_sink.reports.charts import attendance_heatmap

        techs, dates, cells, missing = shape.attendance(days, args.month)
        names = _names(store)
        cut = ", ".join(f"{c:02d}:00" for c in cuts) or "-"
        attendance_heatmap([names.get(t, "") for t in techs], techs, dates, cells, missing,
                           f"site {args.site} {name}, {args.month} (work day cut {cut} Asia/Tokyo)"
                           ": hours on site", args.png)
    return 0


def _names(store: Store) -> dict[str, str]:
    return {t.tid: t.name for t in store.technicians() if t.name}


def days_in_database(args: argparse.Namespace, store: Store) -> bool:
    """Whether the named export is shaped and written by PostgreSQL (pg_days: the same bytes)
    rather than in Python: CSV of --by main or site from a store that can COPY out."""
    return (args.by in pg_days.BY and args.format == "csv" and bool(args.month)
            and hasattr(store, "copy_out"))


def days_worked_by_python(args: argparse.Namespace, store: Store) -> None:
    """The `--by` export shaped in Python (every store, every --by, CSV and JSON)."""
    rows = shape.days_worked_by(store.days_worked_named(args.site, args.month), args.by,
                                by_site(store.sites()), store.chain(), args.contractor)
    _emit(args, "days-worked-by", rows, header=shape.DAYS_JA if args.ja else None,
          by=args.by, contractor=args.contractor, site=args.site, month=args.month)


def days_worked_by_database(args: argparse.Namespace, store: Store) -> None:
    pg_days.write(store, args.by, args.site, args.month, args.contractor,  # type: ignore[arg-type]
                  args.out, bom=args.bom, header=shape.DAYS_JA if args.ja else None)


def _days_worked(args: argparse.Namespace, store: Store) -> int:
    if args.by and days_in_database(args, store):
        days_worked_by_database(args, store)
    elif args.by:
        days_worked_by_python(args, store)
    else:
        rows = shape.days_worked(store.days_worked(args.site, args.month))
        _emit(args, "days-worked", rows, site=args.site, month=args.month)
    if args.png:
        from cloud_sink.reports.charts import days_bars

        raw = store.days_worked(args.site, args.month)
        names = _names(store)
        site_names = {r.site: r.name for r in store.sites()}   # the latest row's name
        days_bars(raw, names, f"days worked, {args.month}"
                  + (f", site {args.site}" if args.site else ""), args.png, site_names)
    return 0


def training_monthly_rows(store: Store, site: str | None, first: str | None,
                          last: str | None) -> list[dict[str, Any]]:
    """The training-monthly table (also the console's): months first..last of one center or all."""
    for m in (first, last):
        if m:
            month_bounds(m)
    months = [r for r in store.training_monthly(site)
              if (not first or r.month >= first) and (not last or r.month <= last)]
    centers = {r.site for r in months} | ({site} if site else set())
    unique = {c: store.training_persons(c, first, last) for c in centers}
    return shape.training_monthly_table(months, unique, first, last)


def _training_monthly(args: argparse.Namespace, store: Store) -> int:
    first, last = (args.month, args.month) if args.month else (args.first, args.last)
    rows = training_monthly_rows(store, args.site, first, last)
    _emit(args, "training-monthly", rows, center=args.site, first=first, last=last)
    if args.png:
        from cloud_sink.reports.charts import training_bars

        training_bars(rows, "training: persons and touches per month", args.png)
    return 0


def training_course_rows(store: Store, site: str | None,
                         fold: int | None = None) -> list[dict[str, Any]]:
    """The training-courses table (also the console's): one center's courses, or all."""
    stats = store.training_courses(site)
    unique = {c: store.training_persons(c, with_course=True) for c in {s.center or "" for s in stats}}
    centers = set(unique)
    if fold is not None:
        folds = dict.fromkeys(centers, fold)
    else:   # each center's own N, from its latest registry row
        latest = {r.site: r for r in store.sites()}
        folds = {c: f for c in centers if c in latest and (f := latest[c].fold_persons) is not None}
    return shape.training_course_table(stats, folds, unique)


def _training_courses(args: argparse.Namespace, store: Store) -> int:
    rows = training_course_rows(store, args.site, args.fold)
    _emit(args, "training-courses", rows, center=args.site, fold=args.fold)
    if args.png:
        from cloud_sink.reports.charts import course_bars

        course_bars([r for r in rows if r["course"] != "total"],
                    "training courses: enrolled vs touched", args.png)
    return 0


def _vending(args: argparse.Namespace, store: Store) -> int:
    ledger = store.vending_ledger(args.month, args.contractor)
    if args.machines:
        _emit(args, "vending-machines", shape.vending_machines(ledger), month=args.month,
              contractor=args.contractor)
    else:
        _emit(args, "vending", shape.vending_billing(ledger), month=args.month,
              contractor=args.contractor)
    if args.png:
        from cloud_sink.reports.charts import vending_bars

        vending_bars(shape.vending_billing(ledger), "vending: drinks per main contractor and month",
                     args.png)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cloud_sink.report_cli ...` until `ccus report` is hooked into ccus/cli.py."""
    p = argparse.ArgumentParser(prog="ccus")
    register(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
