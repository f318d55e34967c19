"""argparse wiring for `ccus ops list publish|show` and `ccus ops keygen`; self-contained so
the `ccus` CLI hooks it with `register(ops_subparsers)` / `register_keygen(ops_subparsers)`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edge.signing import key_id, load_private_key, write_keypair
from ops.errors import one_line
from ops.mqttc import add_broker_args

Subparsers = argparse._SubParsersAction  # what add_subparsers() returns


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add `list` (with `publish` and `show`) to an argparse subparsers group."""
    lst = subparsers.add_parser("list", help="build and publish signed technician ID lists")
    sub = lst.add_subparsers(dest="list_command", required=True)

    p = sub.add_parser("publish", help="CSV -> signed snapshot (+ delta) -> retained MQTT")
    p.add_argument("--csv", help="technicians: tid,status,level,cards")
    p.add_argument("--name", help="list name (one topic level)")
    p.add_argument("--version", type=int, help="new version, above the last")
    p.add_argument("--signing-key",
                   help="operator Ed25519 private key (PEM, `ccus ops keygen`)")
    add_broker_args(p)
    p.add_argument("--site-less", action="store_true",
                   help="lists are global (ccus/v1/list/{name}), never under a site; "
                        "accepted for symmetry with site-scoped commands")
    p.add_argument("--prev", help="previous snapshot file: also publish a delta from it and "
                                  "clear its retained chunks")
    p.add_argument("--keep", help="where to keep the new snapshot file, the next publish's "
                                  "--prev (default {name}.{version}.idl, inside --out if given)")
    p.add_argument("--out", metavar="DIR",
                   help="also write the exact messages to this (new or empty) folder: "
                        "NNNN.bin payloads, messages.tsv, manifest.json")
    p.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="publish the messages of a folder written by --dry-run --out DIR "
                        "(no --csv/--name/--version/--signing-key then)")
    p.add_argument("--issued-ms", type=int, help="issue time (default: now)")
    p.add_argument("--chunk-size", type=int, default=None, help="bytes per chunk")
    p.add_argument("--dry-run", action="store_true", help="build and sign, publish nothing")
    p.add_argument("--force", action="store_true",
                   help="devices install it even if issued before their freshness window")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a PUBACK")
    p.set_defaults(func=one_line(_publish, 1))

    s = sub.add_parser("show", help="print a list file's header as JSON")
    s.add_argument("path")
    s.set_defaults(func=one_line(_show, 1))
    return lst


def register_keygen(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add `keygen`: a new operator key pair (private key mode 0600, never printed)."""
    k = subparsers.add_parser("keygen", help="new operator Ed25519 key pair")
    k.add_argument("--out", required=True, help="private key path (public key: OUT.pub)")
    k.set_defaults(func=one_line(_keygen, 1))
    return k


def _publish(args: argparse.Namespace) -> int:
    from edge.idlist.dist import DEFAULT_CHUNK_SIZE
    from ops.list_publish import publish_list, publish_messages, read_messages
    from ops.mqttc import broker_opts

    if args.from_dir:
        if args.dry_run:
            raise ValueError("--from publishes a folder: nothing to do with --dry-run")
        msgs = read_messages(args.from_dir)
        n = publish_messages(broker_opts(args), msgs, progress=not args.no_progress,
                             timeout=args.timeout)
        print(json.dumps({"from": args.from_dir, "messages": n, "published": True}))
        return 0
    if args.key and not args.cert:
        raise ValueError("--key is the TLS client key (with --cert); the list is signed "
                         "with --signing-key")
    missing = [f"--{k.replace('_', '-')}" for k in ("csv", "name", "version", "signing_key")
               if getattr(args, k) is None]
    if missing:
        raise ValueError(f"list publish needs {', '.join(missing)} (or --from DIR)")
    if args.out and args.out.endswith(".idl"):
        raise ValueError("--out is the folder for the messages now; keep the snapshot file "
                         "with --keep FILE")
    keep = args.keep or str(Path(args.out or ".") / f"{args.name}.{args.version}.idl")
    opts = None if args.dry_run else broker_opts(args)
    plan = publish_list(
        args.csv, name=args.name, version=args.version,
        key=load_private_key(args.signing_key), broker=opts, prev_path=args.prev,
        out_path=keep, issued_ms=args.issued_ms,
        chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE, progress=not args.no_progress,
        timeout=args.timeout, force=args.force, messages_dir=args.out)
    m = plan.manifest
    print(json.dumps({
        "name": m.name, "version": m.version, "issued_ms": m.issued_ms, "records": m.records,
        "cards": m.cards, "bytes": m.size, "chunks": len(m.chunks),
        "delta_changes": len(plan.delta) if plan.delta is not None else None,
        "messages": len(plan.messages), "published": not args.dry_run, "force": m.force,
        "snapshot": keep, "out": args.out,
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
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
