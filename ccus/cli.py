"""The `ccus` command: one entry point, a subcommand per job (demo, agent, sink, report, ops, card,
broker).

Rules of this file:
- Subcommands are registered lazily. `COMMANDS` is the table of every command, its one-line
  help and the function that builds its argparse tree; only the chosen command's module is
  imported, so `ccus agent` on a device loads no sink, ops, simulator, demo or matplotlib code
  (tests/test_cli.py checks it with `sys.modules` and `-X importtime`). Every other command
  gets a stub parser carrying its help line, so `ccus --help` still lists them all.
- The common options (`-v`, `--log-format`) are accepted anywhere on the command line: every
  parser in the tree carries them (`_Parser`), each parser counting `-v` under its own dest.
- A command whose optional dependency is missing prints one line naming the extra to install
  (`ccus.extras`), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ccus.extras import MissingExtra
from ccus.logs import FORMATS, setup_logging

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
  ccus agent --check --config /etc/ccus-touch/agent.toml
  ccus sink run --db store.sqlite --broker 127.0.0.1:1883
  ccus sink work-history --db store.sqlite
  ccus sink sites import --store store.sqlite sites.csv   each site's name, 元請 and work-day cut
  ccus report work-history --store store.sqlite --site 13100000000001 --month 2026-11 --png wh.png
  ccus report days-worked --store store.sqlite --month 2026-11 --by main --ja --bom --out k.csv
  ccus ops --help                     provisioning, signed config, ID lists, the fleet
  ccus vmc simulate --board           an MDB vending machine controller against the board
"""

# name -> (one-line help, "module:function" that adds the command to the subparsers).
# The help here must be the one the registering function uses (tests/test_cli.py checks).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("run the end-to-end site-day demo on embedded defaults", "ccus.cli:_register_demo"),
    "agent": ("run a device agent (gate, vending or training)", "ccus.cli:_register_agent"),
    "sink": ("the cloud sink: ingest touches, derive work history", "cloud_sink.cli:register"),
    "report": ("reports from the store: CSV, JSON and PNG charts", "cloud_sink.report_cli:register"),
    "ops": ("operators: provisioning, broker configs, signed config, fleet view, ID lists",
            "ops.cli:register"),
    "card": ("emulated cards (nfcpy udp driver, or a PC/SC virtual card)", "sim.cli:register"),
    "board": ("a simulated controller board (the real firmware on a pty)",
              "sim.board.cli:register"),
    "vmc": ("a vending machine controller (MDB master) simulator", "sim.vmc_cli:register"),
    "broker": ("run a private development broker in the foreground", "ccus.cli:_register_broker"),
    "console": ("the operator's web console (fleet, live touches, reports)", "console.cli:register"),
    "cluster": ("a local 3-node NATS cluster (JetStream R3, MQTT) on loopback",
                "ccus.cluster_cli:register"),
    "site-watchdog": ("restart a site broker whose bridge to the cloud stays stuck",
                      "broker.watchdog_cli:register"),
}

# Commands that are services: they log what they do at INFO even without -v.
SERVICES = {"agent", "sink", "broker", "site-watchdog"}
# Commands that drive nfcpy, which sets its own logger to INFO on import.
NFC_USERS = {"demo", "agent", "card"}

_dests = itertools.count()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that accepts the common options wherever it sits in the tree."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A subparser parses into a namespace of its own and copies it over the parent's, so
        # one shared dest would forget the `-v` given before the subcommand: one dest each.
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                          dest=f"verbose_{next(_dests)}", help="more log output (-vv: debug)")
        self.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS,
                          help="auto (default: journal under systemd, else text), text, journal, json")


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--log-format":
            skip = True
        elif a == "--":
            return None
        elif not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def build_parser(chosen: str | None = None, *, every: bool = False) -> argparse.ArgumentParser:
    """The `ccus` parser with the full tree of `chosen` (or of every command) and stubs for the rest."""
    from edge import __version__

    p = _Parser(prog="ccus", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ccus-touch {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (help_, target) in COMMANDS.items():
        if every or name == chosen:
            _registrar(target)(sub)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    return p


def _registrar(target: str) -> Callable[[Any], Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def verbosity(args: argparse.Namespace) -> int:
    return sum(v for k, v in vars(args).items() if k.startswith("verbose_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        cmd = chosen_command(argv)
        missing = MissingExtra.for_module(exc, cmd)
        if missing is exc:
            raise
        print(f"ccus{' ' + cmd if cmd else ''}: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str]) -> int:
    args = build_parser(chosen_command(argv)).parse_args(argv)
    import logging

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity(args), 2)]
    if args.cmd in SERVICES:
        level = min(level, logging.INFO)  # services log what they do; demo output stays clean
    setup_logging(level, getattr(args, "log_format", "auto"))
    if args.cmd in NFC_USERS and not getattr(args, "check", False):
        import nfc  # noqa: F401 - nfcpy sets its logger to INFO on import; the user decides here

        logging.getLogger("nfc").setLevel(max(level, logging.WARNING))
    from cloud_sink.errors import SinkError

    try:
        return int(args.func(args) or 0)
    except SinkError as exc:  # an expected fault of the sink (a store it cannot open, a
        # metrics port taken): one line
        print(f"ccus {args.cmd}: {exc}", file=sys.stderr)
        return 2


def _stop_on_signal() -> threading.Event:
    """An event that SIGTERM (systemd stop) or SIGINT (Ctrl-C) sets."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    return done


# -- the commands that live here --------------------------------------------------------------

def _register_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help=COMMANDS["demo"][0])
    demo.add_argument("--data", default="demo-data", help="demo data folder (recreated each run)")
    demo.add_argument("--console", action="store_true",
                      help="then keep it up with the web console on it until Ctrl-C")
    demo.set_defaults(func=_demo)


def _register_agent(sub: Any) -> None:
    agent = sub.add_parser("agent", help=COMMANDS["agent"][0])
    agent.add_argument("--config", required=True, help="agent config (TOML)")
    agent.add_argument("--check", action="store_true",
                       help="check config, keys, certificates, the cached list, the board port and "
                            "the broker; print a checklist and exit 1 on any failure")
    agent.set_defaults(func=_agent)


def _register_broker(sub: Any) -> None:
    broker = sub.add_parser("broker", help=COMMANDS["broker"][0])
    broker.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    broker.add_argument("--data", help="folder for config, log and persistence")
    broker.set_defaults(func=_broker)


def _demo(args: argparse.Namespace) -> int:
    from demo.site_day import run_demo

    keep = None
    if args.console:
        from console.demo import serve as keep
    return run_demo(args.data, keep)


def _agent(args: argparse.Namespace) -> int:
    if args.check:
        from edge.check import run_checks

        return run_checks(args.config)
    from edge.agent import Agent
    from edge.config import ConfigError, load

    try:
        cfg = load(args.config)
        agent = Agent(cfg)  # checks the TLS files: a missing key is a ConfigError naming it
    except ConfigError as exc:
        print(f"ccus agent: {exc}", file=sys.stderr)
        return 2
    served = None
    if cfg.metrics.listen:  # off by default: without it nothing of prometheus_client is imported
        from edge.metrics import MetricsError, start

        try:
            served = start(agent)  # no prometheus_client: main() names the [metrics] extra
        except (MetricsError, ModuleNotFoundError) as exc:
            agent.outbox.close()
            if isinstance(exc, ModuleNotFoundError):
                raise
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
    if served is not None:
        served.close()
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
