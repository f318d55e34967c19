"""The `ccus` command: one entry point, a subcommand per job (demo, agent, sink, card, broker)."""

import argparse
import logging
import os
import signal
import sys
import threading

from edge import __version__

DESCRIPTION = """\
ccus-touch: card-touch infrastructure for the Construction Career Up System (CCUS).

Site gates, CCUS support vending machines and training-center stations read CCUS IC cards,
decide locally against a signed ID list, and publish every touch over MQTT to a sink that
keeps the work history.
"""

EPILOG = """\
examples:
  ccus demo                           play a site day end to end and print the work history
  ccus agent --config /etc/ccus-touch/agent.toml
  ccus sink run --db store.sqlite --broker 127.0.0.1:1883
  ccus sink work-history --db store.sqlite
  ccus sink sites import --store store.sqlite sites.csv   each site's name, 元請 and work-day cut
  ccus report work-history --store store.sqlite --site 13100000000001 --month 2026-11 --png wh.png
  ccus report days-worked --store store.sqlite --month 2026-11 --by main --ja --bom --out k.csv
  ccus ops --help                     provisioning, signed config, ID lists, the fleet
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccus", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ccus-touch {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the end-to-end site-day demo on embedded defaults")
    demo.add_argument("--data", default="demo-data", help="demo data folder (recreated each run)")
    demo.set_defaults(func=_demo)

    agent = sub.add_parser("agent", help="run a device agent (gate, vending or training)")
    agent.add_argument("--config", required=True, help="agent config (TOML)")
    agent.set_defaults(func=_agent)

    from cloud_sink.cli import register as register_sink
    from cloud_sink.report_cli import register as register_report
    from ops.cli import register as register_ops
    from sim.cli import register as register_card

    register_sink(sub)
    register_report(sub)
    register_ops(sub)
    register_card(sub)

    broker = sub.add_parser("broker", help="run a private development broker in the foreground")
    broker.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    broker.add_argument("--data", help="folder for config, log and persistence")
    broker.set_defaults(func=_broker)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.cmd in ("agent", "sink", "broker"):
        level = min(level, logging.INFO)  # services log what they do; demo output stays clean
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd in ("demo", "agent", "card"):
        import nfc  # noqa: F401 - nfcpy sets its logger to INFO on import; the user decides here

        logging.getLogger("nfc").setLevel(max(level, logging.WARNING))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


def _stop_on_signal() -> threading.Event:
    """An event that SIGTERM (systemd stop) or SIGINT (Ctrl-C) sets."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    return done


def _demo(args: argparse.Namespace) -> int:
    from demo.site_day import run_demo

    return run_demo(args.data)


def _agent(args: argparse.Namespace) -> int:
    from edge.agent import Agent
    from edge.config import ConfigError, load

    try:
        cfg = load(args.config)
        agent = Agent(cfg)  # checks the TLS files: a missing key is a ConfigError naming it
    except ConfigError as exc:
        print(f"ccus agent: {exc}", file=sys.stderr)
        return 2
    agent.start()
    # A signed config that changes more than its version needs a restart: exit 3 so that
    # systemd (Restart=always) starts the agent again with the applied config. A dead link
    # (agent.fatal) exits 1: running on without one would only pile up taps.
    stop = _stop_on_signal()
    while not stop.is_set() and agent.fatal is None and not agent.restart_requested.wait(0.5):
        pass
    agent.stop()
    if agent.fatal is not None:
        print(f"ccus agent: {agent.fatal}", file=sys.stderr)
        return 1
    return 3 if agent.restart_requested.is_set() and not stop.is_set() else 0


def _broker(args: argparse.Namespace) -> int:
    from broker.launcher import PrivateBroker

    with PrivateBroker(args.data, port=args.port or None) as b:
        print(f"mosquitto listening on {b.host}:{b.port} (config {b.conf_path}, pid {os.getpid()})",
              flush=True)
        _stop_on_signal().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
