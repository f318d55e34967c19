"""The gate loop against the real firmware (MicroPython unix port, pty): the agent's gate role
pulses the relay, the door sensor confirms the passage, alarms and the emergency release are
reported, and a dead board never loses a tap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import PrivateBroker
from broker.procs import wait_until
from edge.agent import Agent
from edge.config import from_dict
from edge.decision import CardRead
from edge.idlist import Entry, MemoryIdList, Status
from ops.acl import device_rules
from protocol import topics
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision, Touch, decode
from sim.board import DOOR, EMERGENCY, GATE, GATE_OUT, BoardProcess

pytestmark = pytest.mark.e2e

CARD = b"\x01\x2e\x4c\xd3\x00\x00\x00\x01"
CARD2 = b"\x01\x2e\x4c\xd3\x00\x00\x00\x02"
STRANGER = b"\x01\x39\xab\x00\x00\xc0\xff\xee"
GREEN, RED, BUZZER = 9, 10, 11


def door_link(out: int = GATE, hold_ms: int = 300) -> dict[str, Any]:
    """A person who pushes through 150 ms after the relay clicks: the door opens, then shuts."""
    return {"out": out, "in": DOOR, "delay_ms": 150, "hold_ms": hold_ms, "level": 0}


class Rig:
    def __init__(self, tmp: Path, links: list[dict[str, Any]], mqtt: dict[str, Any] | None = None,
                 **gate: Any) -> None:
        self.board = BoardProcess(tmp, links=links)
        self.board.start()
        cfg = from_dict({
            "device": {"id": "gate-07", "site": "13100000000001", "role": "gate",
                       "data_dir": str(tmp / "data")},
            "mqtt": mqtt or {"tls": False, "port": 1},
            "gate": {"serial": self.board.port, "pulse_ms": 200, "passage_timeout_s": 1.5,
                     "held_open_s": 1.0, **gate},
            "readers": [{"name": "entry", "path": "udp:127.0.0.1:50000", "direction": "in"},
                        {"name": "exit", "path": "udp:127.0.0.1:50001", "direction": "out"}],
        })
        idlist = MemoryIdList([Entry("10000000000001", Status.ACTIVE, cards=(CARD,)),
                               Entry("10000000000002", Status.ACTIVE, cards=(CARD2,))])
        self.touches: list[Touch] = []
        self.agent = Agent(cfg, idlist=idlist, config_keys=[], on_touch=self.touches.append)
        self.agent.plugin.start()
        wait_until(lambda: self.gate()["board"] == "ok", 10, "the gate board online")

    def gate(self) -> dict[str, Any]:
        return self.agent.state()["gate"]

    def tap(self, card: bytes = CARD, reader: int = 0) -> Touch:
        t = self.agent.handle_read(self.agent.cfg.readers[reader], CardRead(card, CardTech.FELICA))
        assert t is not None
        return t

    def outcome(self, tap: Touch, timeout: float = 5.0) -> Touch:
        def find() -> Touch | None:
            return next((t for t in self.touches if t.facts.get("tap") == tap.seq), None)
        wait_until(lambda: find() is not None, timeout, f"the passage of seq {tap.seq}")
        found = find()
        assert found is not None
        return found

    def stored(self) -> list[Touch]:
        return [decode(p) for _, p in self.agent.outbox.pending(0, 1000)]

    def pin(self, pin: int, n: int = -1) -> list[int]:
        return [lvl for p, lvl, _ in self.board.pins(n) if p == pin]

    def close(self) -> None:
        self.agent.plugin.stop()
        self.agent.outbox.close()
        self.board.close()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Rig] = []

    def make(links: list[dict[str, Any]], **gate: Any) -> Rig:
        made.append(Rig(tmp_path, links, **gate))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_allowed_tap_pulses_the_relay_and_the_door_confirms_the_passage(rig_factory: Any) -> None:
    rig = rig_factory([door_link()])
    tap = rig.tap()
    assert (tap.decision, tap.reason, tap.facts["passage"], tap.facts["dir"]) == (
        Decision.ALLOW, Reason.OK, "pending", "in")
    done = rig.outcome(tap)
    assert (done.facts["passage"], done.facts["dir"], done.tid, done.seq) == (
        "passed", "in", "10000000000001", tap.seq + 1)
    wait_until(lambda: rig.pin(GATE) == [0, 1, 0] and rig.pin(GREEN) == [0, 1, 0], 3,
               "the relay pulse and the green LED at the board's pins")
    assert 1 in rig.pin(BUZZER)
    assert rig.stored() == [tap, done]   # both durable, in order, nothing doubled
    assert rig.gate()["passages"] == {"passed": 1} and rig.gate()["alarms"] == []


def test_allowed_but_nobody_passes_is_not_passed(rig_factory: Any) -> None:
    rig = rig_factory([])  # the relay clicks, nobody pushes the door
    tap = rig.tap()
    done = rig.outcome(tap, timeout=4)
    assert done.facts["passage"] == "not_passed"
    assert rig.pin(GATE) == [0, 1, 0]


def test_denied_tap_red_led_double_beep_relay_shut(rig_factory: Any) -> None:
    rig = rig_factory([door_link()])
    t = rig.tap(STRANGER)
    assert (t.decision, t.reason, "passage" in t.facts) == (Decision.DENY, Reason.UNKNOWN_CARD, False)
    wait_until(lambda: rig.pin(RED) == [0, 1, 0], 3, "the red LED")
    buzz = rig.pin(BUZZER)
    assert buzz.count(1) == 2, buzz   # two beeps
    assert rig.pin(GATE) == [0]       # initialised off, never energized


def test_forced_door_is_an_alarm_not_a_touch(rig_factory: Any) -> None:
    rig = rig_factory([])
    rig.board.set_input(DOOR, 0)      # pushed open with no tap
    wait_until(lambda: rig.gate()["alarms"] == ["forced"], 3, "the forced alarm")
    rig.board.set_input(DOOR, 1)
    wait_until(lambda: rig.gate()["alarms"] == [], 3, "the alarm cleared")
    assert rig.gate()["alarms_raised"] == {"forced": 1}
    assert rig.touches == [] and rig.stored() == []


def test_door_held_open_is_an_alarm(rig_factory: Any) -> None:
    rig = rig_factory([door_link(hold_ms=2500)])
    tap = rig.tap()
    assert rig.outcome(tap).facts["passage"] == "passed"
    wait_until(lambda: rig.gate()["alarms"] == ["held_open"], 3, "the held_open alarm")
    wait_until(lambda: rig.gate()["alarms"] == [], 4, "the door shut again")
    assert rig.gate()["alarms_raised"] == {"held_open": 1}


def test_board_killed_mid_pulse_relay_shut_health_reported_taps_recorded(rig_factory: Any) -> None:
    rig = rig_factory([], pulse_ms=3000)
    first = rig.tap()
    rig.board.wait_log(rf"^PIN {GATE} 1 ", 3)
    rig.board.kill()                  # mid-pulse: the relay line was high
    wait_until(lambda: rig.gate()["board"] == "offline", 5, "the board reported offline")
    down = rig.tap(CARD2)
    assert (down.decision, down.reason, "passage" in down.facts) == (
        Decision.ALLOW, Reason.NOT_ACTUATED, False)
    assert rig.outcome(first).facts["passage"] == "unconfirmed"
    rig.board.start(reset_cause=3)    # back after a watchdog reset (machine.WDT_RESET)
    wait_until(lambda: rig.gate()["board"] == "ok"
               and "reset cause 3" in rig.gate()["board_detail"], 10,
               "the board back online, its watchdog reset reported")
    assert rig.pin(GATE) == [0]       # the restarted board drove the relay off and left it
    again = rig.tap(CARD2, reader=1)
    assert rig.outcome(again, timeout=4).facts["passage"] == "not_passed"
    seqs = [t.seq for t in rig.stored()]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 5  # nothing lost or doubled


def test_emergency_release_opens_the_gate_and_taps_are_emergency_open(rig_factory: Any) -> None:
    rig = rig_factory([])
    rig.board.set_input(EMERGENCY, 0)     # the fire-alarm contact closes
    wait_until(lambda: rig.gate()["emergency"] and rig.gate()["alarms"] == ["emergency_open"],
               3, "the emergency reported")
    wait_until(lambda: rig.pin(GATE) == [0, 1] and rig.pin(GATE_OUT) == [0, 1], 3,
               "both relays held open by the board")
    t = rig.tap()
    assert (t.decision, t.reason, "passage" in t.facts) == (Decision.ALLOW, Reason.EMERGENCY_OPEN, False)
    rig.board.set_input(EMERGENCY, 1)
    wait_until(lambda: not rig.gate()["emergency"] and rig.gate()["alarms"] == [], 3,
               "the emergency over")
    wait_until(lambda: rig.pin(GATE) == [0, 1, 0], 3, "the relays shut again")


@pytest.mark.parametrize("relay_out", [1, 0], ids=["relay-per-direction", "one-relay"])
def test_two_readers_share_one_board(rig_factory: Any, relay_out: int) -> None:
    rig = rig_factory([door_link(GATE), door_link(GATE_OUT)], relay_in=0, relay_out=relay_out)
    entry = rig.tap(CARD, reader=0)
    assert rig.outcome(entry).facts == {"reader": "entry", "dir": "in", "passage": "passed",
                                        "tap": entry.seq}
    wait_until(lambda: rig.gate()["door"] == "closed" and rig.pin(GATE)[-1] == 0, 3,
               "the door shut, the relay released")
    out = rig.tap(CARD2, reader=1)
    assert rig.outcome(out).facts == {"reader": "exit", "dir": "out", "passage": "passed",
                                      "tap": out.seq}
    if relay_out == 1:
        wait_until(lambda: rig.pin(GATE_OUT) == [0, 1, 0], 3, "the exit relay pulse")
        assert rig.pin(GATE) == [0, 1, 0]  # the entry relay pulsed once, for the entry tap only
    else:  # one relay for both directions; the direction comes from the reader
        wait_until(lambda: rig.pin(GATE) == [0, 1, 0, 1, 0], 3, "two pulses of the one relay")
        assert rig.pin(GATE_OUT) == [0]


def test_agent_restart_ends_a_pending_passage_once(rig_factory: Any, tmp_path: Path) -> None:
    rig = rig_factory([], passage_timeout_s=30)
    tap = rig.tap()
    wait_until(lambda: "+ " in (tmp_path / "data" / "gate-pending.log").read_text(), 3,
               "the pending passage journaled")
    rig.agent.plugin.stop()          # the agent stops (or dies) while the passage is pending
    rig.agent.outbox.close()
    # a tap whose outcome record made it to the outbox, but whose journal line did not go
    journal = tmp_path / "data" / "gate-pending.log"
    cfg, idlist = rig.agent.cfg, rig.agent.idlist
    again = Agent(cfg, idlist=idlist, config_keys=[], on_touch=rig.touches.append)
    try:
        again.plugin.start()
        done = rig.outcome(tap)
        assert (done.facts["passage"], done.seq) == ("unconfirmed", tap.seq + 1)
        wait_until(lambda: again.state()["gate"]["board"] == "ok", 10, "the board online")
        with open(journal, "a") as f:      # replayed journal line for an already-ended tap
            f.write(journal.read_text().splitlines()[0] + "\n")
        again.plugin.stop()
        third = Agent(cfg, idlist=idlist, config_keys=[], on_touch=rig.touches.append)
        third.plugin.start()
        third.plugin.stop()
        stored = [decode(p) for _, p in third.outbox.pending(0, 100)]
        assert [(t.seq, t.facts.get("passage")) for t in stored] == [
            (tap.seq, "pending"), (tap.seq + 1, "unconfirmed")]   # ended once, not twice
        third.outbox.close()
    finally:
        again.outbox.close()
        rig.agent = again


def test_alarms_reach_the_event_topic_and_the_acl_lets_the_device_write_it(
        rig_factory: Any, broker: PrivateBroker) -> None:
    assert ("write", topics.event("13100000000001", "gate-07")) in device_rules(
        "13100000000001", "gate-07")
    got: list[dict[str, Any]] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="alarm-watch",
                      protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(cbor2.loads(m.payload))
    sub.connect(broker.host, broker.port)
    sub.subscribe(topics.every(topics.EVENT), qos=1)
    sub.loop_start()
    try:
        rig = rig_factory([], mqtt={"host": broker.host, "port": broker.port, "tls": False})
        rig.agent.link.start()
        wait_until(lambda: rig.agent.link.connected, 10, "the agent connected")
        rig.board.set_input(DOOR, 0)
        wait_until(lambda: any(e.get("alarm") == "forced" for e in got), 5, "the forced event")
        rig.board.set_input(DOOR, 1)
        wait_until(lambda: len(got) >= 2, 5, "the cleared event")
        assert [(e["dev"], e["kind"], e["alarm"], e["state"]) for e in got] == [
            ("gate-07", "alarm", "forced", "raised"), ("gate-07", "alarm", "forced", "cleared")]
        rig.agent.link.stop()
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_a_board_that_cannot_be_opened_is_offline_and_taps_are_not_actuated(tmp_path: Path) -> None:
    cfg = from_dict({
        "device": {"id": "gate-08", "site": "13100000000001", "role": "gate",
                   "data_dir": str(tmp_path / "data")},
        "mqtt": {"tls": False, "port": 1},
        "gate": {"serial": str(tmp_path / "no-such-tty")},
        "readers": [{"name": "entry", "path": "udp:127.0.0.1:50000"}],
    })
    agent = Agent(cfg, idlist=MemoryIdList([Entry("10000000000001", Status.ACTIVE, cards=(CARD,))]),
                  config_keys=[])
    agent.plugin.start()
    try:
        wait_until(lambda: agent.state()["gate"]["board"] == "offline", 5, "offline reported")
        assert "no-such-tty" in agent.state()["gate"]["board_detail"]
        t = agent.handle_read(cfg.readers[0], CardRead(CARD, CardTech.FELICA))
        assert t is not None and (t.decision, t.reason) == (Decision.ALLOW, Reason.NOT_ACTUATED)
        assert "passage" not in t.facts   # nothing opened, so nothing to confirm: it counts
    finally:
        agent.plugin.stop()
        agent.outbox.close()
