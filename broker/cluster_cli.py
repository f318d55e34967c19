"""`ccus cluster up|down --dir DIR`: the local 3-node NATS cluster of broker/nats.py (opt-in), and
with `--site SITE` a site Mosquitto bridged to it and its bridge watchdog (broker/site_bridge.py)."""

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("cluster", help="a local 3-node NATS cluster (JetStream R3, MQTT) on loopback")
    s = p.add_subparsers(dest="cluster_cmd", required=True, metavar="COMMAND")
    up = s.add_parser("up", help="start the nodes (detached); their state lives in DIR")
    up.add_argument("--dir", required=True, help="folder for configs, logs, JetStream data")
    up.add_argument("--site", metavar="SITE", help="also a site Mosquitto for site SITE (14 "
                    "digits), bridged to every node's MQTT port (broker/site_bridge.py)")
    up.add_argument("--secure", metavar="BUNDLE", help="TLS with client certificates and "
                    "per-identity permissions from the folder `ccus ops nats-auth` wrote")
    up.add_argument("--pg", action="store_true",
                    help="also the store tier: a pg_auto_failover monitor, primary and standby")
    up.set_defaults(func=_up)
    for name, what in (("reload", "SIGHUP every node: auth.conf and the native listener's "
                                  "pinned certificates again (after `ccus ops nats-auth`)"),
                       ("restart", "restart the nodes one by one: the MQTT listeners pin the "
                                   "current certificates (a new or revoked one)")):
        sp = s.add_parser(name, help=what)
        sp.add_argument("--dir", required=True)
        sp.set_defaults(func=_again, cluster_cmd=name)
    down = s.add_parser("down", help="stop the nodes started with `ccus cluster up --dir DIR`")
    down.add_argument("--dir", required=True)
    down.set_defaults(func=_down)


def _site_refused(args: argparse.Namespace) -> str:
    """Why --site cannot be used as given ("" when it can), checked before anything starts."""
    if not args.site:
        return ""
    if not (len(args.site) == 14 and args.site.isascii() and args.site.isdigit()):
        return "--site: a CCUS site ID is 14 ASCII digits"
    if args.secure:  # site-cluster.conf bridges in plain MQTT: no TLS to the nodes yet
        return ("--site does not work with --secure yet (the site bridge has no TLS to the "
                "nodes): start the cluster without --secure for a site broker")
    return ""


def _up(args: argparse.Namespace) -> int:
    from broker.launcher import BrokerError
    from broker.nats import up

    if why := _site_refused(args):
        print(f"ccus cluster up: {why}", file=sys.stderr)
        return 2
    try:
        c = up(args.dir, secure=args.secure)
    except BrokerError as exc:
        print(f"ccus cluster up: {exc}", file=sys.stderr)
        return 1
    tls = " (TLS, client certificates)" if args.secure else ""
    for n in c.nodes:
        print(f"{n.name}: nats {n.url}  mqtt 127.0.0.1:{n.mqtt_port}  pid {n.pid}{tls}")
    certs = " --ca CA --cert SINK.crt --key SINK.key" if args.secure else ""
    store = "STORE"
    if args.pg:
        from broker.pgha import up as pg_up

        try:
            store = pg_up(args.dir).url
        except BrokerError as exc:
            print(f"ccus cluster up --pg: {exc}", file=sys.stderr)
            return 1
        print(f"store: {store}")
        store = f"'{store}'"
    print(f"sink: ccus sink run --store {store} --nats {','.join(c.urls)}{certs}")
    if args.site:
        return _up_site(args, c.mqtt_ports)
    return 0


def _up_site(args: argparse.Namespace, mqtt_ports: list[int]) -> int:
    from broker.launcher import BrokerError
    from broker.site_bridge import up

    try:
        b = up(args.dir, args.site, mqtt_ports)
    except BrokerError as exc:
        print(f"ccus cluster up: {exc}", file=sys.stderr)
        return 1
    print(f"site {b.site}: mqtt 127.0.0.1:{b.port} (devices: [mqtt] host = \"127.0.0.1\", "
          f"port = {b.port}, tls = false)  bridged to {len(mqtt_ports)} nodes  pid {b.pid}; "
          f"bridge watchdog: log {b.folder / 'watchdog.log'}")
    return 0


def _again(args: argparse.Namespace) -> int:
    from broker import nats
    from broker.launcher import BrokerError

    try:
        n = (nats.reload if args.cluster_cmd == "reload" else nats.restart)(args.dir)
    except BrokerError as exc:
        print(f"ccus cluster {args.cluster_cmd}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.cluster_cmd}ed {n} node(s)")
    return 0


def _down(args: argparse.Namespace) -> int:
    from broker.launcher import BrokerError
    from broker.nats import down
    from broker.pgha import down as pg_down
    from broker.site_bridge import down as down_sites

    try:
        pg = pg_down(args.dir)  # the store tier, when `up --pg` started one here
        if pg is not None:
            print(f"stopped {pg} PostgreSQL node(s)")
        n = down(args.dir)
    except BrokerError as exc:
        print(f"ccus cluster down: {exc}", file=sys.stderr)
        return 1
    print(f"stopped {n} node(s)")
    for site in down_sites(args.dir):
        print(f"stopped the site broker of {site}")
    return 0
