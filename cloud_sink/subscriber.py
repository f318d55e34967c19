"""The sink process: an MQTT 5 shared subscription, batched writes, acknowledge after commit.

paho's manual_ack holds each PUBACK until the batch holding the message is committed, so a
sink killed mid-batch leaves the broker to redeliver (the session outlives the process).
After the commit the sink also publishes, per device in the batch, the end-to-end
acknowledgement (retained, QoS 1): the highest seq up to which that device's touches are all
stored (cloud_sink.acks, docs/delivery.md). Only then may the device forget them.
"""

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from cloud_sink.acks import AckLedger
from cloud_sink.store import DeadLetter, IngestResult, Store
from cloud_sink.validate import validate
from edge import topics
from edge.e2e import encode_ack
from edge.touch import Touch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


class Sink:
    def __init__(self, store: Store, host: str, port: int, *, group: str = "sink",
                 client_id: str = "sink-1", batch_max: int = 500, batch_wait_s: float = 0.05,
                 on_batch: Callable[[IngestResult], None] | None = None,
                 tls: "TlsFiles | None" = None) -> None:
        self.store, self.host, self.port, self.group = store, host, port, group
        self.batch_max, self.batch_wait_s = batch_max, batch_wait_s
        self.on_batch = on_batch
        self.totals = IngestResult()
        self.subscribed = threading.Event()
        self.acks = AckLedger(_db_file(store))  # end-to-end acknowledgements and gaps
        self._q: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._stop = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_message = lambda c, u, m: self._q.put(m)
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(1, 30)
        if tls is not None:  # the cloud broker: TLS only, identity from the client certificate
            self._client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key,
                                 tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self._writer = threading.Thread(target=self._write_loop, name="sink-writer", daemon=True)

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 24 * 3600  # the broker queues for us while we are down
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=False,
                                   properties=props)
        self._client.loop_start()
        self._writer.start()

    def stop(self) -> None:
        self._stop.set()
        self._writer.join(5)
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if rc.is_failure:
            log.error("sink: connect refused: %s", rc)
            return
        client.subscribe(topics.shared(self.group, topics.ALL_TOUCHES), options=SubscribeOptions(qos=1))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[Any],
                      props: Any) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("sink: subscription refused: %s", rcs)
            return
        log.info("sink: subscribed to %s", topics.shared(self.group, topics.ALL_TOUCHES))
        self.subscribed.set()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            while not self._stop.is_set():
                try:
                    self._commit(batch)
                    break
                except Exception:  # noqa: BLE001 - the store is down or refused: keep the batch
                    # unacknowledged messages stay with us (and the broker); retry, never die
                    log.exception("sink: storing a batch of %d failed; retrying in 1 s", len(batch))
                    self._stop.wait(1.0)

    def _commit(self, batch: list[mqtt.MQTTMessage]) -> None:
        good: list[Touch] = []
        dead: list[DeadLetter] = []
        for m in batch:
            item = validate(m.topic, bytes(m.payload))
            if isinstance(item, DeadLetter):
                log.warning("sink: dead letter on %s: %s (%s)", item.topic, item.reason, item.detail)
                dead.append(item)
            else:
                good.append(item)
        res = self.store.ingest(good, dead)  # committed when this returns
        for m in batch:
            self._client.ack(m.mid, m.qos)
        for a in self.acks.observe((t.site, t.device, t.seq) for t in good):
            self._client.publish(topics.touch_ack(a.site, a.device), encode_ack(a.upto),
                                 qos=1, retain=True)
        for k in ("stored", "repeated", "dead"):
            setattr(self.totals, k, getattr(self.totals, k) + getattr(res, k))
        if self.on_batch:
            self.on_batch(res)


def _db_file(store: object) -> str | None:
    """The SQLite file behind the store (the ack ledger opens its own connection), or None."""
    path = getattr(store, "path", None)
    return str(path) if path else None
