"""`ccus sink ...`: run the sink, list dead letters, print the work history."""

import argparse
import logging
import signal
import threading
from pathlib import Path

from cloud_sink.store import SqliteStore
from cloud_sink.workday import local_time


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("sink", help="the cloud sink: ingest touches, derive work history")
    s = p.add_subparsers(dest="sink_cmd", required=True, metavar="COMMAND")

    run = s.add_parser("run", help="subscribe to all touches and store them")
    run.add_argument("--db", required=True, help="SQLite store file")
    run.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    run.add_argument("--group", default="sink", help="shared-subscription group (default: sink)")
    run.add_argument("--client-id", default="sink-1", help="MQTT client id, unique per process")
    run.add_argument("--cut-hour", type=int, default=4, help="work-day cut hour, Asia/Tokyo")
    run.add_argument("--ready-file", help="touch this file once subscribed (for scripts)")
    run.set_defaults(func=_run)

    dl = s.add_parser("dead-letters", help="list malformed touches kept with their reason")
    dl.add_argument("--db", required=True)
    dl.add_argument("--limit", type=int, default=50)
    dl.set_defaults(func=_dead_letters)

    wh = s.add_parser("work-history", help="print the derived work-history table")
    wh.add_argument("--db", required=True)
    wh.add_argument("--site")
    wh.set_defaults(func=_work_history)


def _run(args: argparse.Namespace) -> int:
    from cloud_sink.subscriber import Sink

    host, _, port = args.broker.rpartition(":")
    store = SqliteStore(args.db, cut_hour=args.cut_hour)
    sink = Sink(store, host or "127.0.0.1", int(port), group=args.group, client_id=args.client_id)
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
    t = sink.totals
    logging.getLogger("ccus.sink").info("stopped: %d stored, %d repeated, %d dead letters",
                                        t.stored, t.repeated, t.dead)
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    store = SqliteStore(args.db)
    rows = store.dead_letters(args.limit)
    if not rows:
        print("no dead letters")
    for id_, _received, topic, reason, detail, payload in rows:
        print(f"#{id_} {topic} {reason}: {detail} ({len(payload)} bytes: {payload[:24].hex()})")
    return 0


def format_work_history(store: SqliteStore, site: str | None = None) -> str:
    lines = [f"{'work day':<10}  {'site':<14}  {'technician':<14}  {'in':>5}  {'out':>7}  taps"]
    for r in store.work_history(site):
        tin = local_time(r.first_in_ms) if r.first_in_ms is not None else "missing"
        tout = local_time(r.last_out_ms) if r.last_out_ms is not None else "missing"
        lines.append(f"{r.work_day:<10}  {r.site:<14}  {r.tid:<14}  {tin:>5}  {tout:>7}  {r.taps:>4}")
    return "\n".join(lines)


def _work_history(args: argparse.Namespace) -> int:
    print(format_work_history(SqliteStore(args.db), args.site))
    return 0
