"""`ccus cluster up|down --dir DIR`: the local 3-node NATS cluster of broker/nats.py (opt-in); with
`--pg` the PostgreSQL pair (broker/pgha.py); with `--site SITE` a site Mosquitto bridged to it and
its bridge watchdog (broker/site_bridge.py); with `--sinks N` and `--agents N` the sinks and
simulated gate agents (broker/cluster_procs.py, ccus/cluster_agents.py). `down` stops them in
the reverse order; an `up` whose later step fails stops what it started (and says so). In `ccus`,
which may import every room: the agents are the simulator's."""

import argparse
import shlex
import sys
from typing import Any


def _folder(text: str) -> str:
    """A folder or file option as an absolute path: the saved pids are checked against command
    lines that name the folder (`down --dir c` must mean the folder `up --dir /abs/c` started),
    and the sinks and agents run in another working folder."""
    from pathlib import Path

    return str(Path(text).resolve())


def _store(text: str) -> str:
    """--store: a URL as given, a file path made absolute (see _folder)."""
    return text if "://" in text else _folder(text)


LIST_NAME = "national"           # the signed list the agents follow with --keys


def register(sub: Any) -> None:
    p = sub.add_parser("cluster", help="a local 3-node NATS cluster (JetStream R3, MQTT) on loopback")
    s = p.add_subparsers(dest="cluster_cmd", required=True, metavar="COMMAND")
    up = s.add_parser("up", help="start the nodes (detached); their state lives in DIR")
    up.add_argument("--dir", required=True, type=_folder, help="folder for configs, logs, JetStream data")
    up.add_argument("--site", metavar="SITE", help="also a site Mosquitto for site SITE (14 "
                    "digits), bridged to every node's MQTT port (broker/site_bridge.py)")
    up.add_argument("--secure", metavar="BUNDLE", type=_folder, help="TLS with client certificates and "
                    "per-identity permissions from the folder `ccus ops nats-auth` wrote")
    up.add_argument("--pki", metavar="PKI", type=_folder, help="with --secure: the PKI folder the site "
                    "bridge's, sinks' and agents' certificates come from (ops/provision.py layout)")
    up.add_argument("--pg", action="store_true",
                    help="also the store tier: a pg_auto_failover monitor, primary and standby")
    up.add_argument("--sinks", type=int, default=0, metavar="N",
                    help="also N sinks (`ccus sink run --nats`) sharing the durable consumer")
    up.add_argument("--store", metavar="URL", type=_store, help="the sinks' store (default: the --pg pair's "
                    "multi-host URL, else DIR/store.sqlite)")
    up.add_argument("--agents", type=int, default=0, metavar="N",
                    help="also N gate agents on emulated card readers (every second one behind "
                    "the --site broker, the others straight on the nodes)")
    up.add_argument("--keys", metavar="DIR", type=_folder,
                    help="with --agents: the operator public keys (*.pub) the agents trust for "
                    "config pushes and signed ID lists; they then follow the signed list "
                    f"{LIST_NAME!r} (their CSV list until it arrives)")
    up.set_defaults(func=_up)
    for name, what in (("reload", "SIGHUP every node: auth.conf and the native listener's "
                                  "pinned certificates again (after `ccus ops nats-auth`)"),
                       ("restart", "restart the nodes one by one: the MQTT listeners pin the "
                                   "current certificates (a new or revoked one)")):
        sp = s.add_parser(name, help=what)
        sp.add_argument("--dir", required=True, type=_folder)
        sp.set_defaults(func=_again, cluster_cmd=name)
    down = s.add_parser("down", help="stop the nodes started with `ccus cluster up --dir DIR`")
    down.add_argument("--dir", required=True, type=_folder)
    down.set_defaults(func=_down)


AGENTS_SITE = "13100000000001"  # the agents' site when there is no --site


def _refused(args: argparse.Namespace) -> str:
    """Why the options cannot be used as given ("" when they can), checked before anything
    starts."""
    if args.site and not (len(args.site) == 14 and args.site.isascii() and args.site.isdigit()):
        return "--site: a CCUS site ID is 14 ASCII digits"
    if args.sinks < 0 or args.agents < 0:
        return "--sinks and --agents: a count, 0 or more"
    if args.secure and (args.site or args.sinks or args.agents) and not args.pki:
        return ("--site, --sinks and --agents on a --secure cluster need --pki PKI: the folder "
                "their certificates come from")
    if args.pki and not args.secure:
        return "--pki goes with --secure BUNDLE"
    if args.store and args.pg:
        return "--store or --pg, not both: with --pg the sinks use the pair's URL"
    if args.store and not args.sinks:
        return "--store is the sinks' store: give --sinks N too"
    if args.keys and not args.agents:
        return "--keys is what the agents trust: give --agents N too"
    if args.keys:
        from pathlib import Path

        if not any(Path(args.keys).glob("*.pub")):
            return (f"--keys {args.keys}: no *.pub in it; copy the operator's public key there "
                    "(`ccus ops keygen --out alice-signing.key` writes alice-signing.key.pub)")
    return ""


def _up(args: argparse.Namespace) -> int:
    from broker.launcher import BrokerError
    from broker.nats import up

    if why := _refused(args):
        print(f"ccus cluster up: {why}", file=sys.stderr)
        return 2
    certs: dict[str, Any] = {}   # name -> cluster_pki.Tls, on a secure cluster
    if args.pki:
        from pathlib import Path

        from broker.cluster_pki import secure_files
        from ccus.cluster_agents import agent_name, behind_site

        direct = [agent_name(i) for i in range(1, args.agents + 1)
                  if not behind_site(i, bool(args.site))]
        certs, problems = secure_files(Path(args.pki), Path(args.secure), site=args.site,
                                     sinks=args.sinks, devices=direct,
                                     agents_site=args.site or AGENTS_SITE)
        for p in problems:
            print(f"ccus cluster up: {p}", file=sys.stderr)
        if problems:
            return 2
    try:
        c = up(args.dir, secure=args.secure)
    except BrokerError as exc:
        print(f"ccus cluster up: {exc}", file=sys.stderr)
        return 1
    tls = " (TLS, client certificates)" if args.secure else ""
    for n in c.nodes:
        print(f"{n.name}: nats {n.url}  mqtt 127.0.0.1:{n.mqtt_port}  pid {n.pid}{tls}")
    if c.callout:
        print("MQTT client ids: bound to the certificates (auth callout, one per node: "
              "DIR/nN/callout.log)")
    elif args.secure:
        print("MQTT client ids: NOT bound to the certificates: this nats-server has no auth "
              "callout (2.10+); CCUS_NATS_SERVER names one (dev.sh: .venv/opt/nats-server/bin/"
              "nats-server)")
    cert_opts = " --ca CA --cert SINK.crt --key SINK.key" if args.secure else ""
    url = None
    if args.pg:
        from broker.pgha import up as pg_up

        try:
            url = pg_up(args.dir).url
        except BrokerError as exc:
            print(f"ccus cluster up --pg: {exc}", file=sys.stderr)
            _roll_back(args)
            return 1
        print(f"store: {url}")
    if not args.sinks:
        store = shlex.quote(url) if url else "STORE"
        print(f"sink: ccus sink run --store {store} --nats {','.join(c.urls)}{cert_opts}")
    site_port = None
    try:
        if args.site:
            site_port = _up_site(args, c.mqtt_ports, certs.get("bridge"))
        if args.sinks:
            _up_sinks(args, url or args.store, c.urls, certs)
        if args.agents:
            _up_agents(args, c.mqtt_ports, site_port, certs)
    except BrokerError as exc:
        print(f"ccus cluster up: {exc}", file=sys.stderr)
        _roll_back(args)
        return 1
    return 0


def _roll_back(args: argparse.Namespace) -> None:
    """A step after the nodes failed: stop everything of DIR, as `down` does, so the folder is
    not left half up (the next `up` would refuse it as running already)."""
    import contextlib
    import io

    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        _down(args)
    stopped = [line.removeprefix("stopped ") for line in said.getvalue().splitlines()]
    print(f"ccus cluster up: stopped what it had started ({'; '.join(stopped)}); fix the "
          f"above and run it again", file=sys.stderr)


def _up_site(args: argparse.Namespace, mqtt_ports: list[int], tls: Any) -> int:
    from broker.site_bridge import up

    b = up(args.dir, args.site, mqtt_ports, tls=tls)
    over = " over TLS" if tls else ""
    print(f"site {b.site}: mqtt 127.0.0.1:{b.port} (devices: [mqtt] host = \"127.0.0.1\", "
          f"port = {b.port}, tls = false)  bridged to {len(mqtt_ports)} nodes{over}  pid {b.pid}; "
          f"bridge watchdog: log {b.folder / 'watchdog.log'}")
    return b.port


def _up_sinks(args: argparse.Namespace, store: str | None, urls: list[str],
              tls: dict[str, Any]) -> None:
    from pathlib import Path

    from broker.cluster_procs import start_sinks

    store = store or str(Path(args.dir) / "store.sqlite")
    for s in start_sinks(Path(args.dir), args.sinks, store, urls, tls=tls):
        print(s.line)
    print(f"store of the sinks: {store}")


def _up_agents(args: argparse.Namespace, mqtt_ports: list[int], site_port: int | None,
               tls: dict[str, Any]) -> None:
    from pathlib import Path

    from ccus.cluster_agents import start_agents

    site = args.site or AGENTS_SITE
    for a in start_agents(Path(args.dir), args.agents, site, mqtt_ports, site_port, tls=tls,
                          keys=Path(args.keys) if args.keys else None, list_name=LIST_NAME):
        print(a.line)
    print(f"agents at site {site}; their cards: --id 012E4CD3000000NN --tid 100000000000NN, "
          f"NN 01..40 (hex in --id)")


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
    from broker.cluster_procs import down as down_procs
    from broker.launcher import BrokerError
    from broker.nats import down
    from broker.pgha import down as pg_down
    from broker.site_bridge import down as down_sites

    for name in down_procs(args.dir):  # the agents, then the sinks: before what they talk to
        print(f"stopped {name}")
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
