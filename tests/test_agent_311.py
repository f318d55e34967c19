"""The agent's MQTT 3.1.1 mode and its broker list (edge/link.py, [mqtt] protocol, brokers,
subscribe_qos): the keys are checked; the real `ccus agent` process speaking 3.1.1 to a real
Mosquitto and to the NATS cluster (JetStream sink) stores every tap once; the link fails over
to the next broker when its broker dies; kill -9 of the NATS node the agent is on, under load,
loses and doubles nothing."""

import re
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from agent_proc import TappingAgent, all_stored_once, stored_seqs
from hypothesis import given
from hypothesis import strategies as st

from broker.launcher import PrivateBroker
from broker.nats import NatsCluster
from broker.procs import poll_until
from cloud_sink.ingest import Sink
from cloud_sink.ingest.jetstream import JetStreamSink
from cloud_sink.store import SqliteStore, open_store
from edge.config import ConfigError, MqttConfig, from_dict, parse_broker
from edge.link import Link
from edge.outbox import Outbox
from protocol import topics

SITE = "13100000000031"


# -- the keys ---------------------------------------------------------------------------------
hosts = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
                  st.ip_addresses(v=6).map(lambda a: f"[{a}]"))


@given(hosts, st.integers(1, 65535))
def test_a_broker_address_round_trips(host: str, port: int) -> None:
    assert parse_broker(f"{host}:{port}", "k") == (host.strip("[]"), port)


@pytest.mark.parametrize("mqtt, key", [
    ({"protocol": "3"}, "mqtt.protocol"),
    ({"protocol": 5}, "mqtt.protocol"),                         # a string, not a number
    ({"brokers": ["nats-1:4222", "nats-2"]}, r"mqtt.brokers\[1\]"),
    ({"brokers": ["nats-1:0"]}, r"mqtt.brokers\[0\]"),
    ({"subscribe_qos": 2}, "mqtt.subscribe_qos"),
])
def test_bad_mqtt_keys_are_named(mqtt: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.", 1)):
        from_dict({"device": {"id": "gate-1", "site": SITE}, "mqtt": mqtt})


def test_brokers_replace_host_and_port() -> None:
    cfg = from_dict({"device": {"id": "gate-1", "site": SITE},
                     "mqtt": {"protocol": "3.1.1", "brokers": ["a:1", "[::1]:2"]}}).mqtt
    assert cfg.endpoints() == [("a", 1), ("::1", 2)]
    assert from_dict({"device": {"id": "gate-1", "site": SITE}}).mqtt.endpoints() == \
        [("127.0.0.1", 8883)]


# -- a real Mosquitto, 3.1.1 on the wire --------------------------------------------------------
def _protocol_of(broker: PrivateBroker, client_id: str) -> str:
    """Mosquitto's connection line says the protocol: p2 is 3.1.1, p5 is 5.0."""
    found = re.findall(rf"as {re.escape(client_id)} \((p\d)", broker.log_path.read_text())
    return found[-1] if found else ""


@pytest.mark.e2e
def test_agent_process_in_311_mode_through_mosquitto(broker: PrivateBroker, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    sink = Sink(store, broker.host, broker.port, client_id="sink-311")
    sink.start()
    # the first broker of the list is a closed port: the agent moves on to the next one
    dead = f"127.0.0.1:{_closed_port()}"
    agent = TappingAgent(tmp_path, "gate-311", SITE, protocol="3.1.1",
                         brokers=[dead, f"127.0.0.1:{broker.port}"])
    try:
        assert sink.subscribed.wait(10)
        agent.start()
        for _ in range(12):
            assert agent.tap()
        assert poll_until(lambda: agent.made() == 12 and agent.backlog() == 0, 20, 0.1), \
            agent.log_text()[-2000:]
        assert stored_seqs(tmp_path / "store.sqlite") == {"gate-311": list(range(1, 13))}
        assert _protocol_of(broker, "gate-311") == "p2"     # 3.1.1 on the wire
        assert agent.broker_port() == broker.port
        # the state message says which broker of the list the device is on
        assert poll_until(lambda: (_state(broker, "gate-311").get("link") or {}).get("broker")
                          == f"127.0.0.1:{broker.port}", 15, 0.5)
    finally:
        rc = agent.stop()
        sink.stop()
        store.close()
    assert rc == 0, agent.log_text()[-2000:]
    assert "Traceback" not in agent.log_text()


def _state(broker: PrivateBroker, dev: str) -> dict:  # type: ignore[type-arg]
    """The device's retained state message (empty if none yet)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = lambda _c, _u, m: got.append(m.payload)
    c.connect(broker.host, broker.port)
    c.subscribe(topics.state(SITE, dev), qos=1)
    c.loop_start()
    poll_until(lambda: got, 3, 0.05)
    c.loop_stop()
    c.disconnect()
    return cbor2.loads(got[-1]) if got else {}  # type: ignore[no-any-return]


def _closed_port() -> int:
    from broker.launcher import free_port

    return free_port()  # bound and released: nobody listens there


@pytest.mark.e2e
def test_agent_fails_over_to_the_next_broker_when_its_broker_dies(tmp_path: Path) -> None:
    """Two Mosquittos, one agent with both in `brokers`: kill -9 the one it is on, it goes to
    the other (a sink on each: both write the same store); every tap stored once."""
    a = PrivateBroker(tmp_path / "a").start()
    b = PrivateBroker(tmp_path / "b").start()
    store_path = tmp_path / "store.sqlite"
    stores = [SqliteStore(store_path), SqliteStore(store_path)]
    sinks = [Sink(stores[0], a.host, a.port, client_id="sink-a"),
             Sink(stores[1], b.host, b.port, client_id="sink-b")]
    for s in sinks:
        s.start()
    agent = TappingAgent(tmp_path, "gate-fo", SITE, protocol="3.1.1",
                         brokers=[f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
    try:
        assert all(s.subscribed.wait(10) for s in sinks)
        agent.start()
        for _ in range(5):
            assert agent.tap()
        assert poll_until(lambda: agent.backlog() == 0 and agent.made() == 5, 20, 0.1)
        first = agent.broker_port()
        victim, other = (a, b) if first == a.port else (b, a)
        victim.kill()
        for _ in range(5):
            assert agent.tap()
        assert poll_until(lambda: agent.broker_port() == other.port, 20, 0.1), \
            agent.log_text()[-2000:]
        assert poll_until(lambda: agent.backlog() == 0 and agent.made() == 10, 30, 0.1), \
            agent.log_text()[-2000:]
        assert stored_seqs(store_path) == {"gate-fo": list(range(1, 11))}
        assert "lost" in agent.log_text() and f"at 127.0.0.1:{other.port}" in agent.log_text()
    finally:
        agent.stop()
        for s in sinks:
            s.stop()
        for st_ in stores:
            st_.close()
        a.close()
        b.close()


# -- the NATS cluster: 3.1.1 is all its MQTT gateway speaks ----------------------------------
@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats") as c:
        yield c


def _nats_agent(tmp: Path, dev: str, c: NatsCluster) -> TappingAgent:
    # subscribe_qos 0: on NATS a QoS 1 subscription is a replicated JetStream consumer per
    # device, and the sink's acks come as QoS 0 whatever was asked (docs/delivery.md)
    return TappingAgent(tmp, dev, SITE, protocol="3.1.1", subscribe_qos=0,
                        brokers=[f"127.0.0.1:{p}" for p in c.mqtt_ports])


@pytest.mark.e2e
def test_agent_processes_in_311_mode_through_the_nats_cluster(cluster: NatsCluster,
                                                              tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    store = open_store(db)
    sink = JetStreamSink(store, cluster.urls)
    sink.start()
    agents = [_nats_agent(tmp_path, f"gate-n{i}", cluster) for i in range(3)]
    try:
        assert sink.subscribed.wait(20), sink.error
        for a in agents:
            a.start()
        for a in agents:
            a.tap_in_background(until=20)
        for a in agents:
            a.wait_tapping()
        assert poll_until(lambda: all(a.backlog() == 0 for a in agents), 30, 0.2), \
            [(a.dev, a.made(), a.backlog()) for a in agents]
        all_stored_once(agents, db)
        assert sum(a.made() for a in agents) == 60 == sink.totals.stored
        # the agents spread over the nodes (the first broker tried comes from the device id)
        assert len({a.broker_port() for a in agents}) > 1
    finally:
        for a in agents:
            a.stop()
        sink.stop()
        store.close()
    assert not any("Traceback" in a.log_text() for a in agents)


@pytest.mark.e2e
def test_kill_9_of_the_node_an_agent_is_on_under_load_loses_and_doubles_nothing(
        cluster: NatsCluster, tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    store = open_store(db)
    sink = JetStreamSink(store, cluster.urls)
    sink.start()
    agents = [_nats_agent(tmp_path, f"gate-k{i}", cluster) for i in range(4)]
    try:
        assert sink.subscribed.wait(20), sink.error
        for a in agents:
            a.start()
        assert poll_until(lambda: all(a.broker_port() for a in agents), 30, 0.1)
        for a in agents:
            a.tap_in_background(until=10_000)
        time.sleep(3)                                         # taps flowing
        port = agents[0].broker_port()
        victim = next(n.name for n in cluster.nodes if n.mqtt_port == port)
        on_victim = [a.dev for a in agents if a.broker_port() == port]
        before = sum(a.taps for a in agents)
        killed_at = time.monotonic()
        cluster.kill(victim)
        time.sleep(6)                                         # tapping on, into the outboxes
        for a in agents:
            a.stop_tapping()
        during = sum(a.taps for a in agents) - before
        drained = poll_until(lambda: all(a.backlog() == 0 for a in agents), 60, 0.2)
        drain_s = time.monotonic() - killed_at
        moved = agents[0].broker_port()
        print(f"\nkill -9 of {victim} (agents {on_victim} on it): {before} taps before, "
              f"{during} in the 6 s after; agent 0 moved to port {moved}; reconnected after "
              f"{[a.downtimes() for a in agents]} s down; all acknowledged {drain_s:.1f} s "
              f"after the kill (taps stopped at 6 s); sink {sink.totals}")
        assert drained, [(a.dev, a.made(), a.backlog(), a.broker_port()) for a in agents]
        assert moved != port
        all_stored_once(agents, db)
        assert sink.totals.stored == sum(a.made() for a in agents)   # each stored once
    finally:
        for a in agents:
            a.stop()
        sink.stop()
        store.close()


ACL_CONF = """\
per_listener_settings false
listener {port} 127.0.0.1
allow_anonymous true
user {user}
acl_file {data_dir}/acl
persistence false
log_dest file {log_file}
connection_messages true
"""


def test_a_refused_touch_in_311_is_kept_and_replayed_with_backoff_not_a_spin(
        tmp_path: Path) -> None:
    """3.1.1 has no reason codes: Mosquitto PUBACKs a touch its ACL drops. The link must not
    take the PUBACK for delivery: the touches stay in the outbox, and come again only when the
    end-to-end acknowledgement times out (doubling), not in a loop."""
    (tmp_path / "acl.conf").write_text(ACL_CONF)
    data = tmp_path / "broker"
    data.mkdir()
    dev = "gate-acl"
    (data / "acl").write_text(f"topic read {topics.touch_ack(SITE, dev)}\n"
                              f"topic write {topics.state(SITE, dev)}\n")
    with PrivateBroker(data, template=str(tmp_path / "acl.conf")) as b:
        ob = Outbox(tmp_path / "outbox.sqlite", reserve_bytes=0)
        cfg = MqttConfig(host="127.0.0.1", port=b.port, tls=False, protocol="3.1.1",
                         state_interval_s=60)
        link = Link(cfg, SITE, dev, ob, lambda: {"v": 1, "online": True}, backoff_min_s=0.1,
                    backoff_max_s=0.5, e2e_timeout_s=0.5)
        link.start()
        try:
            for _ in range(3):
                ob.append(lambda s: cbor2.dumps({"seq": s}), created_ms=0)
            link.notify()
            assert poll_until(lambda: link.published >= 3, 10)
            time.sleep(3.0)        # timeouts 0.5, 1, 2 s: a few replays in 3 s, not thousands
            assert 1 <= link.replays <= 4, link.replays
            assert link.published <= 3 * (link.replays + 1)
            assert ob.depth() == 3 and link.refused == 0     # nothing forgotten, nothing to count
            assert _protocol_of(b, dev) == "p2"
        finally:
            link.stop()
            ob.close()


def test_the_documented_cluster_example_is_what_the_code_reads() -> None:
    import tomllib

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    block = text.split("```toml\n# agent.toml\n[mqtt]\n", 1)[1].split("```", 1)[0]
    cfg = from_dict({"device": {"id": "gate-1", "site": SITE},
                     **tomllib.loads("[mqtt]\n" + block)}).mqtt
    assert (cfg.protocol, cfg.subscribe_qos, len(cfg.endpoints())) == ("3.1.1", 0, 3)
