"""`ccus cluster up|down --dir DIR`: the local 3-node NATS cluster of broker/nats.py (opt-in), and
with `--site SITE` a site Mosquitto bridged to it (broker/site_bridge.py)."""

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
    up.set_defaults(func=_up)
    down = s.add_parser("down", help="stop the nodes started with `ccus cluster up --dir DIR`")
    down.add_argument("--dir", required=True)
    down.set_defaults(func=_down)


def _up(args: argparse.Namespace) -> int:
    from broker.launcher import BrokerError
    from broker.nats import up

    try:
        c = up(args.dir)
    except BrokerError as exc:
        print(f"ccus cluster up: {exc}", file=sys.stderr)
        return 1
    for n in c.nodes:
        print(f"{n.name}: nats {n.url}  mqtt 127.0.0.1:{n.mqtt_port}  pid {n.pid}")
    print(f"sink: ccus sink run --store STORE --nats {','.join(c.urls)}")
    if args.site:
        return _up_site(args, c.mqtt_ports)
    return 0


def _up_site(args: argparse.Namespace, mqtt_ports: list[int]) -> int:
    from broker.launcher import BrokerError
    from broker.site_bridge import up

    if not (len(args.site) == 14 and args.site.isascii() and args.site.isdigit()):
        print("ccus cluster up: --site: a CCUS site ID is 14 ASCII digits", file=sys.stderr)
        return 2
    try:
        b = up(args.dir, args.site, mqtt_ports)
    except BrokerError as exc:
        print(f"ccus cluster up: {exc}", file=sys.stderr)
        return 1
    print(f"site {b.site}: mqtt 127.0.0.1:{b.port} (devices: [mqtt] host = \"127.0.0.1\", "
          f"port = {b.port}, tls = false)  bridged to {len(mqtt_ports)} nodes  pid {b.pid}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from broker.launcher import BrokerError
    from broker.nats import down
    from broker.site_bridge import down as down_sites

    try:
        n = down(args.dir)
    except BrokerError as exc:
        print(f"ccus cluster down: {exc}", file=sys.stderr)
        return 1
    print(f"stopped {n} node(s)")
    for site in down_sites(args.dir):
        print(f"stopped the site broker of {site}")
    return 0
