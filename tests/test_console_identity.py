"""The console's own broker identity against a REAL Mosquitto with the project's cloud.conf (TLS,
client certificates, the generated ACL and dynamic-security file): `ccus ops identity --kind
console` issues it; the console's bridge (console.live.Bridge) reads every touch, state,
config push, config ack and list manifest with it; it is refused when it publishes a touch, a
config push, an acknowledgement or a list, and when it tries to join the sinks' shared
subscription. Every key is made here, at test time."""

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from broker.launcher import PrivateBroker
from broker.procs import poll_until
from console.live import Bridge
from ops import provision
from ops.acl import render_acl, render_dynsec
from ops.inventory import InventoryFile
from ops.mqttc import BrokerOpts, PublishError, connect, publish
from ops.pki import CA
from protocol import topics
from protocol.touch import CardTech, Decision, Reason, Role, TimeQuality, Touch, encode

SITE = "12345678901234"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


@dataclass
class World:
    pki: Path
    broker: PrivateBroker

    def opts(self, cert_dir: Path, stem: str) -> BrokerOpts:
        return BrokerOpts("localhost", self.broker.port, str(self.pki / "ca.crt"),
                          str(cert_dir / f"{stem}.crt"), str(cert_dir / f"{stem}.key"))

    @property
    def console(self) -> BrokerOpts:
        return self.opts(self.pki / "consoles" / "console", "console")

    @property
    def operator(self) -> BrokerOpts:
        return self.opts(self.pki / "operators" / "alice", "operator")

    @property
    def sink(self) -> BrokerOpts:
        return self.opts(self.pki / "sinks" / "sink-1", "sink")

    @property
    def device(self) -> BrokerOpts:
        return self.opts(provision.device_dir(self.pki, SITE, "gate-01"), "device")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("console-identity")
    pki = root / "pki"
    ca = CA.init(pki)
    ca.issue_server(pki / "server", ["localhost", "127.0.0.1"])
    provision.add_identity(pki, "operator", "alice")
    provision.add_identity(pki, "sink", "sink-1")
    provision.add_site(pki, SITE, ["gate-01"], broker_names=["localhost"])
    # the documented command (docs/operations.md, docs/console.md)
    r = subprocess.run([sys.executable, "-m", "ccus.cli", "ops", "identity", "--pki", str(pki),
                        "--kind", "console", "--name", "console"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (pki / "consoles" / "console" / "console.key").stat().st_mode & 0o077 == 0
    inv = InventoryFile(pki).inventory()
    assert inv.consoles == ["console"]
    acl, dynsec = root / "acl", root / "dynamic-security.json"
    acl.write_text(render_acl(inv))
    dynsec.write_text(render_dynsec(inv))
    values = {"ca_file": pki / "ca.crt", "cert_file": pki / "server" / "server.crt",
              "key_file": pki / "server" / "server.key", "crl_file": pki / "crl.pem",
              "acl_file": acl, "dynsec_file": dynsec}
    broker = PrivateBroker(root / "broker", template="cloud.conf", values=values).start()
    try:
        yield World(pki, broker)
    finally:
        broker.close()


def a_touch(seq: int, marker: str = "") -> Touch:
    return Touch(device="gate-01", site=SITE, role=Role.GATE, seq=seq, ts_ms=1_790_000_000_000 + seq,
                 tq=TimeQuality.SYNCED, card=bytes.fromhex("012E4CD300000001"),
                 card_tech=CardTech.FELICA, tid="10000000000001", decision=Decision.ALLOW,
                 reason=Reason.OK, list_version=1, config_version=1,
                 facts={"dir": "in", **({"note": marker} if marker else {})})


class Watcher:
    """A plain subscriber (an operator or a sink) that records what reaches it. The cloud
    broker takes the client id from the certificate: one connection per identity."""

    def __init__(self, opts: BrokerOpts, name: str, topic_filter: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.client = connect(opts, name, on_message=lambda m: self.got.append(
            (m.topic, bytes(m.payload))))
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic_filter, qos=1)
        assert done.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def until(cond: Any, what: str, timeout: float = 10) -> None:
    assert poll_until(cond, timeout, poll_s=0.1), f"timed out waiting for {what}"


def test_the_console_identity_reads_what_the_console_shows(world: World) -> None:
    state_t, ack_t = topics.state(SITE, "gate-01"), topics.config_ack(SITE, "gate-01")
    config_t, site_t = topics.config(SITE, "gate-01"), topics.site_config(SITE)
    manifest_t = f"{topics.LIST_ROOT}/technicians/snapshot/manifest"
    dev = connect(world.device, "gate-01")
    op = connect(world.operator, "operator:alice")
    bridge = Bridge()
    try:
        # retained before the console starts: state and ack from the device, config from the
        # operator (a device push and a site push), a list manifest
        publish(dev, state_t, cbor2.dumps({"online": True, "role": "gate"}), retain=True)
        publish(dev, ack_t, cbor2.dumps({"v": 7, "ok": True}), retain=True)
        publish(op, config_t, b"device-push", retain=True)
        publish(op, site_t, b"site-push", retain=True)
        publish(op, manifest_t, cbor2.dumps({"version": 3}), retain=True)
        bridge.start(world.console, "console:console")
        until(lambda: state_t in bridge.snapshot(), "the retained state")
        until(lambda: manifest_t in bridge.manifest_snapshot(), "the list manifest")
        until(lambda: {config_t, site_t} <= set(bridge.config_snapshot()[0])
              and ack_t in bridge.config_snapshot()[1], "the config pushes and ack")
        # a live touch from the device reaches the console's bridge
        publish(dev, topics.touch(SITE, "gate-01"), encode(a_touch(1)))
        until(lambda: bridge.touches_seen == 1, "the touch")
    finally:
        bridge.stop()
        for c, topic in ((dev, state_t), (dev, ack_t), (op, config_t), (op, site_t),
                         (op, manifest_t)):
            publish(c, topic, b"", retain=True)
        for c in (dev, op):
            c.disconnect()
            c.loop_stop()


def test_the_console_identity_publishes_nothing(world: World) -> None:
    touch_t, config_t = topics.touch(SITE, "gate-01"), topics.config(SITE, "gate-01")
    sink = Watcher(world.sink, "sink:sink-1", topics.every(topics.TOUCH))
    op = Watcher(world.operator, "operator:alice", topics.every(topics.CONFIG))
    dev = connect(world.device, "gate-01")
    console = connect(world.console, "console:console")
    try:
        refused = []
        for topic, payload, retain in (
                (touch_t, encode(a_touch(2, "from-console")), False),
                (config_t, b"console-push", True),
                (topics.site_config(SITE), b"console-site-push", True),
                (topics.touch_ack(SITE, "gate-01"), b"console-ack", False),
                (f"{topics.LIST_ROOT}/technicians/snapshot/manifest", b"console-list", True),
                (topics.state(SITE, "gate-01"), b"console-state", True)):
            with pytest.raises(PublishError) as e:
                publish(console, topic, payload, retain=retain)
            refused.append(topic)
            assert "135" in str(e.value) or "authori" in str(e.value).lower(), e.value
        assert len(refused) == 6
        # the right publishers after it: once theirs arrive, the console's would have too
        publish(dev, touch_t, encode(a_touch(3, "from-device")))
        publish(op.client, config_t, b"operator-push", retain=True)
        until(lambda: any(p == encode(a_touch(3, "from-device")) for _, p in sink.got), "the touch")
        until(lambda: any(p == b"operator-push" for _, p in op.got), "the push")
        assert [p for _, p in sink.got] == [encode(a_touch(3, "from-device"))]
        assert b"console-push" not in [p for _, p in op.got]
        assert b"console-site-push" not in [p for _, p in op.got]
        # and it may not join the sinks' shared subscription (dynamic security checks SUBSCRIBE)
        granted: list[Any] = []
        done = threading.Event()
        console.on_subscribe = lambda _c, _u, _m, rcs, _p: (granted.extend(rcs), done.set())
        console.subscribe(f"$share/sink/{topics.every(topics.TOUCH)}", qos=1)
        assert done.wait(10)
        assert granted and granted[0].is_failure, granted
    finally:
        publish(op.client, config_t, b"", retain=True)
        for c in (dev, console):
            c.disconnect()
            c.loop_stop()
        sink.close()
        op.close()
