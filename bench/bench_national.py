"""National month benchmark: a month of the whole country in PostgreSQL, the 建退共 days-worked
export for every site and contractor (with names), beside a naive GROUP BY over raw touches.

    .venv/bin/python bench/bench_national.py [--fraction 1.0] [--sites 230000] [--month 2026-10]
                                             [--months 1] [--samples 30] [--rebuild]

The database is generated server-side (INSERT ... SELECT over generate_series: no Python row
formatting, which would cost more than the load itself; COPY would still need Python to format
10 M rows) into the schema the store migrates to, secondary keys built after the load, and kept
as ``ccus_nat_<key>`` where the key hashes the parameters and the schema version: a rerun with
the same parameters reuses it (``built`` is null then). Shape: ``--sites`` x ``--fraction``
sites, TECHS technicians a site, DAYS work days each, an entry and an exit a day (230,000
sites -> 5.06 M site-days, 10.1 M touches); 20 sites per main contractor, a first-tier
contractor per site; every site, contractor and technician has a name.

Timed in one run, each the best of --repeat with the 1-minute load average before each run:
the CLI exports (`ccus report days-worked`: per site without names; --by site and --by main
with names, which PostgreSQL shapes and COPYs out), the same named exports through the Python
path (report_cli.days_worked_by_python: what the CLI did before, and does on SQLite) with
their bytes compared, the naive GROUP BY over the month's raw touches, and a single site-month
work-history report (query + shaping + CSV) over random sites. With ``--months N`` the store
holds the N months ending with --month (N monthly partitions; 12: a year, ~120 M touches), the
exports are of --month and the site-month reports of random sites in random months of the N.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_sink.store import open_store  # noqa: E402
from cloud_sink.stores import migrations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("CCUS_TEST_PG_URL",
                          "postgresql://ccus_test:ccus_test@127.0.0.1:5432/postgres")
TECHS, DAYS, SITES_PER_MAIN = 2, 11, 20
GENERATOR = 2   # bump when the generated data changes: the cache key changes with it

# the tables whose primary keys are dropped before the load and built after it (touch_keys:
# the identity of partitioned touches, migration 7, when the schema has it)
KEYED = ("touches", "touch_keys", "work_history", "technicians", "sites", "site_chain")


def db_name(sites: int, month: str, months: int = 1) -> str:
    key = f"{sites}-{TECHS}-{DAYS}-{SITES_PER_MAIN}-{month}-g{GENERATOR}-s{len(migrations.POSTGRES)}"
    if months > 1:
        key += f"-m{months}"
    return "ccus_nat_" + hashlib.sha1(key.encode()).hexdigest()[:10]


def months_ending(month: str, n: int) -> list[str]:
    """The n months "YYYY-MM" ending with `month`, oldest first."""
    y, m = int(month[:4]), int(month[5:])
    index = y * 12 + m - 1
    return [f"{i // 12:04d}-{i % 12 + 1:02d}" for i in range(index - n + 1, index + 1)]


def _url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def _load(url: str, sites: int, months: list[str]) -> dict[str, float]:
    """Fill an empty store's tables with `months` of touches and work history; -> seconds per
    phase."""
    import psycopg

    phases: dict[str, float] = {"touches_s": 0.0, "work_history_s": 0.0}
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("SET synchronous_commit = off")
        db.execute("SET maintenance_work_mem = '512MB'")
        keys = [(t, name, sql) for t in KEYED if db.execute(
                    "SELECT to_regclass(%s)", (t,)).fetchone()[0]
                for name, sql in db.execute(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE"
                    " conrelid = %s::regclass AND contype = 'p'", (t,)).fetchall()]
        secondary = db.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'touches'"
            " AND NOT indexname = ANY(%s)", ([k[1] for k in keys],)).fetchall()
        for name, _ in secondary:
            db.execute(f"DROP INDEX {name}")
        for table, name, _ in keys:
            db.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        parted = db.execute("SELECT to_regproc('ccus_touch_partition')").fetchone()[0]
        has_keys = any(k[0] == "touch_keys" for k in keys)
        # last_in_ms (migration 6, on site now): the day's one entry
        last_in = db.execute("SELECT 1 FROM information_schema.columns WHERE table_name ="
                             " 'work_history' AND column_name = 'last_in_ms'").fetchone()
        site = "lpad((13100000000000 + s)::text, 14, '0')"
        for n, month in enumerate(months):
            _load_month(db, sites, month, n, parted=bool(parted), has_keys=has_keys,
                        last_in=bool(last_in), site=site, phases=phases)
        t0 = time.perf_counter()
        main = f"(20000000000000 + s / {SITES_PER_MAIN})"
        tier = "(30000000000000 + s)"
        db.execute(
            "INSERT INTO sites (site, valid_from, name, kind, prefecture, main_contractor,"
            f" day_cut_hour, fold_persons) SELECT {site}, '2020-01-01', '現場 ' || s, 'site',"
            f" '東京都', {main}::text, 4, NULL FROM generate_series(0, {sites - 1}) s")
        db.execute(
            "INSERT INTO site_chain (site, contractor, parent, name)"
            f" SELECT {site}, {main}::text, '', '元請建設 ' || {main} FROM"
            f" generate_series(0, {sites - 1}) s UNION ALL SELECT {site}, {tier}::text,"
            f" {main}::text, '一次工業 ' || s FROM generate_series(0, {sites - 1}) s")
        db.execute(
            "INSERT INTO technicians (tid, employer, name) SELECT"
            f" (10000000000000 + s::bigint * {TECHS} + k)::text, {tier}::text,"
            f" '技能者 ' || s || '-' || k FROM generate_series(0, {sites - 1}) s,"
            f" generate_series(0, {TECHS - 1}) k")
        phases["registry_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for table, name, sql in keys:
            db.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {sql}")
        for _, sql in secondary:
            db.execute(sql)
        db.execute("ANALYZE")
        phases["keys_and_analyze_s"] = time.perf_counter() - t0
    return {k: round(v, 1) for k, v in phases.items()}


def _load_month(db: object, sites: int, month: str, n: int, *, parted: bool, has_keys: bool,
                last_in: bool, site: str, phases: dict[str, float]) -> None:
    """One month's touches (seqs after those of the n months before) and work history."""
    y, m = int(month[:4]), int(month[5:])
    seq0 = n * TECHS * DAYS * 2   # each device's seqs go on month after month
    if parted:
        db.execute("SELECT ccus_touch_partition(%s)", (month,))  # type: ignore[attr-defined]
    # one row per (site s, technician k, work day d): day-of-month 1 + (2d + k) mod 28
    grid = (f"FROM generate_series(0, {sites - 1}) s, generate_series(0, {TECHS - 1}) k,"
            f" generate_series(0, {DAYS - 1}) d, LATERAL (SELECT"
            f" make_date({y}, {m}, 1 + (2 * d + k) % 28) AS day,"
            " (10000000000000 + s::bigint * " + str(TECHS) + " + k) AS tid) g,"
            " LATERAL (SELECT (extract(epoch FROM (g.day::timestamp AT TIME ZONE"
            " 'Asia/Tokyo')) * 1000)::bigint AS day_ms) j")
    t0 = time.perf_counter()
    db.execute(  # type: ignore[attr-defined]
        "INSERT INTO touches (device, seq, site, role, ts_ms, tq, card, card_tech, tid,"
        " decision, reason, lv, cv, facts, dir, work_day, received_ms, flag, month, person,"
        " course, contractor, slot, result, cut_hour)"
        f" SELECT 'gate-' || {site}, {seq0} + (k * {DAYS} + d) * 2 + x.n, {site}, 'gate', ts.ms,"
        " 'synced', int8send(g.tid), 'felica', g.tid::text, 'allow', 'ok', 3, 1,"
        " '{\"dir\": \"' || x.dir || '\"}', x.dir, g.day::text, ts.ms, NULL,"
        f" '{month}', g.tid::text, NULL, NULL, NULL, NULL, 4 {grid},"
        " (VALUES (1, 'in', 450), (2, 'out', 1020)) x(n, dir, minute),"
        " LATERAL (SELECT j.day_ms + (x.minute + k) * 60000 AS ms) ts")
    if has_keys:
        db.execute("INSERT INTO touch_keys (device, seq) SELECT device, seq FROM touches"  # type: ignore[attr-defined]
                   " WHERE month = %s", (month,))
    phases["touches_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    db.execute(  # type: ignore[attr-defined]
        "INSERT INTO work_history (tid, site, work_day, first_in_ms, last_out_ms, taps,"
        f" cut_hour{', last_in_ms' if last_in else ''}) SELECT g.tid::text, {site},"
        f" g.day::text, j.day_ms + (450 + k) * 60000, j.day_ms + (1020 + k) * 60000, 2, 4"
        f"{', j.day_ms + (450 + k) * 60000' if last_in else ''} {grid}")
    phases["work_history_s"] += time.perf_counter() - t0
    print(f"bench_national: month {month} loaded", file=sys.stderr, flush=True)


def cached_national(sites: int, month: str, rebuild: bool = False, months: int = 1
                    ) -> tuple[str, dict[str, object] | None]:
    """The national store's URL, built unless a complete one of the same key exists."""
    import psycopg

    name = db_name(sites, month, months)
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        sys.exit(f"PostgreSQL is not reachable at {PG_ADMIN}: {exc}")
    with admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and not rebuild:
            with psycopg.connect(_url(name)) as db:
                done = db.execute("SELECT to_regclass('bench_built')").fetchone()[0]
            if done:
                return _url(name), None
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _url(name)
    t0 = time.perf_counter()
    open_store(url).close()   # the schema at the current migration
    phases = _load(url, sites, months_ending(month, months))
    build_s = round(time.perf_counter() - t0, 1)
    with psycopg.connect(url, autocommit=True) as db:   # the mark of a complete build
        db.execute("CREATE TABLE bench_built (build_s REAL NOT NULL)")
        db.execute("INSERT INTO bench_built VALUES (%s)", (build_s,))
    return url, {"build_s": build_s, **phases}


# the named export as the CLI wrote it before PostgreSQL shaped it (report_cli's Python path,
# still every SQLite store's): timed beside the CLI, and its bytes compared with the CLI's
PYTHON_PATH = (
    "import argparse, sys\n"
    "from cloud_sink import report_cli\n"
    "from cloud_sink.store import open_store\n"
    "p = argparse.ArgumentParser()\n"
    "report_cli.register(p.add_subparsers(dest='cmd'))\n"
    "a = p.parse_args(['report', 'days-worked', *sys.argv[1:]])\n"
    "s = open_store(a.store, create=False)\n"
    "report_cli.days_worked_by_python(a, s)\n"
    "s.close()\n")


def _load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def _timed_cli(args: list[str], out: Path, repeat: int, python_path: bool = False
               ) -> dict[str, object]:
    head = ["-c", PYTHON_PATH] if python_path else ["-m", "ccus.cli", "report", "days-worked"]
    times, loads = [], []
    for _ in range(repeat):
        loads.append(_load_avg())
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *head, *args, "--out", str(out)], cwd=ROOT, check=True)
        times.append(time.perf_counter() - t0)
    with open(out, encoding="utf-8", newline="") as f:
        rows = sum(1 for _ in f) - 1
    command = ("report_cli.days_worked_by_python " if python_path
               else "ccus report days-worked ") + " ".join(args)
    return {"command": command, "best_s": round(min(times), 2),
            "all_s": [round(t, 2) for t in times], "load_1m": loads, "rows": rows}


NAIVE = ("SELECT site, tid, COUNT(DISTINCT work_day) FROM touches WHERE month = %s"
         " AND role = 'gate' AND decision = 'allow' AND tid IS NOT NULL GROUP BY site, tid")


def bench(url: str, month: str, repeat: int, samples: int, months: int = 1) -> dict[str, object]:
    import psycopg

    from cloud_sink.reports import output, shape

    out: dict[str, object] = {}
    with psycopg.connect(url) as db:
        out["store"] = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                        for t in ("touches", "work_history", "sites", "technicians", "site_chain")}
        parted = db.execute("SELECT relkind = 'p' FROM pg_class WHERE relname = 'touches'"
                            ).fetchone()[0]
        naive, naive_loads = [], []
        for _ in range(repeat):
            naive_loads.append(_load_avg())
            t0 = time.perf_counter()
            n = len(db.execute(NAIVE, (month,)).fetchall())
            naive.append(time.perf_counter() - t0)
    out["naive_group_by"] = {"sql": NAIVE.replace("%s", f"'{month}'"),
                             "best_s": round(min(naive), 2),
                             "all_s": [round(t, 2) for t in naive], "load_1m": naive_loads,
                             "rows": n}
    named = {"export_per_site_named": "site", "export_per_main_contractor": "main"}
    with tempfile.TemporaryDirectory(prefix="ccus-nat-") as tmp:
        base = ["--store", url, "--month", month]
        out["export_per_site"] = _timed_cli(base, Path(tmp) / "a.csv", repeat)
        for key, by in named.items():
            cli, py = Path(tmp) / f"{by}.csv", Path(tmp) / f"{by}-python.csv"
            out[key] = _timed_cli([*base, "--by", by], cli, repeat)
            out[key]["path"] = "shaped in PostgreSQL, COPY out"  # type: ignore[index]
            out[key + "_python_path"] = _timed_cli([*base, "--by", by], py, repeat, True)
            out[key]["same_bytes_as_python_path"] = cli.read_bytes() == py.read_bytes()  # type: ignore[index]
    for k in ("export_per_site", *named, *(k + "_python_path" for k in named)):
        out[k]["ratio_to_naive"] = round(out[k]["best_s"] / max(min(naive), 0.001), 2)  # type: ignore[index]
    store = open_store(url, create=False)
    rng = random.Random(7)
    n_sites = out["store"]["sites"]  # type: ignore[index]
    times = []
    rows = 0
    year = months_ending(month, months)
    for i in range(samples + 1):
        site = f"{13100000000000 + rng.randrange(n_sites):014d}"
        t0 = time.perf_counter()
        table = shape.work_history(store.work_history(site, rng.choice(year)))
        output.to_csv(table)
        if i:  # the first warms the connection
            times.append((time.perf_counter() - t0) * 1000)
            rows = len(table)
    store.close()
    out["site_month_report"] = {"samples": samples, "rows": rows,
                                "ms_median": round(statistics.median(times), 2),
                                "ms_max": round(max(times), 2), "target_ms": 100,
                                "schema": f"migration {len(migrations.POSTGRES)}, touches "
                                + ("in monthly partitions" if parted else "not partitioned"),
                                "store_months": months}
    out["target_s"] = 10
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=230_000, help="the whole country's sites")
    ap.add_argument("--fraction", type=float, default=1.0, help="of the country, e.g. 0.2")
    ap.add_argument("--month", default="2026-10")
    ap.add_argument("--months", type=int, default=1,
                    help="months in the store, ending with --month (12: a year)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--samples", type=int, default=30, help="site-month reports timed")
    ap.add_argument("--rebuild", action="store_true", help="build even when cached")
    ap.add_argument("--drop", action="store_true", help="drop the database afterwards")
    args = ap.parse_args()
    sites = max(1, round(args.sites * args.fraction))
    url, built = cached_national(sites, args.month, args.rebuild, args.months)
    out: dict[str, object] = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                              "sites": sites, "fraction": args.fraction, "month": args.month,
                              "months": args.months,
                              "database": url.rsplit("/", 1)[1], "built": built}
    out.update(bench(url, args.month, args.repeat, args.samples, args.months))
    if args.drop:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
