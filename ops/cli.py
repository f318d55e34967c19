"""argparse wiring for `ccus ops ...`: hook with `register(subparsers)` from ccus/cli.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ops.errors import one_line

ROLES = ("gate", "vending", "training")
DEFAULT_SITE_BROKER = "site-broker.local"   # = ops.provision.DEFAULT_SITE_BROKER
DEFAULT_LIST = "technicians"                # = ops.provision.DEFAULT_LIST


def fleet_cache_default() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ccus-touch" / "fleet.json"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `ops` command group (PKI, ACLs, broker configs, config push, fleet, lists)."""
    from ops.mqttc import add_broker_args

    ops = subparsers.add_parser("ops", help="operators: provisioning, broker configs, signed "
                                            "config, fleet view, ID lists")
    sub = ops.add_subparsers(dest="ops_cmd", required=True, metavar="OPS_COMMAND")

    ca = sub.add_parser("ca", help="the certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_cmd", required=True)
    p = ca_sub.add_parser("init", help="create the CA (once) and an empty CRL")
    p.add_argument("--pki", required=True, help="PKI folder (keep it offline)")
    p.add_argument("--name", default="ccus-touch CA")
    p.add_argument("--days", type=int, default=3650)
    p.set_defaults(func=one_line(_ca_init))
    p = ca_sub.add_parser("crl", help="re-sign the CRL, renewing its expiry (do it monthly: "
                                      "it lapses after --days)")
    p.add_argument("--pki", required=True)
    p.add_argument("--days", type=int, default=30, help="validity of the new CRL (default 30)")
    _crl_apply_args(p)
    p.set_defaults(func=one_line(_ca_crl))

    p = sub.add_parser("server", help="a server certificate for the cloud (or a site) broker")
    p.add_argument("--pki", required=True)
    p.add_argument("--name", action="append", required=True,
                   help="DNS name or IP the broker is reached by (repeat)")
    p.add_argument("--site", help="for this site's broker (pki/sites/SITE/server)")
    p.add_argument("--force", action="store_true",
                   help="re-issue: the old pair moves aside as server.old.*")
    p.set_defaults(func=one_line(_server))

    p = sub.add_parser("identity", help="an operator, sink or console certificate")
    p.add_argument("--pki", required=True)
    p.add_argument("--kind", choices=("operator", "sink", "console"), required=True)
    p.add_argument("--name", required=True)
    p.set_defaults(func=one_line(_identity))

    site = sub.add_parser("site", help="sites")
    site_sub = site.add_subparsers(dest="site_cmd", required=True)
    p = site_sub.add_parser("add", help="bridge identity, site broker cert, device certs "
                                        "and agent.toml files; all or nothing")
    p.add_argument("--pki", required=True)
    p.add_argument("--site", required=True, help="14-digit CCUS site ID")
    p.add_argument("--device", action="append", default=[], metavar="ID[:ROLE[:DIR]]",
                   help="a device, its role (gate, vending, training; default --role) and for "
                        "a gate its reader's direction (in or out, default in); repeat")
    p.add_argument("--role", default="gate", choices=ROLES,
                   help="role of devices given without one (default %(default)s)")
    p.add_argument("--broker-name", action="append", default=[],
                   help="DNS name/IP of the site broker on the site LAN (repeat; default "
                        f"{DEFAULT_SITE_BROKER})")
    p.add_argument("--list-name", default=DEFAULT_LIST,
                   help="the signed ID list the devices follow (default %(default)s)")
    p.set_defaults(func=one_line(_site_add))

    dev = sub.add_parser("device", help="device certificates")
    dev_sub = dev.add_subparsers(dest="device_cmd", required=True)
    p = dev_sub.add_parser("add", help="one more device at a site")
    p.add_argument("--pki", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--id", required=True, metavar="ID[:ROLE[:DIR]]",
                   help="device id, optionally with role and gate direction as in site add")
    p.add_argument("--role", default="gate", choices=ROLES)
    p.add_argument("--broker-name", default="",
                   help="the site broker's name (default: the name the site was added with, "
                        f"else {DEFAULT_SITE_BROKER})")
    p.add_argument("--list-name", default=DEFAULT_LIST,
                   help="the signed ID list the device follows (default %(default)s)")
    p.set_defaults(func=one_line(_device_add))
    p = dev_sub.add_parser("rotate", help="new key and certificate; the old one stays valid "
                                          "until `ccus ops cert revoke`")
    p.add_argument("--pki", required=True)
    p.add_argument("--id", required=True)
    p.set_defaults(func=one_line(_device_rotate))
    p = dev_sub.add_parser("revoke", help="lost device: CRL all its certificates, drop its ACL")
    p.add_argument("--pki", required=True)
    p.add_argument("--id", required=True)
    p.set_defaults(func=one_line(_device_revoke))

    cert = sub.add_parser("cert", help="certificates: revocation and the CRL")
    cert_sub = cert.add_subparsers(dest="cert_cmd", required=True)
    p = cert_sub.add_parser("revoke", help="put an identity's certificates (or serials) on the "
                                           "CRL; with --bundle/--pid-file the broker applies it")
    p.add_argument("name", nargs="?", help="device id, operator:NAME, sink:NAME or bridge:SITE "
                                           "(every certificate it was issued)")
    p.add_argument("--pki", required=True)
    p.add_argument("--serial", action="append", default=[], help="one serial, hex (repeat)")
    _crl_apply_args(p)
    p.set_defaults(func=one_line(_cert_revoke))
    p = cert_sub.add_parser("status", help="the CRL's expiry: exit 1 when it lapses within "
                                           "--warn-days")
    p.add_argument("--pki", help="PKI folder (its crl.pem)")
    p.add_argument("--crl", help="a crl.pem elsewhere (a broker's bundle)")
    p.add_argument("--warn-days", type=float, default=7.0)
    p.set_defaults(func=one_line(_cert_status))

    p = sub.add_parser("acl", help="write the broker ACL file from the inventory")
    p.add_argument("--pki", required=True)
    p.add_argument("--site", help="only this site (a site broker's ACL)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=one_line(_acl))

    p = sub.add_parser("nats-auth", help="the NATS tier's TLS bundle: certs, per-identity "
                       "permissions (auth.conf), accepted certificates (pinned.conf)")
    p.add_argument("--pki", required=True)
    p.add_argument("--out", required=True, help="folder for `ccus cluster up --secure`")
    p.set_defaults(func=one_line(_nats_auth))

    p = sub.add_parser("broker-config", help="a broker bundle: mosquitto.conf, certs, CRL, ACL")
    p.add_argument("--place", choices=("dev", "site", "cloud"), required=True)
    p.add_argument("--pki", default="", help="PKI folder (site and cloud)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--site", help="site id (site broker)")
    p.add_argument("--cloud", default="", metavar="HOST:PORT", help="cloud broker (site broker); "
                   "with --cloud-kind nats every node, 'H:P H:P H:P'")
    p.add_argument("--cloud-kind", choices=("mosquitto", "nats"), default="mosquitto",
                   help="what the site broker bridges to: Mosquitto's cloud broker (default) or "
                   "the NATS cluster's MQTT gateway (run `ccus site-watchdog --keep-retained` "
                   "beside it)")
    p.add_argument("--listener", default="8883", help="mosquitto listener: 'PORT [ADDRESS]'")
    p.add_argument("--install-dir", default="/etc/mosquitto/ccus",
                   help="where the bundle will live on the broker host")
    p.add_argument("--user", default="mosquitto", help="user the broker drops to ('' = none)")
    p.add_argument("--data-dir", default="/var/lib/mosquitto", help="persistence_location")
    p.add_argument("--log-dest", default="syslog",
                   help="Mosquitto log_dest, e.g. 'file /var/log/mosquitto/ccus.log'")
    p.add_argument("--stock-include", action="store_true",
                   help="to be included from Debian's stock mosquitto.conf (conf.d): leave "
                        "persistence_location and log_dest to it")
    p.add_argument("--dynsec-plugin", default="",
                   help="path of mosquitto_dynamic_security.so (default: found on this host)")
    p.add_argument("--max-queued-messages", type=int, default=None)
    p.add_argument("--max-queued-bytes", type=int, default=None)
    p.add_argument("--session-expiry", default=None,
                   help="persistent_client_expiration, e.g. 14d (units h d w m y)")
    p.set_defaults(func=one_line(_broker_config))

    cfg = sub.add_parser("config", help="signed configuration")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True)
    p = cfg_sub.add_parser("push", help="TOML overlay -> signed, versioned, retained")
    p.add_argument("--site", required=True)
    p.add_argument("--device", help="one device (default: every device of the site)")
    p.add_argument("--file", required=True, help="overlay TOML (a partial agent.toml)")
    p.add_argument("--signing-key", required=True, help="operator Ed25519 key (ccus ops keygen)")
    p.add_argument("--version", type=int, help="default: the issue time in ms")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to collect acks")
    p.add_argument("--dry-run", action="store_true", help="check and sign, publish nothing")
    p.add_argument("--force", action="store_true",
                   help="devices apply it even if issued before their freshness window")
    p.add_argument("--pki", default="", help="PKI folder: every device of the site in its "
                   "inventory must answer (default: the devices whose retained state says "
                   "online)")
    add_broker_args(p)
    p.set_defaults(func=one_line(_config_push))

    p = sub.add_parser("devices", help="the fleet from retained state: problems first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--site", default="+", help="one site (default: all)")
    p.add_argument("--cache", default=str(fleet_cache_default()),
                   help="last known state per device, so an offline device keeps its role, "
                        "versions and last-seen time (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    add_broker_args(p)
    p.set_defaults(func=one_line(_devices))

    try:  # the ID-list commands live with the ID-list code
        from ops.list_cli import register as register_list
        from ops.list_cli import register_keygen
    except ImportError:  # pragma: no cover - only while that module is missing
        pass
    else:
        register_list(sub)
        register_keygen(sub)
    return ops


def _out(obj: Any) -> int:
    print(json.dumps(obj, default=str))
    return 0


def _issued(i: Any) -> dict[str, Any]:
    # paths, serial and expiry only: key material is never printed
    return {"cn": i.cn, "serial": f"{i.serial:x}", "cert": str(i.cert), "key": str(i.key),
            "not_after": i.not_after.isoformat()}


def _ca_init(a: argparse.Namespace) -> int:
    from ops.pki import CA, fingerprint

    ca = CA.init(a.pki, a.name, a.days)
    return _out({"ca": str(ca.cert_path), "crl": str(ca.crl_path),
                 "sha256": fingerprint(ca.cert_path)})


def _crl_apply_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", action="append", default=[], metavar="DIR",
                   help="copy the new crl.pem into this broker bundle folder (repeat)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pid-file", help="SIGHUP the broker whose pid is in this file "
                                      "(Debian: /run/mosquitto/mosquitto.pid)")
    g.add_argument("--pid", type=int, help="SIGHUP this broker process")


def _crl_apply(a: argparse.Namespace, crl: Path) -> dict[str, Any]:
    """Copy the CRL into the bundles and SIGHUP the broker: Mosquitto 2.0 rereads crlfile."""
    from ops.pki import crl_status, hup_broker, install_crl

    st = crl_status(crl)
    done: dict[str, Any] = {"crl": str(crl), "next_update": st.next_update.isoformat(),
                            "installed": [str(x) for x in install_crl(crl, a.bundle)]}
    pid = a.pid
    if a.pid_file:
        pid = int(Path(a.pid_file).read_text().split()[0])
    if pid:
        hup_broker(pid)
        done["hup"] = pid
    else:
        done["next"] = ("copy crl.pem to every broker's bundle and reload it "
                        "(systemctl reload mosquitto: SIGHUP)")
    return done


def _ca_crl(a: argparse.Namespace) -> int:
    from ops.pki import CA

    ca = CA(a.pki)
    return _out({**_crl_apply(a, ca.write_crl(days=a.days)), "revoked": len(ca.revoked())})


def _server(a: argparse.Namespace) -> int:
    from ops.pki import CA

    out = Path(a.pki) / ("server" if not a.site else f"sites/{a.site}/server")
    return _out(_issued(CA(a.pki).issue_server(out, a.name, force=a.force)))


def _identity(a: argparse.Namespace) -> int:
    from ops.provision import add_identity

    return _out(_issued(add_identity(a.pki, a.kind, a.name)))


def _site_add(a: argparse.Namespace) -> int:
    from ops.provision import add_site, parse_device_spec

    specs = [parse_device_spec(d, a.role) for d in a.device]
    return _out([_issued(i) for i in add_site(a.pki, a.site, specs,
                                              broker_names=a.broker_name,
                                              list_name=a.list_name)])


def _device_add(a: argparse.Namespace) -> int:
    from ops.provision import add_device, parse_device_spec, site_broker_name

    spec = parse_device_spec(a.id, a.role)
    host = a.broker_name or site_broker_name(a.pki, a.site)
    return _out(_issued(add_device(a.pki, a.site, spec.id, role=spec.role,
                                   direction=spec.direction, host=host,
                                   list_name=a.list_name)))


def _device_rotate(a: argparse.Namespace) -> int:
    from ops.provision import rotate_device

    issued, old = rotate_device(a.pki, a.id)
    return _out({**_issued(issued), "old_serial": f"{old:x}"})


def _device_revoke(a: argparse.Namespace) -> int:
    from ops.provision import revoke_device

    serials = revoke_device(a.pki, a.id)
    return _out({"revoked": [f"{s:x}" for s in serials],
                 "next": "regenerate the ACL (ccus ops acl / broker-config), copy acl and "
                         "crl.pem to the brokers, reload them (SIGHUP: both take effect)"})


def _serials_of(pki: str, name: str) -> list[int]:
    from ops.inventory import InventoryFile
    from ops.pki import PkiError

    data = InventoryFile(pki).data
    kind, _, rest = name.partition(":")
    entry = data[kind + "s"].get(rest) if rest and kind + "s" in data else \
        data["devices"].get(name)
    if not entry:
        raise PkiError(f"no identity {name!r} in the inventory (a device id, operator:NAME, "
                       "sink:NAME, console:NAME or bridge:SITE)")
    return [int(s, 16) for s in entry["serials"]]


def _cert_revoke(a: argparse.Namespace) -> int:
    from ops.pki import CA, PkiError

    serials = [int(s, 16) for s in a.serial] + (_serials_of(a.pki, a.name) if a.name else [])
    if not serials:
        raise PkiError("give an identity NAME or --serial")
    ca = CA(a.pki)
    for s in serials:
        ca.revoke(s)
    return _out({"revoked": [f"{s:x}" for s in serials], **_crl_apply(a, ca.crl_path)})


def _cert_status(a: argparse.Namespace) -> int:
    from ops.pki import PkiError, crl_status

    if not (a.pki or a.crl):
        raise PkiError("give --pki or --crl")
    st = crl_status(a.crl or Path(a.pki) / "crl.pem", warn_days=a.warn_days)
    _out({"crl": str(st.path), "next_update": st.next_update.isoformat(),
          "days_left": round(st.days_left, 2), "revoked": st.revoked, "problem": st.problem})
    if st.problem:
        print(f"ccus ops: {st.problem}", file=sys.stderr)
        return 1
    return 0


def _acl(a: argparse.Namespace) -> int:
    from edge.atomic import write_atomic
    from ops.acl import render_acl
    from ops.inventory import InventoryFile

    write_atomic(a.out, render_acl(InventoryFile(a.pki).inventory(), site=a.site))
    return _out({"acl": a.out})


def _nats_auth(a: argparse.Namespace) -> int:
    from ops.nats_auth import write_bundle

    out = write_bundle(a.pki, a.out)
    return _out({"bundle": str(out), "next": "ccus cluster up --secure BUNDLE; after any "
                 "provisioning or revocation run this again and reload the nodes (SIGHUP)"})


def _broker_config(a: argparse.Namespace) -> int:
    import dataclasses

    from broker.launcher import Limits
    from ops.brokerconf import HostOpts, bundle

    given = {"max_queued_messages": a.max_queued_messages,
             "max_queued_bytes": a.max_queued_bytes, "session_expiry": a.session_expiry}
    limits = dataclasses.replace(Limits(), **{k: v for k, v in given.items() if v is not None})
    host = HostOpts(user=a.user, data_dir=a.data_dir, log_dest=a.log_dest,
                    stock_include=a.stock_include, dynsec_plugin=a.dynsec_plugin, limits=limits)
    conf = bundle(a.place, a.pki, a.out, site=a.site, cloud_address=a.cloud,
                  cloud_kind=a.cloud_kind, listener=a.listener, install_dir=a.install_dir, host=host)
    return _out({"config": str(conf), "install_dir": a.install_dir})


def _config_push(a: argparse.Namespace) -> int:
    from edge.signing import load_private_key
    from ops.configpush import build, load_overlay, push
    from ops.mqttc import broker_opts

    body = load_overlay(a.file)
    topic, version, payload = build(load_private_key(a.signing_key), a.site, a.device, body,
                                    version=a.version, force=a.force)
    if a.dry_run:
        return _out({"topic": topic, "version": version, "bytes": len(payload),
                     "published": False, "force": a.force})
    opts = broker_opts(a)
    expected = None
    if a.device is None and a.wait > 0:
        expected = _site_devices(a, opts)
    res = push(opts, topic, version, payload, site=a.site, dev=a.device, wait_s=a.wait,
               expected=expected)
    _out({"topic": topic, "version": version, "published": True,
          "acks": {d: {"result": k.get("result"), "reason": k.get("reason"),
                       "detail": k.get("detail")} for d, k in sorted(res.acks.items())},
          "expected": res.expected, "missing": res.missing,
          "mismatched": dict(sorted(res.mismatched.items()))})
    if res.mismatched:
        print(f"ccus ops: refused {sum(res.mismatched.values())} config ack(s) whose payload "
              f"names another device than its topic (from {', '.join(sorted(res.mismatched))})",
              file=sys.stderr)
    if a.wait <= 0:
        return 0
    if res.refused:
        return 3
    if res.missing or not res.acks:
        return 4  # an expected device (or, with none expected, every device) did not answer
    return 5 if res.mismatched else 0


def _site_devices(a: argparse.Namespace, opts: Any) -> list[str]:
    """Who must ack a site push: the site's devices in the PKI inventory, else the devices
    whose retained state says online."""
    if a.pki:
        from ops.inventory import InventoryFile

        return sorted(d for s, d in InventoryFile(a.pki).inventory().devices if s == a.site)
    from ops import fleet
    from ops.mqttc import snapshot
    from protocol import topics

    rows = [fleet.parse(t, b) for t, b in snapshot(opts, topics.state(a.site, "+")).items()]
    return sorted(r.dev for r in rows if r is not None and r.online)


def _devices(a: argparse.Namespace) -> int:
    from ops import fleet
    from ops.mqttc import broker_opts, snapshot
    from protocol import topics

    msgs = snapshot(broker_opts(a), topics.state(a.site, "+"))
    now = int(time.time() * 1000)
    cache = None if a.no_cache else Path(a.cache)
    known = _read_cache(cache)
    rows = fleet.fleet(msgs, now, known)
    if cache is not None:
        _write_cache(cache, fleet.remembered(rows, known))
    if a.json:
        _out(fleet.as_json(rows))
    else:
        print(fleet.render(rows, now))
    return 1 if any(r.problems for r in rows) else 0


def _read_cache(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # a broken cache costs only the memory of old rows
        print(f"ccus ops: ignoring fleet cache {path}: {exc}", file=sys.stderr)
        return {}
    return {str(k): v for k, v in doc.items() if isinstance(v, dict)} \
        if isinstance(doc, dict) else {}


def _write_cache(path: Path, known: dict[str, dict[str, Any]]) -> None:
    from edge.config_apply import write_atomic

    try:
        write_atomic(path, (json.dumps(known, sort_keys=True, default=str) + "\n").encode())
    except OSError as exc:  # the view is printed; only the memory of it is lost
        print(f"ccus ops: cannot save fleet cache {path}: {exc.strerror}; give --cache FILE "
              "or --no-cache", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Standalone: `python -m ops.cli ...` (same as `ccus ops ...`)."""
    parser = argparse.ArgumentParser(prog="ccus")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["ops", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
