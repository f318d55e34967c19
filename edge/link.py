"""The MQTT link (paho-mqtt 2, MQTT 5): drains the outbox in seq order and keeps the state message.

A bounded in-flight window (paho stalls silently past 65,535 unacknowledged messages) and
reason codes checked on every PUBACK: an ACL refusal is a reason code, not an exception.
After a reconnect the backlog is replayed from the oldest touch; the sink ignores repeats.
"""

import logging
import queue
import random
import ssl
import threading
from collections.abc import Callable
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge import topics
from edge.config import MqttConfig
from edge.outbox import Outbox

log = logging.getLogger(__name__)


class Link:
    """Owns the paho client. All bookkeeping happens on one thread (the pump), fed by a queue.

    paho calls back on its network thread while holding its own locks; taking a lock of ours
    there while the pump calls publish() would deadlock, so callbacks only enqueue events.
    """

    def __init__(self, cfg: MqttConfig, site: str, device: str, outbox: Outbox,
                 state: Callable[[], dict[str, Any]]) -> None:
        self.cfg, self.site, self.device, self.outbox = cfg, site, device, outbox
        self._state = state
        self.connected = False
        self.published = 0        # touches the broker acknowledged
        self.refused = 0          # touches the broker refused (reason code >= 128)
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stopped = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device,
                                   protocol=mqtt.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._handlers: dict[str, Callable[[str, bytes], None]] = {}  # filter -> handler
        self._client.max_inflight_messages_set(cfg.inflight)
        self._client.reconnect_delay_set(1, 30)
        if cfg.tls:
            self._client.tls_set(ca_certs=cfg.ca_file or None, certfile=cfg.cert_file or None,
                                 keyfile=cfg.key_file or None,
                                 tls_version=ssl.PROTOCOL_TLS_CLIENT)
        offline = {"v": 1, "dev": device, "site": site, "online": False}
        self._client.will_set(topics.state(site, device), cbor2.dumps(offline), qos=1, retain=True)
        self._pump_thread = threading.Thread(target=self._pump, name="mqtt-pump", daemon=True)
        self._beat_thread = threading.Thread(target=self._beat, name="mqtt-state", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0  # the outbox, not the broker session, is our memory
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                                   clean_start=True, properties=props)
        self._client.loop_start()
        self._pump_thread.start()
        self._beat_thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._events.put(("stop",))
        self._pump_thread.join(3)
        self._beat_thread.join(3)
        if self.connected:
            info = self._client.publish(topics.state(self.site, self.device),
                                        cbor2.dumps({**self._state(), "online": False}),
                                        qos=1, retain=True)
            info.wait_for_publish(2.0)
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Before start(): (re)subscribed on every connect; `handler` runs on paho's network
        thread, so it must only hand the message on (e.g. ConfigApplier.submit)."""
        self._handlers[topic_filter] = handler

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """A QoS 1 message outside the touch stream (e.g. a config ack)."""
        self._client.publish(topic, payload, qos=1, retain=retain)

    def notify(self) -> None:
        """A new touch is in the outbox."""
        self._events.put(("wake",))

    def publish_state(self) -> None:
        if self.connected:
            self._client.publish(topics.state(self.site, self.device),
                                 cbor2.dumps(self._state()), qos=1, retain=True)

    # -- paho callbacks (network thread): enqueue only ----------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    props: Any) -> None:
        if rc.is_failure:
            log.warning("mqtt: connect refused: %s", rc)
            return
        for topic_filter in self._handlers:
            client.subscribe(topic_filter, qos=1)
        self._events.put(("connected",))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for topic_filter, handler in self._handlers.items():
            if mqtt.topic_matches_sub(topic_filter, msg.topic):
                handler(msg.topic, msg.payload)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                       props: Any) -> None:
        self._events.put(("disconnected", rc))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode,
                    props: Any) -> None:
        self._events.put(("puback", mid, rc))

    # -- the pump: the one thread that owns the in-flight window ------------------------------
    def _pump(self) -> None:
        topic = topics.touch(self.site, self.device)
        inflight: dict[int, int] = {}  # mid -> seq
        sent_upto = 0                  # highest seq handed to paho on this connection
        while True:
            try:
                event = self._events.get(timeout=1.0)
            except queue.Empty:
                event = ("wake",)
            kind = event[0]
            if kind == "stop":
                return
            if kind == "connected":
                log.info("mqtt: connected to %s:%d", self.cfg.host, self.cfg.port)
                self.connected, inflight, sent_upto = True, {}, 0  # replay the backlog in order
                self.publish_state()
            elif kind == "disconnected":
                if self.connected and not self._stopped.is_set():
                    log.warning("mqtt: disconnected (%s); reconnecting", event[1])
                self.connected, inflight = False, {}
            elif kind == "puback":
                seq = inflight.pop(event[1], None)
                if seq is not None:
                    self._acked(seq, event[2])
            if not self.connected:
                continue
            room = self.cfg.inflight - len(inflight)
            if room <= 0:
                continue
            for seq, payload in self.outbox.pending(sent_upto, room):
                info = self._client.publish(topic, payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # connection lost; the next 'connected' replays from the start
                inflight[info.mid] = seq
                sent_upto = seq

    def _acked(self, seq: int, rc: ReasonCode) -> None:
        if rc.is_failure:
            self.refused += 1
            log.error("mqtt: broker refused touch seq %d: %s (kept in the outbox)", seq, rc)
            return
        self.published += 1
        self.outbox.delete(seq)

    def _beat(self) -> None:
        # jitter so a site's devices do not all report in the same second
        while not self._stopped.wait(self.cfg.state_interval_s * random.uniform(0.9, 1.1)):
            self.publish_state()
