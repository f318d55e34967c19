"""argparse wiring for `ccus ops list publish|show` and `ccus ops keygen`; self-contained so
the `ccus` CLI hooks it with `register(ops_subparsers)` / `register_keygen(ops_subparsers)`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from edge.signing import key_id, load_private_key, write_keypair

Subparsers = argparse._SubParsersAction  # what add_subparsers() returns


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add `list` (with `publish` and `show`) to an argparse subparsers group."""
    lst = subparsers.add_parser("list", help="build and publish signed technician ID lists")
    sub = lst.add_subparsers(dest="list_command", required=True)

    p = sub.add_parser("publish", help="CSV -> signed snapshot (+ delta) -> retained MQTT")
    p.add_argument("--csv", required=True, help="technicians: tid,status,level,cards")
    p.add_argument("--name", required=True, help="list name (one topic level)")
    p.add_argument("--version", required=True, type=int, help="new version, above the last")
    p.add_argument("--key", required=True, help="operator Ed25519 private key (PEM)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="host:port (default %(default)s)")
    p.add_argument("--site-less", action="store_true",
                   help="lists are global (ccus/v1/list/{name}), never under a site; "
                        "accepted for symmetry with site-scoped commands")
    p.add_argument("--prev", help="previous snapshot file: also publish a delta from it and "
                                  "clear its retained chunks")
    p.add_argument("--out", help="where to keep the new snapshot (default {name}.{version}.idl)")
    p.add_argument("--issued-ms", type=int, help="issue time (default: now)")
    p.add_argument("--chunk-size", type=int, default=None, help="bytes per chunk")
    p.add_argument("--dry-run", action="store_true", help="build and sign, publish nothing")
    p.add_argument("--force", action="store_true",
                   help="devices install it even if issued before their freshness window")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a PUBACK")
    p.set_defaults(func=_publish)

    s = sub.add_parser("show", help="print a list file's header as JSON")
    s.add_argument("path")
    s.set_defaults(func=_show)
    return lst


def register_keygen(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add `keygen`: a new operator key pair (private key mode 0600, never printed)."""
    k = subparsers.add_parser("keygen", help="new operator Ed25519 key pair")
    k.add_argument("--out", required=True, help="private key path (public key: OUT.pub)")
    k.set_defaults(func=_keygen)
    return k


def _publish(args: argparse.Namespace) -> int:
    from edge.idlist.dist import DEFAULT_CHUNK_SIZE
    from ops.list_mqtt import parse_broker
    from ops.list_publish import publish_list

    plan = publish_list(
        args.csv, name=args.name, version=args.version, key=load_private_key(args.key),
        broker=None if args.dry_run else parse_broker(args.broker), prev_path=args.prev,
        out_path=args.out, issued_ms=args.issued_ms,
        chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE, progress=not args.no_progress,
        timeout=args.timeout, force=args.force)
    m = plan.manifest
    print(json.dumps({
        "name": m.name, "version": m.version, "issued_ms": m.issued_ms, "records": m.records,
        "cards": m.cards, "bytes": m.size, "chunks": len(m.chunks),
        "delta_changes": len(plan.delta) if plan.delta is not None else None,
        "messages": len(plan.messages), "published": not args.dry_run, "force": m.force,
        "out": args.out or f"{m.name}.{m.version}.idl",
    }))
    return 0


def _show(args: argparse.Namespace) -> int:
    from edge.idlist.codec import open_list

    lst = open_list(args.path)
    print(json.dumps({"name": lst.name, "version": lst.version, "issued_ms": lst.issued_ms,
                      "records": len(lst), "cards": lst.n_cards,
                      "body_sha256": lst.body_hash.hex()}))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    pub = write_keypair(args.out)
    print(json.dumps({"private_key": args.out, "public_key": f"{args.out}.pub",
                      "key_id": key_id(pub)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: `python -m ops.list_cli list publish ...` / `... keygen --out K`."""
    parser = argparse.ArgumentParser(prog="ccus ops")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    register_keygen(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
