"""`ccus report ...`: work history, days worked (建退共), training and vending reports as CSV/JSON/PNG."""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from cloud_sink.reports import output, shape
from cloud_sink.store import Store, open_store

Sub = "argparse._SubParsersAction[argparse.ArgumentParser]"

COLUMNS = {
    "work-history": ["site", "work_day", "technician", "entry", "exit", "entry_missing",
                     "exit_missing", "taps", "hours"],
    "days-worked": ["site", "month", "technician", "days"],
    "training-monthly": ["center", "month", "persons", "touches"],
    "training-courses": ["course", "name", "center", "starts", "ends", "enrolled", "persons",
                         "touches", "card_ownership_rate_pct"],
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
        q.add_argument("--format", choices=["csv", "json"], default="csv")
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

    q = add("days-worked", "days worked per technician per site per month (for 建退共)",
            _days_worked)
    q.add_argument("--month", required=True, help="YYYY-MM")
    q.add_argument("--site")

    q = add("training-monthly", "training centers: unique persons and touches per month",
            _training_monthly)
    q.add_argument("--site", help="one training center (site ID)")
    q.add_argument("--month", help="YYYY-MM")

    add("training-courses", "per course: period, persons, touches, card ownership rate",
        _training_courses, png="also draw enrolled vs touched per course")

    q = add("vending", "vending billing per main contractor and month", _vending,
            png="also draw the vends per contractor and month")
    q.add_argument("--month", help="YYYY-MM")
    q.add_argument("--contractor", help="one main contractor (事業者ID)")
    q.add_argument("--machines", action="store_true", help="one row per machine and site")


def _with_store(args: argparse.Namespace, func: Callable[[argparse.Namespace, Store], int]) -> int:
    try:
        store = open_store(args.store)
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


def _emit(args: argparse.Namespace, name: str, rows: list[dict[str, Any]], **meta: Any) -> None:
    output.emit(rows, args.format, args.out, columns=COLUMNS[name], bom=args.bom,
                meta={"report": name, **{k: v for k, v in meta.items() if v is not None}})


def _work_history(args: argparse.Namespace, store: Store) -> int:
    days = store.work_history(args.site, args.month)
    _emit(args, "work-history", shape.work_history(days), site=args.site, month=args.month,
          timezone="Asia/Tokyo", cut_hour=store.policy.cut_hour)
    if args.png:
        from cloud_sink.reports.charts import attendance_heatmap

        techs, dates, cells = shape.attendance(days, args.month)
        attendance_heatmap(techs, dates, cells,
                           f"site {args.site}, {args.month}: hours on site per technician",
                           args.png)
    return 0


def _days_worked(args: argparse.Namespace, store: Store) -> int:
    _emit(args, "days-worked", shape.days_worked(store.days_worked(args.site, args.month)),
          site=args.site, month=args.month)
    return 0


def _training_monthly(args: argparse.Namespace, store: Store) -> int:
    _emit(args, "training-monthly",
          shape.training_monthly(store.training_monthly(args.site, args.month)),
          center=args.site, month=args.month)
    return 0


def _training_courses(args: argparse.Namespace, store: Store) -> int:
    rows = shape.training_courses(store.training_courses())
    _emit(args, "training-courses", rows)
    if args.png:
        from cloud_sink.reports.charts import course_bars

        course_bars(rows, "training courses: enrolled vs touched", args.png)
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
