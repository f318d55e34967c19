"""Security against the real Mosquitto started from the generated cloud config: ACLs per
identity, TLS client certificates (missing, expired, foreign, revoked), signed config end to
end through a real agent, and no secret in any log or state message.

Every key and certificate is made here, at test time, in a temporary folder.
"""

import datetime as dt
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from broker.launcher import PrivateBroker
from broker.procs import poll_until
from edge.agent import Agent
from edge.config import from_dict
from edge.signing import generate_key, load_private_key, write_keypair
from ops import fleet, provision
from ops.acl import render_acl, render_dynsec
from ops.configpush import build, push
from ops.inventory import InventoryFile
from ops.mqttc import BrokerOpts, MqttError, connect, publish, snapshot
from ops.pki import CA
from protocol import topics

SITE, SITE2 = "12345678901234", "22222222222222"
NOT_AUTHORIZED = 135

pytestmark = pytest.mark.e2e


@dataclass
class World:
    root: Path
    pki: Path
    broker: PrivateBroker
    values: dict
    python_log: Path

    def opts(self, cert: Path | None, key: Path | None = None, *, ca: Path | None = None,
             tls: bool = True) -> BrokerOpts:
        if not tls:
            return BrokerOpts(self.broker.host, self.broker.port)
        return BrokerOpts(self.broker.host, self.broker.port, str(ca or self.pki / "ca.crt"),
                          str(cert or ""), str(key or ""))

    def device(self, dev: str, site: str = SITE) -> BrokerOpts:
        d = provision.device_dir(self.pki, site, dev)
        return self.opts(d / "device.crt", d / "device.key")

    def who(self, folder: str, name: str, stem: str) -> BrokerOpts:
        d = self.pki / folder / name
        return self.opts(d / f"{stem}.crt", d / f"{stem}.key")

    @property
    def operator(self) -> BrokerOpts:
        return self.who("operators", "alice", "operator")

    @property
    def auditor(self) -> BrokerOpts:
        """A second operator: one connection per identity (the client id is the CN), so a
        watcher open beside `ccus ops config push` needs its own certificate."""
        return self.who("operators", "bob", "operator")

    @property
    def sink(self) -> BrokerOpts:
        return self.who("sinks", "sink-1", "sink")


def broker_values(pki: Path, server: Path, acl: Path) -> dict:
    dynsec = acl.with_name("dynamic-security.json")
    dynsec.write_text(render_dynsec(InventoryFile(pki).inventory()))
    return {"ca_file": pki / "ca.crt", "cert_file": server / "server.crt",
            "key_file": server / "server.key", "crl_file": pki / "crl.pem", "acl_file": acl,
            "dynsec_file": dynsec}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("security")
    pki = root / "pki"
    ca = CA.init(pki)
    ca.issue_server(pki / "server", ["127.0.0.1", "localhost"])
    provision.add_site(pki, SITE, ["gate-01", "gate-02"])
    provision.add_device(pki, SITE2, "gate-03")
    provision.add_identity(pki, "operator", "alice")
    provision.add_identity(pki, "operator", "bob")
    provision.add_identity(pki, "sink", "sink-1")
    acl = root / "acl"
    acl.write_text(render_acl(InventoryFile(pki).inventory()))
    # everything python logs during these tests, at DEBUG, to scan for secrets at the end
    python_log = root / "python.log"
    handler = logging.FileHandler(python_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    rootlog = logging.getLogger()
    old_level = rootlog.level
    rootlog.addHandler(handler)
    rootlog.setLevel(logging.DEBUG)
    values = broker_values(pki, pki / "server", acl)
    broker = PrivateBroker(root / "broker", template="cloud.conf", values=values).start()
    try:
        yield World(root, pki, broker, values, python_log)
    finally:
        broker.close()
        rootlog.removeHandler(handler)
        rootlog.setLevel(old_level)
        handler.close()


def publish_rc(opts: BrokerOpts, topic: str, payload: bytes = b"x", *,
               retain: bool = False) -> ReasonCode:
    """The PUBACK reason code a QoS 1 publish gets (MQTT 5: an ACL refusal is 135)."""
    c = connect(opts, client_id=f"t-{uuid.uuid4().hex[:8]}", timeout=5)
    got: dict[str, ReasonCode] = {}
    done = threading.Event()
    c.on_publish = lambda _c, _u, _mid, rc, _p: (got.__setitem__("rc", rc), done.set())
    try:
        c.publish(topic, payload, qos=1, retain=retain)
        assert done.wait(5), f"no PUBACK for {topic}"
        return got["rc"]
    finally:
        c.disconnect()
        c.loop_stop()


def op_publish(world: World, topic: str, payload: bytes) -> None:
    """The operator publishes a retained message (PUBACK checked), then disconnects."""
    c = connect(world.operator, f"t-op-{uuid.uuid4().hex[:8]}", timeout=5)
    try:
        publish(c, topic, payload, retain=True)
    finally:
        c.disconnect()
        c.loop_stop()


def read(opts: BrokerOpts, topic_filter: str, wait_s: float = 1.0) -> tuple[list, list[bytes]]:
    """(SUBACK reason codes, payloads received within wait_s) for one subscription."""
    msgs: list[bytes] = []
    codes: list[ReasonCode] = []
    subscribed = threading.Event()
    c = connect(opts, client_id=f"t-{uuid.uuid4().hex[:8]}", timeout=5,
                on_message=lambda m: msgs.append(bytes(m.payload)))
    c.on_subscribe = lambda _c, _u, _mid, rcs, _p: (codes.extend(rcs), subscribed.set())
    try:
        c.subscribe(topic_filter, qos=1)
        assert subscribed.wait(5)
        time.sleep(wait_s)
        return codes, list(msgs)
    finally:
        c.disconnect()
        c.loop_stop()


# -- ACL: what a device certificate may do ------------------------------------------------------
def test_device_publishes_its_own_touches_only(world: World) -> None:
    gate1 = world.device("gate-01")
    assert not publish_rc(gate1, topics.touch(SITE, "gate-01")).is_failure
    assert not publish_rc(gate1, topics.state(SITE, "gate-01"), retain=True).is_failure
    assert not publish_rc(gate1, topics.config_ack(SITE, "gate-01")).is_failure
    assert publish_rc(gate1, topics.touch(SITE, "gate-02")).value == NOT_AUTHORIZED
    assert publish_rc(gate1, topics.touch(SITE2, "gate-01")).value == NOT_AUTHORIZED  # other site
    assert publish_rc(gate1, topics.state(SITE, "gate-02")).value == NOT_AUTHORIZED
    assert publish_rc(gate1, topics.touch_ack(SITE, "gate-01")).value == NOT_AUTHORIZED


@pytest.mark.parametrize("topic", [
    topics.config(SITE, "gate-01"), topics.config(SITE, "_site"), topics.config(SITE, "gate-02"),
    "ccus/v1/list/technicians/snapshot/manifest", "ccus/v1/list/technicians/snapshot/1/0",
])
def test_device_cannot_publish_config_or_lists(world: World, topic: str) -> None:
    assert publish_rc(world.device("gate-01"), topic, retain=True).value == NOT_AUTHORIZED


def test_device_reads_its_config_but_not_anothers(world: World) -> None:
    op_publish(world, topics.config(SITE, "gate-02"), b"for-02")
    op_publish(world, topics.config(SITE, "gate-01"), b"for-01")
    codes, own = read(world.device("gate-01"), topics.config(SITE, "gate-01"), 0.5)
    assert own == [b"for-01"] and not codes[0].is_failure  # the control: reading works at all
    codes, other = read(world.device("gate-01"), topics.config(SITE, "gate-02"), 1.0)
    # Mosquitto 2.0 grants the SUBACK and filters every delivery by the read ACL instead
    assert other == []
    codes, wild = read(world.device("gate-01"), f"ccus/v1/{SITE}/+/config", 1.0)
    assert b"for-02" not in wild


def test_operator_publishes_config_and_lists_sink_reads_touches(world: World) -> None:
    assert not publish_rc(world.operator, topics.config(SITE, "_site"), b"",
                          retain=True).is_failure
    assert not publish_rc(world.operator, "ccus/v1/list/t/snapshot/manifest", b"",
                          retain=True).is_failure
    assert publish_rc(world.operator, topics.touch(SITE, "gate-01")).value == NOT_AUTHORIZED
    assert publish_rc(world.sink, topics.touch(SITE, "gate-01")).value == NOT_AUTHORIZED
    assert publish_rc(world.sink, topics.config(SITE, "gate-01")).value == NOT_AUTHORIZED
    assert not publish_rc(world.sink, topics.touch_ack(SITE, "gate-01")).is_failure

    got: list[bytes] = []
    subscribed = threading.Event()
    sink = connect(world.sink, "sink-1", on_message=lambda m: got.append(bytes(m.payload)))
    sink.on_subscribe = lambda *_: subscribed.set()
    try:
        sink.subscribe(topics.shared("sink", topics.ALL_TOUCHES), qos=1)
        assert subscribed.wait(5)
        assert not publish_rc(world.device("gate-03", SITE2), topics.touch(SITE2, "gate-03"),
                              b"touch-3").is_failure
        deadline = time.monotonic() + 5
        while b"touch-3" not in got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"touch-3" in got
    finally:
        sink.disconnect()
        sink.loop_stop()


# -- TLS: who may connect at all ------------------------------------------------------------------
def test_refused_connections(world: World) -> None:
    root = world.root
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = CA(world.pki).issue_device(root / "expired", SITE, "gate-01", not_before=past,
                                         not_after=past + dt.timedelta(days=1))
    foreign_ca = CA.init(root / "foreign")
    foreign = foreign_ca.issue_device(root / "foreign-dev", SITE, "gate-01")
    connect(world.device("gate-01"), "t-ok", timeout=5).disconnect()  # the control
    cases = {
        "plain MQTT": world.opts(None, tls=False),
        "no certificate": world.opts(None),
        "expired": world.opts(expired.cert, expired.key),
        "foreign CA": world.opts(foreign.cert, foreign.key),
    }
    for what, opts in cases.items():
        with pytest.raises(MqttError):
            c = connect(opts, f"t-{what[:5]}", timeout=5)
            c.disconnect()  # reached only if the broker let it in: the test then fails
            c.loop_stop()


def test_revoked_certificate_refused(world: World, tmp_path: Path) -> None:
    """A lost device: revoked (CRL) and dropped from the inventory; the broker restarts."""
    provision.add_device(world.pki, SITE, "gate-lost")
    acl = tmp_path / "acl"
    acl.write_text(render_acl(InventoryFile(world.pki).inventory()))
    values = {**world.values, "acl_file": acl}
    lost = world.device("gate-lost")
    with PrivateBroker(tmp_path / "b", template="cloud.conf", values=values) as b:
        opts = BrokerOpts(b.host, b.port, lost.ca, lost.cert, lost.key)
        assert not publish_rc(opts, topics.touch(SITE, "gate-lost")).is_failure  # works today
        provision.revoke_device(world.pki, "gate-lost")
        acl.write_text(render_acl(InventoryFile(world.pki).inventory()))
        b.stop()
        b.start()
        with pytest.raises(MqttError):
            connect(opts, "t-lost", timeout=5).disconnect()
        good = world.device("gate-01")
        connect(BrokerOpts(b.host, b.port, good.ca, good.cert, good.key), "t-good",
                timeout=5).disconnect()


def test_acl_removal_takes_effect_on_reload(world: World, tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(render_acl(InventoryFile(world.pki).inventory()))
    with PrivateBroker(tmp_path / "b", template="cloud.conf",
                       values={**world.values, "acl_file": acl}) as b:
        g = world.device("gate-02")
        opts = BrokerOpts(b.host, b.port, g.ca, g.cert, g.key)
        assert not publish_rc(opts, topics.touch(SITE, "gate-02")).is_failure
        inv = InventoryFile(world.pki).inventory()
        inv.devices = [d for d in inv.devices if d[1] != "gate-02"]
        acl.write_text(render_acl(inv))
        b.reload()
        deadline = time.monotonic() + 5
        while publish_rc(opts, topics.touch(SITE, "gate-02")).value != NOT_AUTHORIZED:
            assert time.monotonic() < deadline, "ACL reload did not take gate-02's rights away"
            time.sleep(0.1)


# -- signed config, end to end through a real agent -------------------------------------------------
def live_acks(world: World, dev: str) -> tuple[object, list[dict]]:
    """Subscribe to a device's acks; keep only new ones (not the retained last one)."""
    got: list[dict] = []
    subscribed = threading.Event()

    def on_message(m) -> None:
        if not m.retain:
            got.append(cbor2.loads(m.payload))

    c = connect(world.auditor, f"t-acks-{uuid.uuid4().hex[:6]}", on_message=on_message)
    c.on_subscribe = lambda *_: subscribed.set()
    c.subscribe(topics.config_ack(SITE, dev), qos=1)
    assert subscribed.wait(5)
    return c, got


def test_signed_config_end_to_end(world: World) -> None:
    key_path = world.root / "operator-signing.key"
    write_keypair(key_path)
    key = load_private_key(key_path)
    attacker = generate_key()
    d = provision.device_dir(world.pki, SITE, "gate-01")
    cfg = from_dict({
        "device": {"id": "gate-01", "site": SITE, "data_dir": str(world.root / "agent")},
        "mqtt": {"host": world.broker.host, "port": world.broker.port, "tls": True,
                 "ca_file": str(world.pki / "ca.crt"), "cert_file": str(d / "device.crt"),
                 "key_file": str(d / "device.key")}})
    agent = Agent(cfg, config_keys=[key.public_key()])
    agent.start()
    acks_client, acks = live_acks(world, "gate-01")
    try:
        assert poll_until(lambda: agent.link.connected, 10.0)
        # 1. a signed device config is applied, persisted, acknowledged
        topic, version, payload = build(key, SITE, "gate-01", {"gate": {"anti_passback": True}},
                                        version=100)
        res = push(world.operator, topic, version, payload, site=SITE, dev="gate-01", wait_s=10)
        assert res.acks["gate-01"]["result"] == "applied", res.acks
        assert poll_until(lambda: agent.cfg.version == 100, 10.0)
        saved = (world.root / "agent" / "config" / "device.cbor").read_bytes()
        assert saved == payload and agent.restart_requested.is_set()

        def refused(p: bytes, topic: str = topic) -> dict:
            acks.clear()
            op_publish(world, topic, p)
            assert poll_until(lambda: any(a["result"] == "refused" for a in acks), 10.0), acks
            return next(a for a in acks if a["result"] == "refused")

        # 2. forged (signed by a key the device does not trust), unsigned, replayed (older)
        _, _, forged = build(attacker, SITE, "gate-01", {"gate": {"anti_passback": False}},
                             version=200)
        assert refused(forged)["reason"] == "unknown_key"
        unsigned = cbor2.dumps({"version": 300, "target": {"site": SITE, "dev": "gate-01"},
                                "issued_ms": 1, "body": {}})
        assert refused(unsigned)["reason"] == "unsigned"
        _, _, old = build(key, SITE, "gate-01", {"gate": {"anti_passback": False}}, version=50)
        ack = refused(old)
        assert (ack["reason"], ack["version"], ack["cv"]) == ("replay", 50, 100)
        # a signature made for gate-02's topic does not work on gate-01's
        _, _, moved = build(key, SITE, "gate-02", {}, version=400)
        assert refused(moved)["reason"] == "wrong_target"
        # ...and the previous config is still the one in force
        assert agent.cfg.version == 100 and agent.config.state.device[0] == 100
        assert (world.root / "agent" / "config" / "device.cbor").read_bytes() == saved

        # 3. a site-wide config reaches the device through ccus/v1/{site}/_site/config
        topic, version, payload = build(key, SITE, None, {"idlist": {"max_age_h": 12}},
                                        version=150)
        res = push(world.operator, topic, version, payload, site=SITE, dev=None, wait_s=3)
        assert res.acks.get("gate-01", {}).get("result") == "applied", res.acks
        assert poll_until(lambda: agent.cfg.version == 150, 10.0)

        # 4. the fleet view sees the agent, online, with that config version
        agent.link.publish_state()
        def row():
            rows = fleet.fleet(snapshot(world.operator, f"ccus/v1/{SITE}/+/state"),
                               int(time.time() * 1000))
            return next((r for r in rows if r.dev == "gate-01" and r.cv == 150), None)
        assert poll_until(lambda: row() is not None, 10)
        r = row()
        assert r and r.online and r.backlog == 0
    finally:
        acks_client.disconnect()
        acks_client.loop_stop()
        agent.stop()


def test_ops_cli_against_the_broker(world: World, tmp_path: Path) -> None:
    """`ccus ops devices` and `ccus ops config push` as an operator would type them."""
    import json
    import os
    import subprocess
    import sys

    op = world.pki / "operators" / "alice"
    conn = ["--broker", f"{world.broker.host}:{world.broker.port}", "--ca",
            str(world.pki / "ca.crt"), "--cert", str(op / "operator.crt"), "--key",
            str(op / "operator.key")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def ops(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    out = ops("devices", "--json", *conn)
    rows = json.loads(out.stdout)
    assert {r["dev"] for r in rows} >= {"gate-01"} and out.returncode in (0, 1)
    write_keypair(tmp_path / "k")
    (tmp_path / "o.toml").write_text("[gate]\nanti_passback = true\n")
    out = ops("config", "push", "--site", SITE, "--device", "gate-02", "--file",
              str(tmp_path / "o.toml"), "--signing-key", str(tmp_path / "k"), "--wait", "0.5",
              *conn)
    assert out.returncode == 4, out.stderr  # published; gate-02 runs no agent to answer
    assert json.loads(out.stdout)["published"] is True
    _, got = read(world.operator, topics.config(SITE, "gate-02"), 0.3)
    assert got and got[0].startswith(b"\xa4")  # the signed CBOR envelope, retained
    out = ops("devices", *conn[:2])  # no certificate: a one-line refusal, no traceback
    assert out.returncode == 2 and "Traceback" not in out.stderr


# -- secrets ----------------------------------------------------------------------------------------
def test_no_secret_in_logs_or_state(world: World) -> None:
    """Runs last in this module: scans everything logged while the tests above ran."""
    secrets = []
    for key in world.root.rglob("*.key"):
        pem = key.read_text()
        secrets += [line for line in pem.splitlines() if line and not line.startswith("-----")]
    assert len(secrets) >= 8
    states = snapshot(world.operator, "ccus/v1/+/+/state")
    world.broker.stop()  # flush the broker log
    texts = {
        "python log": world.python_log.read_text(),
        "broker log": world.broker.log_path.read_text(),
        "state messages": "".join(repr(cbor2.loads(p)) for p in states.values() if p),
    }
    assert "config" in texts["python log"] and "connected" in texts["broker log"]
    assert states, "no state message to scan"
    for where, text in texts.items():
        assert "PRIVATE KEY" not in text, where
        assert not [s for s in secrets if s in text], where
    shutil.rmtree(world.root / "agent", ignore_errors=True)
