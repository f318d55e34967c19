"""`ccus sink ...`: run the sink, import files, manage courses, devices and the site registry,
list dead letters."""

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sink.model import BATCH_MAX, DAY_MS, Policy
from cloud_sink.store import Store, open_store
from cloud_sink.workday import local_date, local_time

Sub = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_store_args(p: argparse.ArgumentParser, *, policy: bool = False) -> None:
    p.add_argument("--db", "--store", dest="store", required=True, metavar="URL",
                   help="store: a path or sqlite:///path (SQLite), or postgresql://...")
    if policy:
        p.add_argument("--cut-hour", type=int, default=4, help="work-day cut hour, Asia/Tokyo")
        p.add_argument("--max-future-h", type=float, default=24.0,
                       help="flag touches stamped more than this ahead of receipt (default 24)")
        p.add_argument("--max-past-days", type=float, default=400.0,
                       help="flag touches stamped more than this before receipt (default 400)")
        p.add_argument("--registered-only", action="store_true",
                       help="dead-letter touches from devices not in the device registry")


def policy_of(args: argparse.Namespace) -> Policy:
    return Policy(cut_hour=args.cut_hour, max_future_ms=int(args.max_future_h * 3600_000),
                  max_past_ms=int(args.max_past_days * DAY_MS),
                  require_registered=args.registered_only)


def store_of(args: argparse.Namespace, *, create: bool = False) -> Store:
    """The command's store. Only `sink run` and the imports may create one: every other
    command opens an existing store (a typo gives "no store at PATH", not an empty store).
    A fault is a StoreError: ccus.cli prints its one line and exits 2."""
    return open_store(args.store, policy_of(args) if hasattr(args, "cut_hour") else None,
                      create=create)


def register(sub: Sub) -> None:  # type: ignore[valid-type]
    p = sub.add_parser("sink", help="the cloud sink: ingest touches, derive work history")  # type: ignore[attr-defined]
    s = p.add_subparsers(dest="sink_cmd", required=True, metavar="COMMAND")

    run = s.add_parser("run", help="subscribe to all touches and store them")
    add_store_args(run, policy=True)
    run.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    run.add_argument("--nats", metavar="URL[,URL...]",
                     help="consume from the NATS cluster tier (JetStream pull consumer) instead of "
                          "--broker: nats://HOST:PORT of one or more nodes")
    run.add_argument("--group", default="sink",
                     help="shared-subscription group; with --nats the durable consumer (default: sink)")
    run.add_argument("--client-id", default="sink-1", help="MQTT client id, unique per process")
    run.add_argument("--batch", type=int, default=BATCH_MAX,
                     help=f"touches per transaction at most (default {BATCH_MAX})")
    run.add_argument("--ready-file", help="touch this file once subscribed (for scripts)")
    run.add_argument("--ca", help="CA certificate (PEM): connect with TLS")
    run.add_argument("--cert", help="the sink's client certificate (PEM), from `ccus ops identity`")
    run.add_argument("--key", help="the sink's private key (PEM, mode 0600)")
    run.add_argument("--metrics", metavar="HOST:PORT|off",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (default "
                     "127.0.0.1:9464; taken by another sink: a warning, no metrics; off: none)")
    run.add_argument("--check", action="store_true",
                     help="check the store, certificates, broker and metrics port; print a "
                     "checklist and exit (1 on any failure) without running")
    run.set_defaults(func=_run)

    gaps = s.add_parser("gaps", help="devices whose seq has holes (a loss somewhere, or a replay)")
    add_store_args(gaps, policy=False)
    gaps.add_argument("--all", action="store_true", help="also closed gaps")
    gaps.set_defaults(func=_gaps)

    imp = s.add_parser("import", help="replay touches from a JSON Lines or CBOR file")
    add_store_args(imp, policy=True)
    imp.add_argument("file")
    imp.add_argument("--format", choices=["jsonl", "cbor"], help="default: by extension or content")
    imp.add_argument("--batch", type=int, default=BATCH_MAX,
                     help=f"touches per transaction (default {BATCH_MAX})")
    imp.add_argument("--no-progress", action="store_true")
    imp.set_defaults(func=_import)

    ex = s.add_parser("export", help="write every stored touch, dead letter, device and course "
                      "to JSON Lines or CBOR (for `sink import` into another store)")
    add_store_args(ex)
    ex.add_argument("--out", required=True, metavar="FILE", help="FILE.jsonl or FILE.cbor")
    ex.add_argument("--format", choices=["jsonl", "cbor"], help="default: by extension")
    ex.add_argument("--no-progress", action="store_true")
    ex.set_defaults(func=_export)

    dl = s.add_parser("dead-letters", help="list malformed touches kept with their reason")
    add_store_args(dl)
    dl.add_argument("--limit", type=int, default=50)
    dl.set_defaults(func=_dead_letters)

    fl = s.add_parser("flagged", help="list stored touches kept out of derived tables (clock)")
    add_store_args(fl)
    fl.add_argument("--limit", type=int, default=50)
    fl.set_defaults(func=_flagged)

    wh = s.add_parser("work-history", help="print the derived work-history table")
    add_store_args(wh)
    wh.add_argument("--site")
    wh.add_argument("--month", help="YYYY-MM")
    wh.set_defaults(func=_work_history)

    rd = s.add_parser("rederive", help="recompute every derived table from the stored touches")
    add_store_args(rd, policy=True)
    rd.set_defaults(func=_rederive)

    ar = s.add_parser("archive", help="PostgreSQL: detach the touch partitions of every month "
                      "before --before (docs/sink.md, Partitions)")
    add_store_args(ar)
    ar.add_argument("--before", required=True, metavar="YYYY-MM",
                    help="months before this one are detached (this one stays)")
    ar.set_defaults(func=_archive)

    co = s.add_parser("courses", help="training course definitions")
    cs = co.add_subparsers(dest="courses_cmd", required=True, metavar="ACTION")
    ci = cs.add_parser("import", help="add or replace courses from CSV: "
                       "course,name,starts,ends,enrolled[,center]")
    add_store_args(ci)
    ci.add_argument("file")
    ci.set_defaults(func=_courses_import)
    cl = cs.add_parser("list", help="list course definitions")
    add_store_args(cl)
    cl.set_defaults(func=_courses_list)

    si = s.add_parser("sites", help="the site registry: each site's name, kind, 元請, work-day cut")
    ss = si.add_subparsers(dest="sites_cmd", required=True, metavar="ACTION")
    sim = ss.add_parser("import", help="add or correct sites from CSV: site,name,kind,prefecture,"
                        "main_contractor,day_cut_hour,valid_from; re-derives the sites whose cut"
                        " changed")
    add_store_args(sim)
    sim.add_argument("file")
    sim.set_defaults(func=_sites_import)
    sls = ss.add_parser("list", help="registered sites (their rules now) and unregistered ones seen")
    add_store_args(sls)
    sls.set_defaults(func=_sites_list)
    ssh = ss.add_parser("show", help="one site: every registry row, its contractor chain, touches")
    add_store_args(ssh)
    ssh.add_argument("site")
    ssh.set_defaults(func=_sites_show)
    sch = ss.add_parser("chain", help="import sites' contractor chains from CSV: "
                        "site,contractor,parent[,name] (parent empty: the main contractor)")
    add_store_args(sch)
    sch.add_argument("file")
    sch.set_defaults(func=_chain_import)

    em = s.add_parser("employers", help="technicians' employers (所属事業者) and names")
    es = em.add_subparsers(dest="employers_cmd", required=True, metavar="ACTION")
    ei = es.add_parser("import", help="add or replace from CSV: tid,employer[,name]")
    add_store_args(ei)
    ei.add_argument("file")
    ei.set_defaults(func=_employers_import)
    el = es.add_parser("list", help="list technicians with their employer")
    add_store_args(el)
    el.set_defaults(func=_employers_list)

    dv = s.add_parser("devices", help="the device registry (used with --registered-only)")
    ds = dv.add_subparsers(dest="devices_cmd", required=True, metavar="ACTION")
    di = ds.add_parser("import", help="add or replace devices from CSV: device,site[,role]")
    add_store_args(di)
    di.add_argument("file")
    di.set_defaults(func=_devices_import)
    dls = ds.add_parser("list", help="list registered devices")
    add_store_args(dls)
    dls.set_defaults(func=_devices_list)


def _run(args: argparse.Namespace) -> int:
    from cloud_sink.ingest import Sink, TlsFiles
    from cloud_sink.metrics import DEFAULT_LISTEN, MetricsError, SinkMetrics, parse_listen

    host, _, port = args.broker.rpartition(":")
    listen = parse_listen(args.metrics or DEFAULT_LISTEN)
    if args.check:
        return _check(args, host or "127.0.0.1", int(port), listen)
    store = store_of(args, create=True)
    tls = None
    if args.ca or args.cert or args.key:
        if not (args.ca and args.cert and args.key):
            print("ccus sink run: --ca, --cert and --key go together", file=sys.stderr)
            return 2
        tls = TlsFiles(args.ca, args.cert, args.key)
        from cloud_sink.check import check_cert_file, check_key_pair

        # a key readable by others fails --check, not the start (the key is what it is)
        bad = [c for c in (check_cert_file("--ca", args.ca), check_cert_file("--cert", args.cert),
                           check_key_pair(args.cert, args.key, loose_mode_fails=False))
               if not c.ok]
        if bad:  # before connecting: the consumer would die on it with a traceback
            for c in bad:
                print(f"ccus sink run: {c.name}: {c.detail}", file=sys.stderr)
            store.close()
            return 2
    sink: Any
    servers: list[str] = []
    if args.nats:
        try:
            from cloud_sink.ingest.jetstream import JetStreamSink, JetStreamSinkError, parse_servers
        except ImportError:
            print("ccus sink run --nats: nats-py is missing: pip install -e '.[cluster]'",
                  file=sys.stderr)
            store.close()
            return 2
        try:
            servers = parse_servers(args.nats)
        except JetStreamSinkError as exc:
            print(f"ccus sink run: {exc}", file=sys.stderr)
            store.close()
            return 2
    metrics = None
    if listen is not None:
        metrics = SinkMetrics()
        try:
            where = metrics.serve(*listen)
            logging.getLogger("ccus.sink").info("metrics at http://%s:%d/metrics", *where)
        except MetricsError as exc:
            if args.metrics:  # asked for: a fault
                store.close()
                raise
            # the default port, taken (a second sink on this host): run, say so once
            logging.getLogger("ccus.sink").warning("%s; running without metrics", exc)
            metrics = None
    if args.nats:
        sink = JetStreamSink(store, servers, group=args.group, client_id=args.client_id,
                             batch_max=args.batch, tls=tls, metrics=metrics)
    else:
        sink = Sink(store, host or "127.0.0.1", int(port), group=args.group,  # type: ignore[arg-type]
                    client_id=args.client_id, batch_max=args.batch, tls=tls, metrics=metrics)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    sink.start()
    if args.ready_file:
        while not sink.subscribed.wait(0.1):
            if done.is_set():
                break
        Path(args.ready_file).touch()
    done.wait()
    sink.stop()
    store.close()
    if metrics is not None:
        metrics.close()
    t = sink.totals
    logging.getLogger("ccus.sink").info("stopped: %d stored, %d repeated, %d dead letters",
                                        t.stored, t.repeated, t.dead)
    return 0


def _check(args: argparse.Namespace, host: str, port: int, listen: tuple[str, int] | None) -> int:
    from cloud_sink.check import format_checks, run_checks

    if (args.ca or args.cert or args.key) and not (args.ca and args.cert and args.key):
        print("ccus sink run: --ca, --cert and --key go together", file=sys.stderr)
        return 2
    tls = (args.ca, args.cert, args.key) if args.ca else None
    checks = run_checks(args.store, host, port, tls, listen)
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


def _import(args: argparse.Namespace) -> int:
    from cloud_sink.importer import import_file

    store = store_of(args, create=True)
    carried: dict[str, int] = {}
    try:
        res = import_file(store, args.file, fmt=args.format, batch=args.batch,
                          progress=not args.no_progress, carried=carried)
    except OSError as exc:
        print(f"ccus sink import: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"{res.stored} stored, {res.repeated} already stored, {res.flagged} flagged (clock), "
          f"{res.dead} dead letters")
    if res.flagged:
        print(flag_advice(res))
    if carried:  # a file from `ccus sink export`
        print(f"carried over: {carried.get('dead_letters', 0)} dead letters, "
              f"{carried.get('devices', 0)} devices, {carried.get('courses', 0)} courses, "
              f"{carried.get('sites', 0)} site rules, {carried.get('chain', 0)} contractor "
              f"links, {carried.get('employers', 0)} technicians")
    return 0


def _export(args: argparse.Namespace) -> int:
    from cloud_sink.export import export_store

    store = store_of(args)
    try:
        n = export_store(store, args.out, fmt=args.format, progress=not args.no_progress)
    finally:
        store.close()
    print(f"{n['touch']} touches, {n['_dead']} dead letters, {n['_device']} devices, "
          f"{n['_course']} courses, {n['_site']} site rules, {n['_chain']} contractor links, "
          f"{n['_employer']} technicians written to {args.out}")
    return 0


def flag_advice(res: Any) -> str:
    """One line: how many touches were flagged, how far out, and the option that admits them."""
    parts, opts = [], []
    if res.past:
        days = int(res.past_ms_max // DAY_MS) + 1
        parts.append(f"{res.past} stamped up to {res.past_ms_max / DAY_MS:.0f} days before receipt")
        opts.append(f"--max-past-days {days}")
    if res.future:
        hours = int(res.future_ms_max // 3600_000) + 1
        parts.append(f"{res.future} up to {res.future_ms_max / 3600_000:.0f} h ahead of it")
        opts.append(f"--max-future-h {hours}")
    return (f"flagged, kept out of the reports: {'; '.join(parts)}; "
            f"`ccus sink rederive --store URL {' '.join(opts)}` admits them")


def _dead_letters(args: argparse.Namespace) -> int:
    store = store_of(args)
    rows = store.dead_letters(args.limit)
    store.close()
    if not rows:
        print("no dead letters")
    for id_, _received, topic, reason, detail, payload in rows:
        print(f"#{id_} {topic} {reason}: {detail} ({len(payload)} bytes: {payload[:24].hex()})")
    return 0


def _flagged(args: argparse.Namespace) -> int:
    store = store_of(args)
    rows = store.flagged(args.limit)
    store.close()
    if not rows:
        print("no flagged touches")
    for dev, seq, site, role, ts, received, flag in rows:
        print(f"{dev} #{seq} {site} {role} {flag}: stamped {ts}, received {received} "
              f"({(ts - received) / 3600_000:+.1f} h)")
    return 0


def format_work_history(store: Store, site: str | None = None, month: str | None = None) -> str:
    lines = [f"{'work day':<10}  {'site':<14}  {'technician':<14}  {'in':>5}  {'out':>7}  taps"
             "  cut"]
    for r in store.work_history(site, month):
        tin = local_time(r.first_in_ms) if r.first_in_ms is not None else "missing"
        tout = local_time(r.last_out_ms) if r.last_out_ms is not None else "missing"
        cut = "  -" if r.cut_hour is None else f"{r.cut_hour:>3}"
        lines.append(f"{r.work_day:<10}  {r.site:<14}  {r.tid:<14}  {tin:>5}  {tout:>7}  {r.taps:>4}"
                     f"  {cut}")
    return "\n".join(lines)


def _work_history(args: argparse.Namespace) -> int:
    store = store_of(args)
    print(format_work_history(store, args.site, args.month))
    store.close()
    return 0


def _rederive(args: argparse.Namespace) -> int:
    store = store_of(args)
    res = store.rederive_all()
    store.close()
    print(f"derived tables recomputed: {res.work_history_rows} work-history rows; "
          f"{res.touches} touches, {res.recut} cut again ({res.moved} to another work day), "
          f"{res.admitted} admitted, "
          f"{res.newly_flagged} newly flagged, {res.still_flagged} still flagged")
    return 0


def _archive(args: argparse.Namespace) -> int:
    import re

    from cloud_sink.model import StoreError

    if not re.fullmatch(r"[0-9]{4}-(0[1-9]|1[0-2])", args.before):
        print(f"ccus sink archive: --before must be a month YYYY-MM, not {args.before!r}",
              file=sys.stderr)
        return 2
    store = store_of(args)
    try:
        if not hasattr(store, "archive"):
            raise StoreError("ccus sink archive: only a PostgreSQL store has month partitions "
                             "(a SQLite store keeps every month in one file)")
        tables = store.archive(args.before)
    finally:
        store.close()
    for t in tables:
        print(f"detached {t}")
    print(f"{len(tables)} month(s) before {args.before} archived: dump each table (pg_dump -t) "
          "and DROP it when kept elsewhere")
    return 0


def _csv_in(path: str) -> str:
    return Path(path).read_text(encoding="utf-8-sig")  # Excel writes a BOM


def _import_csv(args: argparse.Namespace, command: str, parse: Any,
                load: Callable[[Any, Any], int | str], done: str) -> int:
    """Read an operator's CSV, load it into the store, say how many rows were taken."""
    from cloud_sink.courses import CsvError

    try:
        items = parse(_csv_in(args.file))
    except (OSError, UnicodeDecodeError, CsvError) as exc:
        print(f"ccus sink {command}: {args.file}: {exc}", file=sys.stderr)
        return 2
    store = store_of(args, create=True)
    try:
        out = load(store, items)
    finally:
        store.close()
    print(out if isinstance(out, str) else f"{out} {done}")
    return 0


def _sites_import(args: argparse.Namespace) -> int:
    from cloud_sink.registry import parse_sites

    def load(store: Store, items: Any) -> str:
        res = store.import_sites(items)
        line = f"{res.imported} registry rows imported"
        if res.sites:
            line += (f"; re-derived {len(res.sites)} site(s) whose cut changed "
                     f"({', '.join(res.sites)}): {res.touches} touches, {res.recut} cut again, "
                     f"{res.moved} moved to another work day")
        return line

    return _import_csv(args, "sites import", parse_sites, load, "")


def _chain_import(args: argparse.Namespace) -> int:
    from cloud_sink.registry import parse_chain

    return _import_csv(args, "sites chain", parse_chain,
                       lambda store, items: store.import_chain(items), "contractor links imported")


def _employers_import(args: argparse.Namespace) -> int:
    from cloud_sink.registry import parse_technicians

    return _import_csv(args, "employers import", parse_technicians,
                       lambda store, items: store.import_technicians(items),
                       "technicians imported")


def _employers_list(args: argparse.Namespace) -> int:
    store = store_of(args)
    for t in store.technicians():
        print(f"{t.tid}  {t.employer}  {t.name}")
    store.close()
    return 0


def _sites_list(args: argparse.Namespace) -> int:
    store = store_of(args)
    rules, unregistered = store.sites(), store.unregistered_sites()
    store.close()
    latest = {r.site: r for r in rules}   # ordered by valid_from: the last one wins
    print(f"{'site':<14}  {'kind':<8}  {'cut':>5}  {'from':<10}  {'main contractor':<15}  name")
    for r in latest.values():
        cut = 0 if r.kind == "training" else r.day_cut_hour   # a center counts calendar days
        print(f"{r.site:<14}  {r.kind:<8}  {cut:>2}:00  {r.valid_from:<10}  "
              f"{r.main_contractor:<15}  {r.name} ({r.prefecture})")
    for site, seen in unregistered:
        print(f"{site:<14}  {'?':<8}  {'-':>5}  {'':<10}  {'':<15}  unregistered: default cut, "
              f"first seen {local_date(seen)}")
    return 0


def _sites_show(args: argparse.Namespace) -> int:
    store = store_of(args)
    rules, chain = store.sites(args.site), store.chain(args.site)
    touches, flagged = store.site_touch_counts(args.site)
    unregistered = args.site in {s for s, _ in store.unregistered_sites()}
    store.close()
    if not rules:
        print(f"site {args.site}: not in the registry"
              + (" (touches seen: cut at the default hour)" if unregistered else ""))
    for r in rules:
        cut = ("calendar days and months (a training center)" if r.kind == "training"
               else f"work day cut {r.day_cut_hour:02d}:00 Asia/Tokyo")
        print(f"site {r.site} from {r.valid_from}: {r.name}, {r.kind}, {r.prefecture}, "
              f"main contractor {r.main_contractor}, {cut}")
    for link in chain:
        print(f"  contractor {link.contractor} {link.name} under "
              f"{link.parent or '(main contractor)'}")
    print(f"  {touches} touches stored, {flagged} flagged")
    return 0


def _courses_import(args: argparse.Namespace) -> int:
    from cloud_sink.courses import parse_courses

    return _import_csv(args, "courses import", parse_courses,
                       lambda store, items: store.import_courses(items), "courses imported")


def _courses_list(args: argparse.Namespace) -> int:
    store = store_of(args)
    for c in store.courses():
        print(f"{c.course}  {c.name}  {c.starts}..{c.ends}  enrolled {c.enrolled}  {c.center}")
    store.close()
    return 0


def _devices_import(args: argparse.Namespace) -> int:
    from cloud_sink.courses import parse_devices

    return _import_csv(args, "devices import", parse_devices,
                       lambda store, items: store.register_devices(items), "devices registered")


def _devices_list(args: argparse.Namespace) -> int:
    store = store_of(args)
    for d in store.devices():
        print(f"{d.device}  {d.site}  {d.role}")
    store.close()
    return 0


def _gaps(args: argparse.Namespace) -> int:
    from cloud_sink.acks import format_gaps, gap_report

    store = store_of(args)
    try:
        store.refresh_gaps()  # type: ignore[attr-defined]  # derived from what is stored
        print(format_gaps(gap_report(store, include_closed=args.all)))  # type: ignore[arg-type]
    finally:
        store.close()
    return 0
