"""`ccus site-watchdog`: restart a site broker whose bridge to the cloud stays stuck
(broker/bridge_watch.py decides, broker/bridge_watchdog.py watches; docs/operations.md,
"The site bridge watchdog"; --keep-retained: broker/retain_keep.py). Runs until SIGTERM;
deploy/systemd/ccus-site-watchdog.service."""

import argparse
import shlex
import signal
import subprocess
import sys
import threading
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("site-watchdog", help="restart a site broker whose bridge to the cloud "
                       "stays stuck")
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT",
                   help="the site broker (default 127.0.0.1:1883)")
    p.add_argument("--site", required=True, help="the site ID (14 digits): its touch and ack "
                   "topics are watched")
    p.add_argument("--bridge", help="the bridge's remote_clientid (default bridge-SITE): its "
                   "state is $SYS/broker/connection/BRIDGE/state (notifications true)")
    p.add_argument("--cloud", required=True, metavar="'H:P H:P ...'",
                   help="the cloud nodes the bridge connects to: a restart only while one of "
                   "them accepts a TCP connection")
    p.add_argument("--limit", type=float, default=15.0, metavar="S",
                   help="stuck: down, or touches sent with no acknowledgement, longer than "
                   "this (default 15 s)")
    p.add_argument("--backoff", type=float, default=30.0, metavar="S",
                   help="least time between restarts, doubled (up to 300 s) while restarts "
                   "bring no acknowledgement back (default 30 s)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--restart", metavar="CMD", help="the restart command, e.g. "
                     "'systemctl restart mosquitto'")
    how.add_argument("--site-dir", metavar="DIR", help="restart the local cluster's site broker "
                     "of this folder (what `ccus cluster up --site` starts)")
    p.add_argument("--ca", help="TLS to the site broker: CA file")
    p.add_argument("--cert", help="TLS: this client's certificate")
    p.add_argument("--key", help="TLS: this client's key")
    p.add_argument("--client-id", help="MQTT client id (default ccus-watchdog-SITE)")
    p.add_argument("--keep-retained", action="store_true",
                   help="also keep, retained on the site broker, the config and ID lists the "
                   "bridge brings unretained (a cloud on NATS: it sends live messages "
                   "unretained), on the same connection")
    p.set_defaults(func=_run)


def _refused(args: argparse.Namespace) -> str:
    from broker.bridge_watchdog import parse_hostports

    if not (len(args.site) == 14 and args.site.isascii() and args.site.isdigit()):
        return "--site: a CCUS site ID is 14 ASCII digits"
    for opt in ("broker", "cloud"):
        try:
            parse_hostports(getattr(args, opt))
        except ValueError as exc:
            return f"--{opt}: {exc}"
    if bool(args.ca) != bool(args.cert) or bool(args.cert) != bool(args.key):
        return "--ca, --cert and --key go together"
    if args.limit <= 0 or not 0 < args.backoff <= 300:
        return "--limit must be > 0 and --backoff in (0, 300]"
    return ""


def _restart_action(args: argparse.Namespace, cloud: list[tuple[str, int]]) -> Any:
    if args.site_dir:
        from broker.site_bridge import SiteBridge

        def restart_local() -> None:
            b = SiteBridge(args.site_dir, args.site, [p for _, p in cloud])
            b.stop()
            b.start(detach=True)
        return restart_local
    argv = shlex.split(args.restart)

    def restart_cmd() -> None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if r.returncode:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"{args.restart!r} exited {r.returncode}: {tail[0]}")
    return restart_cmd


def _run(args: argparse.Namespace) -> int:
    from broker.bridge_watch import WatchConfig
    from broker.bridge_watchdog import BridgeWatchdog, parse_hostports

    if why := _refused(args):
        print(f"ccus site-watchdog: {why}", file=sys.stderr)
        return 2
    (host, port), = parse_hostports(args.broker)[:1]
    cloud = parse_hostports(args.cloud)
    tls = (args.ca, args.cert, args.key) if args.ca else None
    dog = BridgeWatchdog(host, port, args.site, cloud, _restart_action(args, cloud),
                         bridge=args.bridge, client_id=args.client_id, tls=tls,
                         keep_retained=args.keep_retained,
                         config=WatchConfig(limit_s=args.limit, backoff_s=args.backoff,
                                            backoff_max_s=max(300.0, args.backoff)))
    done = threading.Event()   # SIGTERM (systemd stop) or Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    dog.start()
    done.wait()
    dog.stop()
    return 0
