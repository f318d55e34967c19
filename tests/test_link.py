"""End-to-end acknowledgement and the link: the pure gap tracker (hypothesis), the ack codec,
and the real thing against a private Mosquitto: PUBACK deletes nothing, the sink's ack does;
an ACL refusal is a counted reason code, not a spin; a slow subscriber with more than 1,000
queued QoS 1 messages loses nothing through the project's broker config."""

import contextlib
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.launcher import TEMPLATES, Limits, PrivateBroker
from broker.procs import poll_until
from cloud_sink.acks import SeqTracker
from edge.config import MqttConfig
from edge.link import Link
from edge.outbox import Outbox
from protocol import topics
from protocol.ack import AckError, decode_ack, encode_ack

SITE, DEV = "13100000000001", "gate-l1"


# -- the pure parts -----------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=200), st.randoms(use_true_random=False))
def test_tracker_prefix_and_gaps_any_order_with_repeats(seqs: list[int], rnd: random.Random) -> None:
    order = seqs + rnd.sample(seqs, len(seqs) // 3)  # repeats
    rnd.shuffle(order)
    t = SeqTracker()
    seen: set[int] = set()
    for s in order:
        assert t.add(s) == (s not in seen)
        seen.add(s)
        expect = 0
        while expect + 1 in seen:
            expect += 1
        assert t.upto == expect  # the contiguous prefix, never more, never less
    missing = sorted(set(range(1, max(seen, default=0) + 1)) - seen)
    flat = [s for a, b in t.gaps() for s in range(a, b + 1)]
    assert flat == missing
    assert all(a <= b for a, b in t.gaps())
    # reloading from the store (upto + what lies above) gives the same state
    r = SeqTracker(t.upto, seen)
    assert (r.upto, r.gaps()) == (t.upto, t.gaps())


@given(st.integers(0, 2**63 - 1))
def test_ack_codec_round_trip(upto: int) -> None:
    assert decode_ack(encode_ack(upto)) == upto


@given(st.binary(max_size=80))
def test_ack_decode_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(AckError):
        decode_ack(data)


@pytest.mark.parametrize("bad", [cbor2.dumps({"v": 1, "upto": -1}), cbor2.dumps({"v": 2, "upto": 1}),
                                 cbor2.dumps({"v": 1, "upto": True}), cbor2.dumps([1, 2]), b"\xff"])
def test_ack_decode_refuses(bad: bytes) -> None:
    with pytest.raises(AckError):
        decode_ack(bad)


# -- against a real broker ------------------------------------------------------------------
def _client(cid: str, port: int, *, session: bool = False) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if session else 0
    c.connect("127.0.0.1", port, clean_start=not session, properties=props)
    return c


def _link(tmp: Path, port: int, **kw: Any) -> tuple[Link, Outbox]:
    ob = Outbox(tmp / "outbox.sqlite", reserve_bytes=0)
    cfg = MqttConfig(host="127.0.0.1", port=port, tls=False, inflight=20, state_interval_s=60)
    link = Link(cfg, SITE, DEV, ob, lambda: {"v": 1, "dev": DEV, "online": True,
                                               "backlog": ob.depth(), "link": {}},
                backoff_min_s=0.1, backoff_max_s=0.5, **kw)
    return link, ob


def test_puback_frees_the_window_only_the_sinks_ack_forgets(broker: PrivateBroker,
                                                            tmp_path: Path) -> None:
    link, ob = _link(tmp_path, broker.port, e2e_timeout_s=60)
    got: list[int] = []
    sub = _client("watcher-1", broker.port)
    sub.on_message = lambda c, u, m: got.append(cbor2.loads(m.payload)["seq"])
    sub.subscribe(topics.touch(SITE, DEV), qos=1)
    sub.loop_start()
    link.start()
    try:
        for _ in range(30):
            ob.append(lambda s: cbor2.dumps({"seq": s}), created_ms=0)
            link.notify()
        assert poll_until(lambda: link.published == 30, 10.0)
        assert sorted(set(got)) == list(range(1, 31))
        time.sleep(0.3)
        assert ob.depth() == 30  # PUBACKed, but nobody has said it is stored
        # the sink says: everything up to 17 is committed
        sub.publish(topics.touch_ack(SITE, DEV), encode_ack(17), qos=1, retain=True)
        assert poll_until(lambda: ob.depth() == 13, 10.0)
        assert [s for s, _ in ob.pending(0, 100)] == list(range(18, 31))
        assert link.acked_upto == 17
        # an ack beyond what this device ever made is refused loudly and deletes nothing more
        sub.publish(topics.touch_ack(SITE, DEV), encode_ack(500), qos=1, retain=True)
        # (ack_ahead is set as the ack is read, the rows are deleted right after: wait for both)
        assert poll_until(lambda: link.ack_ahead == 500 and ob.depth() == 0, 10.0)
        assert link.acked_upto == 30
    finally:
        link.stop()
        sub.publish(topics.touch_ack(SITE, DEV), b"", qos=1, retain=True).wait_for_publish(2)
        sub.loop_stop()
        sub.disconnect()
        ob.close()


def test_replay_after_e2e_timeout_without_a_reconnect(broker: PrivateBroker, tmp_path: Path) -> None:
    link, ob = _link(tmp_path, broker.port, e2e_timeout_s=0.5)
    got: list[int] = []
    sub = _client("watcher-2", broker.port)
    sub.on_message = lambda c, u, m: got.append(cbor2.loads(m.payload)["seq"])
    sub.subscribe(topics.touch(SITE, DEV), qos=1)
    sub.loop_start()
    link.start()
    try:
        for _ in range(5):
            ob.append(lambda s: cbor2.dumps({"seq": s}), created_ms=0)
        link.notify()
        # nobody acknowledges end to end: the link sends the same touches again, in order
        assert poll_until(lambda: got.count(1) >= 2 and len(got) >= 10, 8)
        assert link.replays >= 1
        assert got[:5] == [1, 2, 3, 4, 5] and got[5:10] == [1, 2, 3, 4, 5]
    finally:
        link.stop()
        sub.loop_stop()
        sub.disconnect()
        ob.close()


ACL_CONF = """\
per_listener_settings false
listener {port} 127.0.0.1
allow_anonymous true
user {user}
acl_file {data_dir}/acl
persistence {persistence}
persistence_location {data_dir}/
log_dest file {log_file}
"""


def test_acl_refusal_is_counted_reported_and_not_a_spin(tmp_path: Path) -> None:
    tpl = tmp_path / "acl.conf"
    tpl.write_text(ACL_CONF)
    data = tmp_path / "broker"
    data.mkdir()
    # the device may read its ack topic and publish its state, but not its touches
    (data / "acl").write_text(f"topic read {topics.touch_ack(SITE, DEV)}\n"
                              f"topic write {topics.state(SITE, DEV)}\n")
    with PrivateBroker(data, template=str(tpl)) as b:
        link, ob = _link(tmp_path, b.port, refusal_holdoff_s=1.0)
        states: list[dict[str, Any]] = []
        link._state = lambda: {"v": 1, "online": True, "backlog": ob.depth(),  # type: ignore[method-assign]
                               "link": link.stats()}
        link.start()
        try:
            for _ in range(3):
                ob.append(lambda s: cbor2.dumps({"seq": s}), created_ms=0)
            link.notify()
            assert poll_until(lambda: link.refused >= 1, 10.0)
            assert "135" in link.last_refusal or "authori" in link.last_refusal.lower()
            time.sleep(2.0)
            # hold-off: a handful of attempts in 2 s, not thousands; the touches are kept
            assert link.refused < 20
            assert ob.depth() == 3 and link.published == 0
            states.append(link.stats())
            assert states[0]["refused"] == link.refused
        finally:
            link.stop()
            ob.close()


def test_shipped_broker_configs_size_their_queues() -> None:
    mosquitto = [c for c in sorted(TEMPLATES.glob("*.conf")) if not c.name.startswith("nats-")]
    assert {c.name for c in mosquitto} >= {"dev.conf", "site.conf", "cloud.conf"}
    for conf in mosquitto:  # the NATS node template sizes JetStream, not Mosquitto queues
        # cloud and site templates take their limits from broker.launcher.Limits' defaults
        text = conf.read_text().replace("{limits}", Limits().render())
        m = re.search(r"^max_queued_messages\s+(\d+)", text, re.M)
        assert m and int(m.group(1)) > 1000, f"{conf.name}: max_queued_messages not sized"
        assert re.search(r"^max_queued_bytes\s+\d+", text, re.M), f"{conf.name}: no byte bound"


def _slow_subscriber_loss(broker: PrivateBroker, n: int) -> int:
    """A subscriber that acknowledges slowly (receive maximum 10, 1 ms a message) while n QoS 1
    messages are published at full speed. Returns how many it never got."""
    got: set[int] = set()
    lock = threading.Lock()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="slow-sub", protocol=mqtt.MQTTv5,
                      manual_ack=True)
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 10
    props.SessionExpiryInterval = 600

    def on_message(c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        time.sleep(0.001)
        with lock:
            got.add(int(m.payload))
        c.ack(m.mid, m.qos)

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port, clean_start=True, properties=props)
    sub.subscribe("slow/t", qos=1)
    sub.loop_start()
    time.sleep(0.3)
    pub = _client("fast-pub", broker.port)
    pub.loop_start()
    infos = [pub.publish("slow/t", str(i).encode(), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(30)
    assert all(i.rc == 0 for i in infos)  # the broker took every one (PUBACK)
    last = -1
    # until all arrived, or nothing more arrives for 3 s (a loaded machine stalls for a second)
    while last != len(got) and len(got) < n:
        last = len(got)
        time.sleep(3.0)
    sub.loop_stop()
    pub.loop_stop()
    sub.disconnect()
    pub.disconnect()
    return n - len(got)


def test_slow_subscriber_loses_nothing_with_the_project_config(broker: PrivateBroker) -> None:
    assert _slow_subscriber_loss(broker, 5000) == 0


def test_slow_subscriber_loses_messages_with_mosquittos_default_queue(tmp_path: Path) -> None:
    """The control: the same test through dev.conf with the queue left at the default."""
    text = (TEMPLATES / "dev.conf").read_text()
    text = re.sub(r"^max_queued_(messages|bytes).*$", "", text, flags=re.M)
    tpl = tmp_path / "default-queue.conf"
    tpl.write_text(text)
    with PrivateBroker(tmp_path / "b", template=str(tpl)) as b:
        assert _slow_subscriber_loss(b, 5000) > 0
