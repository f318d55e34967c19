"""The site broker from the generated site config, bridged over TLS to the cloud broker:
touches flow up, config flows down, and touches queue at the site while the uplink is down."""

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.launcher import PrivateBroker
from broker.procs import poll_until
from ops import provision
from ops.acl import render_acl, render_dynsec
from ops.inventory import InventoryFile
from ops.mqttc import BrokerOpts, MqttError, connect, publish
from ops.pki import CA
from protocol import topics

SITE = "12345678901234"
pytestmark = pytest.mark.e2e


@pytest.fixture
def places(tmp_path: Path) -> Iterator[tuple[Path, PrivateBroker, PrivateBroker]]:
    pki = tmp_path / "pki"
    ca = CA.init(pki)
    ca.issue_server(pki / "server", ["127.0.0.1"])
    provision.add_site(pki, SITE, ["gate-01"], broker_names=["127.0.0.1"])
    provision.add_identity(pki, "operator", "alice")
    provision.add_identity(pki, "sink", "sink-1")
    inv = InventoryFile(pki).inventory()
    (tmp_path / "cloud.acl").write_text(render_acl(inv))
    (tmp_path / "site.acl").write_text(render_acl(inv, site=SITE))
    (tmp_path / "dynsec.json").write_text(render_dynsec(inv))
    common = {"ca_file": pki / "ca.crt", "crl_file": pki / "crl.pem"}
    cloud = PrivateBroker(tmp_path / "cloud", template="cloud.conf", persistence=True, values={
        **common, "cert_file": pki / "server" / "server.crt",
        "key_file": pki / "server" / "server.key", "acl_file": tmp_path / "cloud.acl",
        "dynsec_file": tmp_path / "dynsec.json"}).start()
    site_srv, bridge = pki / "sites" / SITE / "server", pki / "sites" / SITE / "bridge"
    site = PrivateBroker(tmp_path / "site", template="site.conf", values={
        **common, "cert_file": site_srv / "server.crt", "key_file": site_srv / "server.key",
        "acl_file": tmp_path / "site.acl", "site": SITE,
        "cloud_address": f"127.0.0.1:{cloud.port}",
        "bridge_cert": bridge / "bridge.crt", "bridge_key": bridge / "bridge.key"})
    try:
        site.start()
        yield pki, cloud, site
    finally:
        site.close()
        cloud.close()


def sink_session(pki: Path, cloud: PrivateBroker, got: list[bytes]) -> mqtt.Client:
    """A sink with a persistent session: the cloud keeps its subscription across restarts."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sink-1", protocol=mqtt.MQTTv5)
    d = pki / "sinks" / "sink-1"
    c.tls_set(ca_certs=str(pki / "ca.crt"), certfile=str(d / "sink.crt"),
              keyfile=str(d / "sink.key"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    subscribed = threading.Event()
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    c.on_connect = lambda cl, *_: cl.subscribe(topics.ALL_TOUCHES, qos=1)
    c.on_subscribe = lambda *_: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.reconnect_delay_set(0.1, 0.5)
    c.connect("127.0.0.1", cloud.port, clean_start=False, properties=props)
    c.loop_start()
    assert subscribed.wait(10)
    return c


def test_bridge_carries_touches_and_config_and_queues_while_down(places) -> None:
    pki, cloud, site = places
    d = provision.device_dir(pki, SITE, "gate-01")
    device = BrokerOpts("127.0.0.1", site.port, str(pki / "ca.crt"), str(d / "device.crt"),
                        str(d / "device.key"))
    got: list[bytes] = []
    sink = sink_session(pki, cloud, got)
    configs: list[bytes] = []
    dev = connect(device, "gate-01", on_message=lambda m: configs.append(bytes(m.payload)))
    try:
        dev.subscribe(topics.config(SITE, "gate-01"), qos=1)
        # up: the bridge connects with its own certificate and forwards the device's touches
        n = 0

        def delivered() -> bool:
            nonlocal n
            n += 1
            publish(dev, topics.touch(SITE, "gate-01"), f"probe-{n}".encode())
            time.sleep(0.2)
            return any(p.startswith(b"probe-") for p in got)
        assert poll_until(delivered, 15.0), "bridge never delivered a touch to the cloud"

        # down: config pushed in the cloud comes down through the bridge
        op = pki / "operators" / "alice"
        opc = connect(BrokerOpts("127.0.0.1", cloud.port, str(pki / "ca.crt"),
                                 str(op / "operator.crt"), str(op / "operator.key")), "op")
        publish(opc, topics.config(SITE, "gate-01"), b"signed-config", retain=True)
        opc.disconnect()
        opc.loop_stop()
        assert poll_until(lambda: b"signed-config" in configs, 15.0)

        # the uplink goes away: the site broker still acknowledges and keeps the touches
        cloud.stop()
        for i in range(5):
            publish(dev, topics.touch(SITE, "gate-01"), f"queued-{i}".encode())
        assert not any(p.startswith(b"queued-") for p in got)
        cloud.start()
        want = {f"queued-{i}".encode() for i in range(5)}
        assert poll_until(lambda: want <= set(got), 45), "queued touches did not arrive"
    finally:
        dev.disconnect()
        dev.loop_stop()
        sink.disconnect()
        sink.loop_stop()


def test_site_broker_enforces_the_site_acl(places) -> None:
    pki, cloud, site = places
    d = provision.device_dir(pki, SITE, "gate-01")
    device = connect(BrokerOpts("127.0.0.1", site.port, str(pki / "ca.crt"),
                                str(d / "device.crt"), str(d / "device.key")), "gate-01")
    try:
        with pytest.raises(MqttError, match="Not authorized"):
            publish(device, topics.touch(SITE, "gate-02"), b"x")
        with pytest.raises(MqttError, match="Not authorized"):
            publish(device, topics.config(SITE, "gate-01"), b"x", retain=True)
    finally:
        device.disconnect()
        device.loop_stop()
