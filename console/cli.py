"""`ccus console ...`: serve the console, and `ccus console user add` for its accounts.

Only argparse and the users file at import time; Starlette, uvicorn and paho load when the
console starts, so `ccus --help` stays quick.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from pathlib import Path

from console import ConsoleError

Sub = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:  # type: ignore[valid-type]
    """Add the `console` command to the `ccus` parser's subcommands."""
    from ops.mqttc import add_broker_args

    p = sub.add_parser("console", help="the operator's web console (fleet, live touches, reports)")  # type: ignore[attr-defined]
    p.add_argument("--store", "--db", dest="store", metavar="URL",
                   help="the sink's store: a path, sqlite:///path or postgresql://...")
    add_broker_args(p)     # --broker --ca --cert --key --mqtt-protocol, as every ops command
    p.add_argument("--client-id", default="", help="MQTT client id (on the cloud broker: the CN)")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    p.add_argument("--users", metavar="FILE", help="the users file (ccus console user add)")
    p.add_argument("--secret-file", metavar="FILE",
                   help="session signing key (default: USERS.secret, created when missing)")
    p.add_argument("--tls-cert", default="", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--tls-key", default="", help="... and its private key")
    p.add_argument("--insecure-cookies", action="store_true",
                   help="session cookie without the Secure flag: only for plain HTTP on a "
                        "trusted network (a browser keeps Secure cookies on http://localhost)")
    p.set_defaults(func=_serve)
    s = p.add_subparsers(dest="console_cmd", metavar="COMMAND")
    u = s.add_parser("user", help="console accounts").add_subparsers(dest="user_cmd", required=True)
    a = u.add_parser("add", help="add (or replace) a user; asks for the password")
    a.add_argument("--users", dest="user_file", required=True, metavar="FILE")
    a.add_argument("name")
    a.add_argument("--role", required=True,
                   choices=["operator", "site_manager", "contractor", "training"])
    a.add_argument("--scope", action="append", default=[], metavar="KIND:ID",
                   help="site:ID, contractor:ID or center:ID (repeat, or comma-separate)")
    a.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    a.set_defaults(func=_user_add)


def _user_add(args: argparse.Namespace) -> int:
    from console import auth, users

    try:
        sc = users.parse_scope(args.scope)
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                raise ConsoleError("the passwords differ")
        if len(password) < 10:
            raise ConsoleError("a password needs at least 10 characters")
        user = users.User(args.name, args.role, auth.hash_password(password), sc["site"],
                          sc["contractor"], sc["center"])
        replaced = users.add(args.user_file, users.check(user))
    except ConsoleError as exc:
        print(f"ccus console: {exc}", file=sys.stderr)
        return 2
    print(f"{'replaced' if replaced else 'added'} {args.name} ({args.role}) in {args.user_file}")
    return 0


def secret_of(path: Path) -> str:
    """The session signing key: read it, or create it (0600) when the file is missing."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key


def _serve(args: argparse.Namespace) -> int:
    if getattr(args, "console_cmd", None):
        return 2
    try:
        return _serve_checked(args)
    except ConsoleError as exc:
        print(f"ccus console: {exc}", file=sys.stderr)
        return 2


def _serve_checked(args: argparse.Namespace) -> int:
    if not args.store or not args.users:
        raise ConsoleError("--store URL and --users FILE are needed")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConsoleError(f"--listen must be HOST:PORT, got {args.listen!r}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConsoleError("--tls-cert and --tls-key go together")
    import uvicorn

    from cloud_sink.store import open_store
    from console.app import Config, build_app
    from console.live import Bridge
    from ops.mqttc import MqttError, broker_opts

    try:
        open_store(args.store, create=False).close()   # a typo or an unreachable database: say so now
    except (ValueError, RuntimeError, OSError) as exc:
        raise ConsoleError(f"store {args.store}: {exc}") from None
    from console.users import load

    load(args.users)   # a missing or malformed users file: say so before anything starts
    secret = secret_of(Path(args.secret_file or f"{args.users}.secret"))
    cfg = Config(args.store, Path(args.users), secret, secure_cookies=not args.insecure_cookies)
    bridge = Bridge()
    try:
        opts = broker_opts(args)
        bridge.start(opts, args.client_id)
    except (ValueError, MqttError) as exc:
        raise ConsoleError(str(exc) if "broker" in str(exc) else f"broker: {exc}") from None
    app = build_app(cfg, bridge)
    scheme = "https" if args.tls_cert else "http"
    print(f"ccus console on {scheme}://{host}:{port}/ (store {args.store}, broker {args.broker})",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(
        app, host=host.strip("[]"), port=int(port), log_level="warning",
        ssl_certfile=args.tls_cert or None, ssl_keyfile=args.tls_key or None,
        timeout_graceful_shutdown=2, proxy_headers=True, forwarded_allow_ips="127.0.0.1"))
    try:
        server.run()
    finally:
        bridge.stop()
    return 0
