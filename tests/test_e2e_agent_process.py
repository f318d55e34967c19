"""`ccus agent --config FILE` as a real process: taps arrive at the sink with the system clock,
the retained state message says online, and after SIGTERM it says offline."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import PrivateBroker
from cloud_sink.ingest import Sink
from cloud_sink.store import SqliteStore
from demo.site_day import card_of, write_idlist_csv
from edge.idlist import Entry, Status
from protocol import topics
from sim.agent_config import gate_agent_toml
from sim.nfc_card import CardField, free_udp_port

SITE = "13100000000002"


def retained_state(broker: PrivateBroker, device: str) -> dict:  # type: ignore[type-arg]
    got: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: got.append(m.payload)
    c.connect(broker.host, broker.port)
    c.subscribe(topics.state(SITE, device), qos=1)
    c.loop_start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    c.loop_stop()
    c.disconnect()
    assert got, "no retained state message"
    return cbor2.loads(got[-1])  # type: ignore[no-any-return]


@pytest.mark.e2e
def test_agent_process(broker: PrivateBroker, tmp_path: Path) -> None:
    port = free_udp_port()
    write_idlist_csv(tmp_path / "list.csv", [Entry("10000000000001", Status.ACTIVE,
                                                   cards=(card_of(1).ident,))])
    conf = tmp_path / "agent.toml"
    conf.write_text(gate_agent_toml(dev="gate-proc", site=SITE, data_dir=tmp_path / "data",
                                    host=broker.host, port=broker.port,
                                    list_path=tmp_path / "list.csv", udp_port=port))
    store = SqliteStore(tmp_path / "store.sqlite")
    sink = Sink(store, broker.host, broker.port, client_id="sink-proc")
    sink.start()
    field = CardField(port)
    proc = subprocess.Popen([sys.executable, "-m", "ccus.cli", "agent", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert sink.subscribed.wait(10)
        before = int(time.time() * 1000)
        assert field.tap(card_of(1), timeout_s=10)
        assert field.tap(card_of(2), timeout_s=10)  # not on the list
        deadline = time.monotonic() + 10
        while store.counts()["touches"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.counts() == {"touches": 2, "allowed": 1, "denied": 1, "dead_letters": 0}
        state = retained_state(broker, "gate-proc")
        assert state["online"] is True and state["readers"] == {"entry": "ok"}
        assert state["backlog"] == 0 and state["sw"]
        rows = store.work_history()
        assert len(rows) == 1 and rows[0].tid == "10000000000001"
        assert rows[0].first_in_ms is not None and abs(rows[0].first_in_ms - before) < 30_000
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        field.close()
        sink.stop()
        store.close()
    assert proc.returncode == 0, out.decode()
    assert retained_state(broker, "gate-proc")["online"] is False
    assert b"tap " in out  # the agent logs each tap


def test_agent_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[device]\nid = "gate-1"\nsite = "123"\n')
    r = subprocess.run([sys.executable, "-m", "ccus.cli", "agent", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30, env={**os.environ})
    assert r.returncode == 2
    assert "device.site" in r.stderr
