"""Bad input end to end: garbage on a touch topic is dead-lettered and the good touches after it
are stored; unreadable cards become denial touches with a reason code."""

from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import PrivateBroker
from broker.procs import wait_until
from cloud_sink.ingest import Sink
from cloud_sink.store import SqliteStore
from edge.agent import Agent
from edge.config import from_dict
from edge.idlist import Entry, MemoryIdList, Status
from protocol import topics
from protocol.reasons import Reason
from protocol.timequality import TimeQuality
from protocol.touch import CardTech, Decision, Role, Touch, encode
from sim.cards import EmulatedCard, felica_card
from sim.nfc_card import CardField, free_udp_port

SITE = "13100000000001"


def wait(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    wait_until(cond, timeout, "the condition")


def touch(seq: int, device: str = "gate-01") -> Touch:
    return Touch(device, SITE, Role.GATE, seq, 1_795_000_000_000 + seq, TimeQuality.SYNCED,
                 b"\x01\x02\x03\x04", CardTech.FELICA, "10000000000001", Decision.ALLOW,
                 Reason.OK, 1, 1, {"dir": "in"})


@pytest.mark.e2e
def test_garbage_is_dead_lettered_and_good_touches_behind_it_are_stored(
        broker: PrivateBroker, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    sink = Sink(store, broker.host, broker.port, client_id="sink-bad-input")
    sink.start()
    try:
        assert sink.subscribed.wait(10)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        t = topics.touch(SITE, "gate-01")
        bad = [
            (t, b"\xff\x00garbage"),                                     # not CBOR
            (t, cbor2.dumps({"hello": "world"})),                          # foreign CBOR
            (t, cbor2.dumps({**cbor2.loads(encode(touch(9))), "v": 7})),   # unknown schema
            (topics.touch(SITE, "gate-02"), encode(touch(10))),            # speaks for another device
        ]
        for topic, payload in bad:
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
        for seq in (1, 2, 3):
            pub.publish(t, encode(touch(seq)), qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        wait(lambda: store.counts()["touches"] == 3 and store.counts()["dead_letters"] == 4)
        letters = sorted(store.dead_letters(), key=lambda r: r[0])
        assert [r[3] for r in letters] == ["malformed_cbor", "missing_field", "unknown_schema",
                                           "topic_mismatch"]
        assert [bytes(r[5]) for r in letters] == [p for _, p in bad]  # raw bytes kept
        assert sink.totals.stored == 3 and sink.totals.dead == 4
    finally:
        sink.stop()
        store.close()


@pytest.mark.e2e
def test_unreadable_cards_give_denial_touches(broker: PrivateBroker, tmp_path: Path) -> None:
    port = free_udp_port()
    cfg = from_dict({
        "device": {"id": "gate-07", "site": SITE, "data_dir": str(tmp_path / "agent")},
        "mqtt": {"host": broker.host, "port": broker.port, "tls": False},
        "readers": [{"name": "entry", "path": f"udp:127.0.0.1:{port}", "targets": ["212F"],
                     "profile": "ccus"}],
        "profiles": {"ccus": {"kind": "felica", "service_code": 0x100B}},
    })
    idlist = MemoryIdList([Entry("10000000000001", Status.ACTIVE)])
    made: list[Touch] = []
    agent = Agent(cfg, idlist=idlist, on_touch=made.append)
    field = CardField(port)
    agent.start()
    try:
        cards: list[tuple[EmulatedCard, Decision, Reason]] = [
            (felica_card(bytes(8), tid="10000000000001"), Decision.ALLOW, Reason.OK),
            (felica_card(bytes([1] * 8), tid="10000000000099"), Decision.DENY,
             Reason.UNKNOWN_TECHNICIAN),
            # a card of another system: no such service on it
            (felica_card(bytes([2] * 8), tid="10000000000001", service_code=0x090F),
             Decision.DENY, Reason.WRONG_SERVICE),
            # the service is there, its block is not 14 digits
            (EmulatedCard(CardTech.FELICA, bytes([3] * 8),
                          services={0x100B: (b"NOT-AN-ID-12345\0",)}),
             Decision.DENY, Reason.BAD_CARD_DATA),
        ]
        for i, (card, decision, reason) in enumerate(cards, start=1):
            assert field.tap(card)
            wait(lambda i=i: len(made) >= i)
            assert (made[-1].decision, made[-1].reason) == (decision, reason)
            assert made[-1].card == card.ident
        wait(lambda: agent.link.published == 4)  # all four acknowledged by the broker
        assert agent.link.refused == 0
    finally:
        agent.stop()
        field.close()
