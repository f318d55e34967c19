"""The site broker's retained keeper (broker/retain_keep.py, the watchdog's keep_retained in
broker/bridge_watchdog.py, `ccus site-watchdog --keep-retained`): the rule as properties, the
keeper on a real Mosquitto, and the fault it mends on a real NATS cluster with a real site
bridge (NATS sends a retained message published while the bridge is connected unretained; the
site broker kept nothing)."""

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from broker.bridge_watchdog import BridgeWatchdog
from broker.launcher import TEMPLATES, PrivateBroker
from broker.nats import NatsCluster
from broker.procs import poll_until
from broker.retain_keep import LIST_FILTER, is_kept, kept_filters, to_republish
from broker.site_bridge import SiteBridge

SITE = "13100000000061"
OTHER = "13100000000062"
level = st.text(st.sampled_from("abc019_-+#$"), min_size=0, max_size=6)


@given(st.lists(level, min_size=1, max_size=7), st.booleans())
def test_only_an_unretained_copy_of_a_list_or_this_sites_config_is_republished(
        parts: list[str], retained: bool) -> None:
    for topic in ("/".join(parts), "ccus/v1/list/" + "/".join(parts),
                  f"ccus/v1/{SITE}/{parts[0]}/config", f"ccus/v1/{OTHER}/{parts[0]}/config"):
        kept = to_republish(topic, retained, SITE)
        assert kept == (not retained and is_kept(topic, SITE))
        if kept:   # a kept topic is one the keeper subscribes to, on this site only
            assert any(mqtt.topic_matches_sub(f, topic) for f in kept_filters(SITE)), topic
            assert not topic.startswith(f"ccus/v1/{OTHER}/")


@pytest.mark.parametrize("topic, kept", [
    ("ccus/v1/list/national/snapshot/manifest", True),
    ("ccus/v1/list/national/snapshot/2/0", True),
    ("ccus/v1/list/national/delta/1-2/1/0", True),
    (f"ccus/v1/{SITE}/gate-01/config", True),
    (f"ccus/v1/{SITE}/_site/config", True),
    (f"ccus/v1/{SITE}/gate-01/config/ack", False),   # device -> cloud
    (f"ccus/v1/{SITE}/gate-01/ack", False),          # the sink's acks: live, a replay gets one
    (f"ccus/v1/{SITE}/gate-01/touch", False),
    (f"ccus/v1/{OTHER}/gate-01/config", False),
    ("ccus/v1/list", False),
])
def test_the_kept_topics(topic: str, kept: bool) -> None:
    assert is_kept(topic, SITE) is kept


def test_every_kept_filter_comes_down_both_site_bridges() -> None:
    for conf in ("site.conf", "site-cluster.conf"):
        ins = re.findall(r"^topic (\S+) in \d$", (TEMPLATES / conf).read_text(), re.M)
        assert {f.replace("{site}", SITE) for f in ins} >= set(kept_filters(SITE)), conf
    assert LIST_FILTER in kept_filters(SITE)


def test_the_bridge_identity_may_watch_and_keep_on_its_own_site_broker_only() -> None:
    from ops.acl import Inventory, render_acl

    inv = Inventory(devices=[(SITE, "gate-01")], bridges=[SITE, OTHER])
    block = render_acl(inv, site=SITE).split(f"user bridge:{SITE}\n")[1].split("\n\n")[0]
    for rule in (f"read $SYS/broker/connection/bridge-{SITE}/state",
                 f"read ccus/v1/{SITE}/+/touch", f"write ccus/v1/{SITE}/+/config",
                 "write ccus/v1/list/#"):
        assert f"topic {rule}" in block, block
    assert "$SYS" not in render_acl(inv)          # the cloud broker's ACL: bridge rules only
    assert f"user bridge:{OTHER}" not in render_acl(inv, site=SITE)


def _retained(port: int, topic_filter: str, wait: float = 1.5) -> dict[str, bytes]:
    """What a new subscriber gets, flagged retained, within `wait`."""
    got: dict[str, bytes] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        if m.retain:
            got[m.topic] = m.payload
    c.on_message = on_message
    c.on_connect = lambda cl, *_: cl.subscribe(topic_filter, 1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(wait)
    c.disconnect()
    c.loop_stop()
    return got


def _publish(port: int, msgs: list[tuple[str, bytes, bool]], protocol: int = mqtt.MQTTv5) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
    c.connect("127.0.0.1", port)
    c.loop_start()
    for topic, payload, retain in msgs:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def _keeper(port: int) -> BridgeWatchdog:
    """The watchdog with its keeper on (no cloud to restart for: it never restarts here)."""
    return BridgeWatchdog("127.0.0.1", port, SITE, [], lambda: None, keep_retained=True).start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    with PrivateBroker(tmp_path / "broker") as b:   # its own: what is retained is this test's
        yield b


@pytest.fixture
def keeper(broker: PrivateBroker) -> Iterator[BridgeWatchdog]:
    k = _keeper(broker.port)
    assert k.subscribed.wait(10)
    yield k
    k.stop()


def test_the_keeper_keeps_unretained_config_and_lists_and_nothing_else(
        broker: PrivateBroker, keeper: BridgeWatchdog) -> None:
    chunk = "ccus/v1/list/kt/snapshot/3/0"
    cfg = f"ccus/v1/{SITE}/gate-01/config"
    _publish(broker.port, [(chunk, b"chunk", False), (cfg, b"cfg", False),
                           (f"ccus/v1/{SITE}/gate-01/ack", b"7", False),
                           (f"ccus/v1/{OTHER}/gate-01/config", b"other", False),
                           ("ccus/v1/list/kt/snapshot/manifest", b"m", True)])
    want = {chunk: b"chunk", cfg: b"cfg", "ccus/v1/list/kt/snapshot/manifest": b"m"}
    # (a subscriber can come between the keeper's PUBLISH and its store: it gets it live)
    assert poll_until(lambda: _retained(broker.port, "ccus/v1/#", 0.5) == want, 5, 0.05)
    assert keeper.kept == 2
    # an empty unretained one (the cloud cleared it) clears it here too
    _publish(broker.port, [(chunk, b"", False)])
    assert poll_until(lambda: chunk not in _retained(broker.port, "ccus/v1/list/#", 0.5), 5, 0.05)
    time.sleep(0.3)
    assert keeper.kept == 3   # its own republishes never came back to it (no-local)


@pytest.mark.e2e
def test_a_list_published_on_nats_while_the_bridge_is_up_is_retained_on_the_site_broker(
        tmp_path: Path) -> None:
    """Without the keeper the site broker holds none of it (what docs/operations.md found);
    with it, a device subscribing afterwards gets chunk and manifest retained."""
    chunk, manifest = "ccus/v1/list/kt/snapshot/2/0", "ccus/v1/list/kt/snapshot/manifest"
    with NatsCluster(tmp_path / "nats") as cluster:
        bridge = SiteBridge(tmp_path / "site", SITE, cluster.mqtt_ports).start()
        try:
            up = threading.Event()
            seen = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            seen.on_message = lambda *_: up.set()
            seen.on_connect = lambda cl, *_: cl.subscribe(LIST_FILTER, 1)
            seen.connect("127.0.0.1", bridge.port)
            seen.loop_start()
            # the bridge carries live messages: one published on a node arrives here
            assert poll_until(lambda: (_publish(cluster.mqtt_ports[1], [(chunk, b"v1", True)],
                                                mqtt.MQTTv311), up.wait(1))[1], 30, 0.1)
            _publish(cluster.mqtt_ports[1], [(chunk, b"c2", True), (manifest, b"m2", True)],
                     mqtt.MQTTv311)
            time.sleep(1.0)
            # the fault, as found: neither is kept (the chunk may be the v1 the bridge got
            # retained when it subscribed: older still)
            stale = _retained(bridge.port, LIST_FILTER)
            assert manifest not in stale and stale.get(chunk) in (None, b"v1"), stale
            keeper = _keeper(bridge.port)
            try:
                assert keeper.subscribed.wait(10)
                _publish(cluster.mqtt_ports[2], [(chunk, b"c3", True), (manifest, b"m3", True)],
                         mqtt.MQTTv311)
                want = {chunk: b"c3", manifest: b"m3"}
                assert poll_until(lambda: _retained(bridge.port, LIST_FILTER, 0.5) == want,
                                  10, 0.05), _retained(bridge.port, LIST_FILTER)
                assert keeper.kept == 2
            finally:
                keeper.stop()
            seen.disconnect()
            seen.loop_stop()
        finally:
            bridge.stop()
