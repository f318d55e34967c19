"""The sink after a broker kill -9: it subscribes again and announces a new epoch, so a device
replays at once what the broker dropped while no sink was subscribed (real Mosquitto, SQLite).

The device here is a small paho client that follows the device rules of docs/delivery.md
(keep every touch until the end-to-end ack covers it; replay from the ack on every connect and
on a live ack naming a new sink epoch; retained copies say nothing about the epoch) and has no
acknowledgement timeout at all: without the epoch it would never replay, so the test would
fail by its deadline, as the sink did before (devices then waited 30 s doubling).
"""

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sink_support import SITE, touch

from broker.launcher import PrivateBroker
from broker.procs import wait_until
from cloud_sink.ingest import Sink
from cloud_sink.store import open_store
from protocol import topics
from protocol.ack import decode_ack_msg
from protocol.touch import encode

N = 400
BOUND_S = 10.0    # every touch stored this soon after the broker is back (the device's timeout: 30 s)


class RuleDevice:
    """Keeps touches until acknowledged; replays on connect and on a new live epoch."""

    def __init__(self, broker: PrivateBroker, dev: str) -> None:
        self.dev, self.acked, self.made = dev, 0, 0
        self.epoch: int | None = None
        self.epoch_replays = 0
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5)
        self.c.reconnect_delay_set(0.05, 0.2)  # back before the sink: its replay is dropped
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.connect_async(broker.host, broker.port)
        self.c.loop_start()

    def _replay(self) -> None:
        with self.lock:
            for seq in range(self.acked + 1, self.made + 1):
                self.c.publish(topics.touch(SITE, self.dev), encode(touch(seq, device=self.dev)), 1)

    def _on_connect(self, c: mqtt.Client, *_: object) -> None:
        c.subscribe(topics.touch_ack(SITE, self.dev), qos=1)
        self._replay()

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        msg = decode_ack_msg(m.payload)
        with self.lock:
            self.acked = max(self.acked, min(msg.upto, self.made))
        new_epoch = (msg.epoch is not None and self.epoch is not None and msg.epoch != self.epoch
                     and not m.retain)
        if msg.epoch is not None:
            self.epoch = msg.epoch
        if new_epoch:
            self.epoch_replays += 1
            self._replay()

    def tap(self) -> None:
        with self.lock:
            self.made += 1
            if self.c.is_connected():
                self.c.publish(topics.touch(SITE, self.dev), encode(touch(self.made, device=self.dev)), 1)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_after_a_broker_kill_the_sink_resubscribes_and_its_new_epoch_brings_every_touch_back(
        tmp_path: Path) -> None:
    broker = PrivateBroker(tmp_path / "broker", persistence=True).start()
    store = open_store(tmp_path / "s.sqlite")
    sink = Sink(store, broker.host, broker.port, group="epoch", client_id="sink-epoch")
    sink.start()
    dev = RuleDevice(broker, "gate-epoch")
    try:
        assert sink.subscribed.wait(10)
        first_epoch = getattr(sink, "epoch", None)
        wait_until(lambda: dev.c.is_connected(), 10, "the device connected")
        back = 0.0
        for i in range(1, N + 1):
            dev.tap()
            time.sleep(0.01)
            if i == N // 4:
                wait_until(lambda: dev.acked >= 50, 10, "the first touches acknowledged")
                epoch_before_kill = dev.epoch
                broker.kill()
                time.sleep(1.0)   # the sink's first attempt (0.5 s) fails, its next is at 1.5 s
                broker.start()
                back = time.monotonic()
                sink.subscribed.clear()
        last_tap = time.monotonic()
        wait_until(lambda: store.counts()["touches"] == N and dev.acked == N, BOUND_S + 5,
                   f"all {N} touches stored and acknowledged")
        took = time.monotonic() - back
        print(f"\nbroker kill -9, down 1 s, restarted while publishing: all {N} touches stored "
              f"and acknowledged {took:.2f} s after the broker was back, "
              f"{time.monotonic() - last_tap:.2f} s after the last tap "
              f"(device replays on a new epoch: {dev.epoch_replays})")
        assert took < BOUND_S
        assert epoch_before_kill == first_epoch  # every ack names the epoch
        assert sink.epoch > first_epoch and dev.epoch == sink.epoch
        assert store.gaps() == []  # type: ignore[attr-defined]
    finally:
        dev.close()
        sink.stop()
        store.close()
        broker.close()
