"""Who may connect to the secure NATS tier, and with which MQTT client id: the auth callout's
decision (broker/nats_callout.py runs it). Pure: no sockets, no clock, no keys.

Rules of this file:

- The identity is the client certificate NATS verified (the request's first verified chain,
  its leaf): a device is its SAN URI ``urn:ccus:{site}:{dev}``, every other identity its
  subject ``CN={kind}:{name},OU={kind}`` (the user names of ops/nats_auth.py, which writes the
  users file this reads). No verified certificate, or one naming no user: refused.
- The MQTT client id is bound to the identity, as the Mosquitto tier's
  ``use_username_as_clientid`` binds it to the CN: a user's ``mqtt_id`` rule says ``is`` (a
  device: its device id; a bridge: ``bridge-{site}``) or ``prefix`` (an operator's tools:
  ``ccus-ops-...``, one fresh id per command). A user without a rule may not use MQTT at all
  (sinks: native only). A native connection has no client id to check.
- The connection type (the request's ``client_info.type``) must be one of the user's allowed
  connection types, checked here: NATS 2.15 did not enforce the user JWT's
  ``allowed_connection_types`` for a callout user (a device certificate logged in natively).
- A certificate whose serial the users file lists as revoked (the PKI's revoked.txt) is
  refused at login: with `ccus cluster reload` (every callout client logs in again) a revoked
  certificate is out on the MQTT listener too, without the restart its start-time pins need.
- Granted: the user's publish and subscribe allow lists (nothing to publish: a deny of
  everything, since NATS reads an empty allow list as no restriction) and connection types, unlimited
  subscriptions, data and payload (the node's own limits apply), in the account the users
  file names. Everything else is denied by NATS.
"""

from cryptography import x509
from cryptography.x509.oid import NameOID

DEVICE_URI = "urn:ccus:"
# client_info.type of an authorization request -> NATS's connection type names
CONNECTION_TYPES = {"nats": "STANDARD", "mqtt": "MQTT", "websocket": "WEBSOCKET",
                    "leafnode": "LEAFNODE"}
NOT_USERS = ("urn:ccus:route", "urn:ccus:callout")   # the cluster's own certificates


class CalloutRefused(Exception):
    """One line: why this connection is refused (logged, and told to NATS)."""


def identity(leaf_pem: str, revoked: frozenset[int] = frozenset()) -> str:
    """The NATS user a client certificate maps to (ops/nats_auth.py's user names)."""
    cert = x509.load_pem_x509_certificate(leaf_pem.encode())
    if cert.serial_number in revoked:
        raise CalloutRefused(f"certificate {cert.serial_number:x} is revoked")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        if uri in NOT_USERS:
            raise CalloutRefused(f"{uri} is the cluster's own certificate, not a user")
        if uri.startswith(DEVICE_URI):
            return uri
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not cn or not ou:
        raise CalloutRefused("the certificate has no device URI and no CN/OU")
    return f"CN={_text(cn[0].value)},OU={_text(ou[0].value)}"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def client_id_ok(rule: dict[str, str] | None, client_id: str) -> bool:
    if not rule:
        return False
    if "is" in rule:
        return client_id == rule["is"]
    prefix = rule.get("prefix", "")
    return bool(prefix) and client_id.startswith(prefix) and len(client_id) > len(prefix)


def decide(request: dict, users: dict) -> tuple[str, dict]:  # type: ignore[type-arg]
    """(user, the ``nats`` part of its user claims) for a decoded authorization request; raises
    CalloutRefused. `users`: the users file (``{"account": .., "users": {name: entry}}``)."""
    req = request.get("nats") or {}
    chains = (req.get("client_tls") or {}).get("verified_chains") or []
    if not chains or not chains[0]:
        raise CalloutRefused("no verified client certificate")
    revoked = frozenset(int(x, 16) for x in users.get("revoked", []))
    user = identity(chains[0][0], revoked)
    entry = users.get("users", {}).get(user)
    if entry is None:
        raise CalloutRefused(f"{user}: no such user (not in the inventory, or removed; "
                             "ccus ops nats-auth writes the users file)")
    info = req.get("client_info") or {}
    kind = CONNECTION_TYPES.get(info.get("type", ""), "")
    if kind not in entry["types"]:
        raise CalloutRefused(f"{user} may not connect by {info.get('type') or '?'} (only "
                             f"{', '.join(entry['types'])})")
    if kind == "MQTT":
        cid = info.get("mqtt_id", "")
        if not client_id_ok(entry.get("mqtt_id"), cid):
            raise CalloutRefused(f"{user} asked for MQTT client id {cid!r}, which is not its "
                                 f"own ({entry.get('mqtt_id') or 'no MQTT'})")
    # an empty allow list is no restriction in NATS: a user with nothing to publish gets a deny
    pub = {"allow": entry["pub"]} if entry["pub"] else {"deny": [">"]}
    return user, {"pub": pub, "sub": {"allow": entry["sub"]},
                  "allowed_connection_types": entry["types"], "subs": -1, "data": -1,
                  "payload": -1, "type": "user", "version": 2}
