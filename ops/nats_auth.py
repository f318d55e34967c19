"""The NATS tier's authorization from the same inventory and rules as the Mosquitto ACL
(ops/acl.py), and the TLS bundle every node of `ccus cluster up --secure DIR` reads.

Rules of this file:

- One source of rights: device_rules, bridge_rules, OPERATOR_RULES, CONSOLE_RULES and SINK_RULES of
  ops/acl.py, each MQTT topic filter turned into its NATS subject (protocol.topics.nats_subject);
  "write" is a publish allow, "read" a subscribe allow. Nothing else is allowed.
- Users are certificate identities (tls `verify_and_map`): a device is its SAN URI
  ``urn:ccus:{site}:{dev}`` (so the site is part of the identity, unlike the Mosquitto
  username), the other kinds their subject DN ``CN={kind}:{name},OU={kind}``.
- Devices, operators, consoles and bridges may connect over MQTT only (``allowed_connection_types``):
  their extra subscribe right ``$MQTT.sub.>`` (the gateway's delivery subjects of QoS 1
  subscriptions, which NATS 2.9 checks against the user) cannot be used natively then, and an
  MQTT SUBSCRIBE to ``$MQTT/sub/...`` is refused by the gateway itself. Sinks connect natively
  only and get exactly the JetStream API subjects of the touch stream and its consumers.
- A MQTT filter ending in ``/#`` also matches its parent level; the gateway subscribes to both
  (``ccus.v1.list.>`` and ``ccus.v1.list``), so both are allowed.
- The auth callout (NATS 2.10 and later; broker/nats_callout.py): the bundle also holds its
  files, written whenever nkeys is installed: callout.json (every user's rights as auth.conf
  has them, and its MQTT client id rule, ``mqtt_id_rule``), callout.conf (the authorization a
  node includes instead of auth.conf), the issuer's account seed and the callout user's
  password (made once, kept, 0600) and the callout's client certificate (pki/nats/callout,
  pinned like the others). broker/nats.py uses them when its nats-server has the callout.
- Revocation without a CRL (NATS 2.9 reads none): ``pinned_certs`` lists the public-key hash of
  every client certificate of the PKI that is neither revoked (revoked.txt) nor expired; a
  node refuses any other at the handshake: natively after a reload (SIGHUP), over MQTT after
  the node's restart (broker/nats.py says why). Removing an identity from the inventory
  removes its user; on reload NATS closes that user's live connections.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.nats_callout import ACCOUNT, AUTH_ACCOUNT
from broker.nats_callout import CERT as CALLOUT_CERT
from broker.nats_callout import CONF as CALLOUT_CONF
from broker.nats_callout import KEY as CALLOUT_KEY
from broker.nats_callout import PASSWORD as CALLOUT_PASS
from broker.nats_callout import SEED as CALLOUT_SEED
from broker.nats_callout import USER as CALLOUT_USER
from broker.nats_callout import USERS as CALLOUT_USERS
from edge.atomic import write_atomic
from ops.acl import (
    CONSOLE_RULES,
    OPERATOR_RULES,
    SINK_RULES,
    Inventory,
    bridge_rules,
    device_rules,
    render_acl,
)
from ops.inventory import InventoryFile
from ops.mqttc import OPS_CLIENT_PREFIX
from ops.pki import CA, PkiError
from ops.provision import copy_secret
from protocol import topics as t

MQTT_ONLY = ["MQTT"]
NATIVE_ONLY = ["STANDARD"]
MQTT_DELIVERY = "$MQTT.sub.>"  # where the gateway delivers a QoS 1 subscription's messages
AUTH_FILE, PINNED_FILE = "auth.conf", "pinned.conf"


def device_user(site: str, dev: str) -> str:
    return f"urn:ccus:{site}:{dev}"


def identity_user(kind: str, name: str) -> str:
    """The DN string NATS makes of an ops/pki.py identity certificate (Go's RDN order)."""
    return f"CN={kind}:{name},OU={kind}"


def _subjects(topic_filter: str) -> list[str]:
    s = t.nats_subject(topic_filter)
    return [s, s[:-2]] if s.endswith(".>") else [s]


def translate(rules: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """ops/acl.py rules -> (publish allow, subscribe allow) NATS subjects."""
    pub: list[str] = []
    sub: list[str] = []
    for access, topic in rules:
        if access in ("write", "readwrite"):
            pub += [s for s in [t.nats_subject(topic)] if s not in pub]
        if access in ("read", "readwrite"):
            sub += [s for s in _subjects(topic) if s not in sub]
    return pub, sub


def sink_js_subjects(stream: str = t.TOUCH_STREAM) -> list[str]:
    """The JetStream API a sink needs: make (or look at) the touch stream, make and read its
    durable consumer, pull from it, ack. No delete, no purge, no other stream."""
    api = "$JS.API"
    return [f"{api}.INFO", f"{api}.STREAM.CREATE.{stream}", f"{api}.STREAM.INFO.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.*", f"{api}.CONSUMER.INFO.{stream}.*",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.ACK.{stream}.>"]


def users(inv: Inventory) -> list[dict[str, object]]:
    """Every identity of the inventory as a NATS user: name, connection types, permissions."""
    render_acl(inv)  # the same checks as the Mosquitto ACL (one device id at one site)
    out: list[dict[str, object]] = []

    def add(user: str, rules: Iterable[tuple[str, str]], types: list[str],
            extra_pub: Iterable[str] = (), extra_sub: Iterable[str] = ()) -> None:
        pub, sub = translate(rules)
        pub += list(extra_pub)
        # an empty allow list is no restriction at all in NATS: nothing to publish is a deny
        publish = {"allow": pub} if pub else {"deny": [">"]}
        out.append({"user": user, "allowed_connection_types": types,
                    "permissions": {"publish": publish,
                                    "subscribe": {"allow": sub + list(extra_sub)}}})

    for site, dev in sorted(set(inv.devices)):
        add(device_user(site, dev), device_rules(site, dev), MQTT_ONLY, extra_sub=[MQTT_DELIVERY])
    for name in sorted(set(inv.operators)):
        add(identity_user("operator", name), OPERATOR_RULES, MQTT_ONLY, extra_sub=[MQTT_DELIVERY])
    for name in sorted(set(inv.bridges)):
        add(identity_user("bridge", name), bridge_rules(name), MQTT_ONLY,
            extra_sub=[MQTT_DELIVERY])
    for name in sorted(set(inv.consoles)):   # the operator's console: reads, writes nothing
        add(identity_user("console", name), CONSOLE_RULES, MQTT_ONLY, extra_sub=[MQTT_DELIVERY])
    for name in sorted(set(inv.sinks)):
        # replies of JetStream requests and pulls come back on the client's _INBOX
        add(identity_user("sink", name), SINK_RULES, NATIVE_ONLY, extra_pub=sink_js_subjects(),
            extra_sub=["_INBOX.>"])
    return out


def mqtt_id_rule(user: str) -> dict[str, str] | None:
    """The MQTT client id a user may connect with (broker/callout_rule.py checks it): a device
    its device id, a bridge ``bridge-{site}`` (site-cluster.conf's remote_clientid), an
    operator's tools ``ccus-ops-...``; anyone else no MQTT at all."""
    if user.startswith("urn:ccus:"):
        return {"is": user.rsplit(":", 1)[1]}
    kind, _, name = user.removeprefix("CN=").split(",")[0].partition(":")
    if kind == "bridge":
        return {"is": f"bridge-{name}"}
    if kind in ("operator", "console"):   # both connect through ops/mqttc.py
        return {"prefix": OPS_CLIENT_PREFIX}
    return None


def callout_users(inv: Inventory, revoked: Iterable[int] = ()) -> dict[str, object]:
    """The auth callout's users file: every user's rights as auth.conf has them, its MQTT
    client id rule, and the revoked certificates' serials (hex)."""
    out: dict[str, object] = {}
    for u in users(inv):
        perms: Any = u["permissions"]
        out[str(u["user"])] = {"pub": perms["publish"].get("allow", []),
                               "sub": perms["subscribe"]["allow"],
                               "types": u["allowed_connection_types"],
                               "mqtt_id": mqtt_id_rule(str(u["user"]))}
    return {"account": ACCOUNT, "users": out, "revoked": [f"{n:x}" for n in sorted(revoked)]}


def render_callout_conf(issuer: str, password: str) -> str:
    """The authorization a node includes instead of auth.conf when it runs the auth callout
    (NATS 2.10 and later): the account CCUS without users (the callout places each client
    there), the account AUTH with the callout service's user, and the callout itself."""
    return "\n".join([
        "# ccus-touch NATS authorization by auth callout, generated by `ccus ops nats-auth`;",
        "# do not edit. broker/nats_callout.py answers; the users are in callout.json.",
        "accounts {", f"  {ACCOUNT}: {{ jetstream: enabled }}",
        f"  {AUTH_ACCOUNT}: {{ users: [ {{ user: {json.dumps(CALLOUT_USER)}, "
        f"password: {json.dumps(password)} }} ] }}", "}",
        "authorization {", "  auth_callout {", f"    issuer: {json.dumps(issuer)}",
        f"    account: {AUTH_ACCOUNT}", f"    auth_users: [ {json.dumps(CALLOUT_USER)} ]", "  }",
        "}", ""])


def write_callout(pki: Path, out: Path, inv: Inventory) -> bool:
    """The callout's files in the bundle (its certificate, issued once into pki/nats/callout;
    the issuer seed and the callout user's password, made once and kept; callout.conf and
    callout.json every time). False when nkeys is missing (the [cluster] extra)."""
    try:
        import nkeys  # type: ignore[import-untyped]
    except ImportError:
        return False
    import secrets

    folder = pki / "nats" / "callout"
    if not (folder / "callout.key").exists():
        CA(pki).issue_callout(folder)
    write_atomic(out / CALLOUT_CERT, (folder / "callout.crt").read_bytes())
    copy_secret(folder / "callout.key", out / CALLOUT_KEY)
    if not (out / CALLOUT_SEED).exists():
        write_atomic(out / CALLOUT_SEED, nkeys.encode_seed(secrets.token_bytes(32),
                                                       nkeys.PREFIX_BYTE_ACCOUNT), mode=0o600)
    if not (out / CALLOUT_PASS).exists():
        write_atomic(out / CALLOUT_PASS, secrets.token_urlsafe(24), mode=0o600)
    issuer = nkeys.from_seed((out / CALLOUT_SEED).read_bytes().strip()).public_key.decode()
    conf = render_callout_conf(issuer, (out / CALLOUT_PASS).read_text().strip())
    write_atomic(out / CALLOUT_CONF, conf, mode=0o600)   # it holds the password
    users_doc = callout_users(inv, CA(pki).revoked())
    write_atomic(out / CALLOUT_USERS, json.dumps(users_doc, indent=1) + "\n")
    return True


def render_auth(inv: Inventory) -> str:
    """The ``accounts`` block every node includes: one account with JetStream, our users."""
    lines = ["# ccus-touch NATS authorization, generated by `ccus ops nats-auth`; do not edit.",
             "# Users are certificate identities (verify_and_map). Unlisted: refused.",
             "accounts {", f"  {ACCOUNT}: {{", "    jetstream: enabled", "    users: ["]
    lines += [f"      {json.dumps(u)}" for u in users(inv)]
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


def spki_sha256(cert: x509.Certificate) -> str:
    """What NATS pins: hex SHA-256 of the DER SubjectPublicKeyInfo."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def pinned(pki: str | Path, *, now: dt.datetime | None = None) -> list[str]:
    """Hashes of every client certificate under `pki` that is not revoked and not expired."""
    pki = Path(pki)
    revoked = set(CA(pki).revoked())
    now = now or dt.datetime.now(dt.UTC)
    out = set()
    for path in sorted(pki.rglob("*.crt")):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            continue   # the CA
        eku = x509.oid.ExtendedKeyUsageOID
        if eku.CLIENT_AUTH not in usage or eku.SERVER_AUTH in usage:
            continue   # server and route certificates are no clients
        if cert.serial_number in revoked or cert.not_valid_after_utc <= now:
            continue
        out.add(spki_sha256(cert))
    return sorted(out)


def render_pinned(hashes: list[str]) -> str:
    return ("# certificates a node accepts (not revoked, not expired); generated by "
            "`ccus ops nats-auth`\npinned_certs: " + json.dumps(hashes) + "\n")


def write_bundle(pki: str | Path, out: str | Path, *, names: Iterable[str] = ("127.0.0.1",
                                                                              "localhost")) -> Path:
    """The folder `ccus cluster up --secure` reads: ca.crt, server.crt/.key (the PKI's
    server certificate), route.crt/.key (issued into pki/nats/ once), auth.conf, pinned.conf.

    Run it again after any provisioning or revocation, then `ccus cluster reload` (and
    `ccus cluster restart` for a new or revoked certificate on the MQTT listeners)."""
    pki, out = Path(pki), Path(out)
    server = pki / "server"
    if not (server / "server.key").exists():
        raise PkiError(f"no server certificate in {server}: run `ccus ops server --pki {pki} "
                       "--name 127.0.0.1 --name localhost` first")
    route = pki / "nats"
    if not (route / "route.key").exists():
        CA(pki).issue_route(route, names)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "ca.crt", (pki / "ca.crt").read_bytes())
    for src, stem in ((server, "server"), (route, "route")):
        write_atomic(out / f"{stem}.crt", (src / f"{stem}.crt").read_bytes())
        copy_secret(src / f"{stem}.key", out / f"{stem}.key")
    inv = InventoryFile(pki).inventory()
    write_atomic(out / AUTH_FILE, render_auth(inv))
    write_callout(pki, out, inv)    # before the pins: the callout's certificate is pinned too
    write_atomic(out / PINNED_FILE, render_pinned(pinned(pki)))
    return out

