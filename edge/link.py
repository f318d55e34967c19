"""The MQTT link (paho-mqtt 2, MQTT 5): drains the outbox in seq order, forgets touches only on
the sink's end-to-end acknowledgement, and keeps the state message.

Rules of this file (docs/delivery.md is the protocol):

- One thread, the pump, owns all bookkeeping: the in-flight window, what was sent, what the
  sink acknowledged. paho callbacks run on the network thread while paho holds its own locks,
  so they only put events on a queue.
- A PUBACK only frees a place in the in-flight window (bounded: paho stalls silently past
  65,535 unacknowledged messages). Its reason code is checked: a refusal (>= 128, e.g. 135
  "not authorized" from an ACL) is counted and reported in the state message, and the link
  holds off sending touches for a growing while instead of spinning.
- The device forgets touches only when the retained end-to-end acknowledgement on
  ``.../{dev}/ack`` says the sink has committed everything up to that seq.
- Every connection is a fresh paho client (no paho-internal resend between connections).
  After a connect the backlog is replayed from the oldest unacknowledged touch, in seq order;
  new touches join the end of the same queue, so they flow as soon as the replay reaches them.
  Without a connection change, touches sent but not acknowledged end to end are replayed
  after ``e2e_timeout_s`` (doubling while nothing progresses).
- Reconnects use exponential backoff with jitter, so a site's devices do not return in step.
"""

import contextlib
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge import topics
from edge.config import MqttConfig
from edge.e2e import AckError, decode_ack
from edge.outbox import Outbox

log = logging.getLogger(__name__)

# state keys that change all the time: a change in them alone is not news (the heartbeat has it)
VOLATILE = frozenset({"ts", "backlog", "oldest_ms", "oldest_age_s", "disk_free", "link"})
STATE_MIN_INTERVAL_S = 1.0


def backlog_class(n: int) -> int:
    """0, 1 (<100), 2 (<10,000), 3: a change of class is news for the state message."""
    return 0 if n == 0 else 1 if n < 100 else 2 if n < 10_000 else 3


class Link:
    """Owns the paho clients, the pump thread, the network thread and the heartbeat."""

    def __init__(self, cfg: MqttConfig, site: str, device: str, outbox: Outbox,
                 state: Callable[[], dict[str, Any]], *, backoff_min_s: float = 1.0,
                 backoff_max_s: float = 60.0, e2e_timeout_s: float = 30.0,
                 refusal_holdoff_s: float = 5.0) -> None:
        self.cfg, self.site, self.device, self.outbox = cfg, site, device, outbox
        self._state = state
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.e2e_timeout_s, self.refusal_holdoff_s = e2e_timeout_s, refusal_holdoff_s
        self.connected = False
        self.published = 0        # touches the broker acknowledged (PUBACK, success)
        self.refused = 0          # touches the broker refused (reason code >= 128)
        self.last_refusal = ""    # e.g. "Not authorized" (135)
        self.acked_upto = 0       # end-to-end: the sink has committed every seq <= this
        self.ack_ahead = 0        # acks beyond any seq made here (outbox reset? reported)
        self.ack_sub_refused = False
        self.replays = 0          # rewinds to the oldest unacknowledged touch
        self.connects = 0
        self.last_error = ""
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stopped = threading.Event()
        self._net_stop = threading.Event()
        self._gen = 0
        self._client: mqtt.Client | None = None
        self._ack_topic = topics.touch_ack(site, device)
        self._handlers: dict[str, Callable[[str, bytes], None]] = {}  # filter -> handler
        self._pump_thread = threading.Thread(target=self._pump, name="mqtt-pump", daemon=True)
        self._net_thread = threading.Thread(target=self._net, name="mqtt-net", daemon=True)
        self._beat_thread = threading.Thread(target=self._beat, name="mqtt-state", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._pump_thread.start()
        self._net_thread.start()
        self._beat_thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._events.put(("stop",))
        self._pump_thread.join(3)
        self._beat_thread.join(3)
        c = self._client
        if self.connected and c is not None:
            info = c.publish(topics.state(self.site, self.device),
                             cbor2.dumps({**self._state(), "online": False}), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2.0)
        self._net_stop.set()
        if c is not None:
            c.disconnect()
        self._net_thread.join(3)

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Before start(): (re)subscribed on every connect; `handler` runs on paho's network
        thread, so it must only hand the message on (e.g. ConfigApplier.submit)."""
        self._handlers[topic_filter] = handler

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """A QoS 1 message outside the touch stream (e.g. a config ack). Best effort: with no
        connection it is dropped with a warning (its sender re-sends what must arrive)."""
        c = self._client
        if c is None or not self.connected:
            log.warning("mqtt: not connected: %s not sent", topic)
            return
        c.publish(topic, payload, qos=1, retain=retain)

    def _on_message(self, topic: str, payload: bytes, gen: int) -> None:
        """Network thread: the ack goes to the pump; other subscriptions to their handlers."""
        if topic == self._ack_topic:
            self._events.put(("message", gen, topic, payload))
            return
        for topic_filter, handler in self._handlers.items():
            if mqtt.topic_matches_sub(topic_filter, topic):
                try:
                    handler(topic, payload)
                except Exception:  # noqa: BLE001 - a handler bug must not kill the link
                    log.exception("mqtt: handler for %s failed", topic_filter)

    def notify(self) -> None:
        """A new touch is in the outbox."""
        self._events.put(("wake",))

    def publish_state(self) -> None:
        """Send the state message now (from any thread)."""
        self._events.put(("state",))

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected, "published": self.published,
                "refused": self.refused, "last_refusal": self.last_refusal,
                "acked_upto": self.acked_upto, "ack_ahead": self.ack_ahead,
                "ack_sub_refused": self.ack_sub_refused, "replays": self.replays,
                "connects": self.connects, "last_error": self.last_error}

    # -- the network thread: connect, loop, back off with jitter ------------------------------
    def _new_client(self, gen: int) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device, protocol=mqtt.MQTTv5)
        ev = self._events.put
        c.on_connect = lambda _c, _u, _f, rc, _p: ev(("connected", gen, rc))
        c.on_disconnect = lambda _c, _u, _f, rc, _p: ev(("disconnected", gen, rc))
        c.on_publish = lambda _c, _u, mid, rc, _p: ev(("puback", gen, mid, rc))
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: ev(("suback", gen, rcs))
        c.on_message = lambda _c, _u, m: self._on_message(m.topic, bytes(m.payload), gen)
        c.max_inflight_messages_set(0)  # the pump bounds the window; paho must not queue more
        if self.cfg.tls:
            c.tls_set(ca_certs=self.cfg.ca_file or None, certfile=self.cfg.cert_file or None,
                      keyfile=self.cfg.key_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        offline = {"v": 1, "dev": self.device, "site": self.site, "online": False}
        c.will_set(topics.state(self.site, self.device), cbor2.dumps(offline), qos=1, retain=True)
        return c

    def _net(self) -> None:
        delay = self.backoff_min_s
        while not self._net_stop.is_set():
            self._gen += 1
            gen = self._gen
            c = self._new_client(gen)
            self._client = c
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0  # the outbox, not the broker session, is our memory
            started = time.monotonic()
            try:
                rc = c.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                               clean_start=True, properties=props)
                while rc == mqtt.MQTT_ERR_SUCCESS and not self._net_stop.is_set():
                    rc = c.loop(timeout=1.0)
            except Exception as exc:  # noqa: BLE001 - socket, TLS, DNS: all mean "try later"
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.debug("mqtt: connect to %s:%d failed: %s", self.cfg.host, self.cfg.port, exc)
            self._events.put(("disconnected", gen, None))
            if self._net_stop.is_set():
                break
            if time.monotonic() - started > 2 * self.backoff_max_s:
                delay = self.backoff_min_s  # it was up for a good while: start over
            wait = delay * random.uniform(0.5, 1.0)  # "equal jitter"
            delay = min(delay * 2, self.backoff_max_s)
            self._net_stop.wait(wait)
            with contextlib.suppress(Exception):
                c._sock_close()  # type: ignore[attr-defined]  # the old client is dropped

    # -- the pump: the one thread that owns the in-flight window ------------------------------
    def _pump(self) -> None:
        touch_topic = topics.touch(self.site, self.device)
        inflight: dict[int, int] = {}   # mid -> seq
        gen = 0                         # generation of the connection we are using
        client: mqtt.Client | None = None
        sent_upto = 0                   # highest seq handed to paho on this connection
        hold_until = 0.0                # after a refusal: no touches until then
        holdoff = self.refusal_holdoff_s
        timeout = self.e2e_timeout_s
        last_progress = time.monotonic()
        last_state_check = 0.0
        last_sent_state: dict[str, Any] | None = None
        last_state_at = 0.0
        state_due = False
        while True:
            try:
                events = [self._events.get(timeout=1.0)]
            except queue.Empty:
                events = []
            while len(events) < 1000:
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            for event in events:
                kind = event[0]
                if kind == "stop":
                    return
                if kind == "state":
                    state_due = True
                elif kind == "connected":
                    if event[1] != self._gen:
                        continue
                    rc: ReasonCode = event[2]
                    if rc.is_failure:
                        self.last_error = f"connect refused: {rc}"
                        log.warning("mqtt: connect refused: %s", rc)
                        continue
                    gen, client = event[1], self._client
                    assert client is not None
                    self.connects += 1
                    log.info("mqtt: connected to %s:%d", self.cfg.host, self.cfg.port)
                    client.subscribe([(self._ack_topic, SubscribeOptions(qos=1))] +
                                     [(f, SubscribeOptions(qos=1)) for f in self._handlers])
                    self.connected, inflight = True, {}
                    sent_upto = self.acked_upto  # replay the backlog in order
                    last_progress, timeout = now, self.e2e_timeout_s
                    state_due = True
                elif kind == "disconnected":
                    if event[1] == gen and self.connected:
                        if not self._stopped.is_set():
                            log.warning("mqtt: disconnected (%s); reconnecting",
                                        event[2] if event[2] is not None else "connection lost")
                        self.connected, inflight, client = False, {}, None
                elif kind == "puback":
                    if event[1] != gen:
                        continue
                    seq = inflight.pop(event[2], None)
                    if seq is not None:
                        if event[3].is_failure:
                            self.refused += 1
                            self.last_refusal = f"{event[3]} ({event[3].value})"
                            log.error("mqtt: broker refused touch seq %d: %s; kept, holding off "
                                      "%.0f s", seq, self.last_refusal, holdoff)
                            hold_until = now + holdoff
                            holdoff = min(holdoff * 2, 300.0)
                            state_due = True
                        else:
                            self.published += 1
                elif kind == "suback":
                    if event[1] == gen and any(rc.is_failure for rc in event[2]):
                        self.ack_sub_refused = True
                        log.error("mqtt: subscription to %s refused (%s): touches cannot be "
                                  "acknowledged end to end and stay in the outbox",
                                  self._ack_topic, event[2])
                        state_due = True
                elif (kind == "message" and event[2] == self._ack_topic
                      and self._on_ack(event[3])):
                    last_progress, timeout = now, self.e2e_timeout_s
                    holdoff = self.refusal_holdoff_s
                    sent_upto = max(sent_upto, self.acked_upto)
            if now - last_state_check >= STATE_MIN_INTERVAL_S:
                last_state_check = now
                self.outbox.maintain()
                if self.connected and client is not None:
                    st = self._state()
                    sig = self._significant(st)
                    if (state_due or sig != last_sent_state) and \
                            now - last_state_at >= STATE_MIN_INTERVAL_S:
                        client.publish(topics.state(self.site, self.device), cbor2.dumps(st),
                                       qos=1, retain=True)
                        last_sent_state, last_state_at, state_due = sig, now, False
            if not self.connected or client is None:
                continue
            if now < hold_until:
                continue
            if hold_until and now >= hold_until:
                hold_until = 0.0
                if sent_upto > self.acked_upto:
                    self.replays += 1
                    log.warning("mqtt: retrying from seq %d after a refusal", self.acked_upto + 1)
                    sent_upto, inflight = self.acked_upto, {}
            elif (not inflight and sent_upto > self.acked_upto
                  and now - last_progress > timeout):
                self.replays += 1
                log.warning("mqtt: no end-to-end acknowledgement beyond %d for %.0f s; replaying",
                            self.acked_upto, now - last_progress)
                sent_upto, last_progress = self.acked_upto, now
                timeout = min(timeout * 2, 600.0)
            room = self.cfg.inflight - len(inflight)
            if room <= 0 or (inflight and room < self.cfg.inflight // 4):
                continue  # refill in chunks: fewer queries while a backlog drains
            was_idle = sent_upto <= self.acked_upto
            for seq, payload in self.outbox.pending(sent_upto, room):
                info = client.publish(touch_topic, payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # connection lost; the next connect replays from the oldest
                inflight[info.mid] = seq
                sent_upto = seq
            if was_idle and sent_upto > self.acked_upto:
                last_progress = now  # the e2e timeout counts from the first unacknowledged send

    def _on_ack(self, payload: bytes) -> bool:
        """The sink's end-to-end acknowledgement. Returns True if it covered something new."""
        try:
            upto = decode_ack(payload)
        except AckError as exc:
            log.error("mqtt: malformed end-to-end acknowledgement ignored: %s", exc)
            return False
        if upto <= self.acked_upto:
            return False
        made = self.outbox.next_seq() - 1
        if upto > made:
            # the sink has seqs this device never made: the outbox was reset or restored and
            # seqs are being reused. Never forget on that word; report it loudly.
            self.ack_ahead = upto
            log.critical("mqtt: the sink acknowledges seq %d but this device made only %d: "
                         "outbox reset? seqs may be reused; nothing deleted", upto, made)
            upto = made
            if upto <= self.acked_upto:
                return False
        self.outbox.delete_upto(upto)
        self.acked_upto = upto
        return True

    def _significant(self, st: dict[str, Any]) -> dict[str, Any]:
        sig = {k: v for k, v in st.items() if k not in VOLATILE}
        sig["backlog_class"] = backlog_class(int(st.get("backlog") or 0))
        link = st.get("link") or {}
        sig["refused"] = link.get("refused")
        sig["ack_sub_refused"] = link.get("ack_sub_refused")
        return sig

    def _beat(self) -> None:
        # jitter so a site's devices do not all report in the same second
        while not self._stopped.wait(self.cfg.state_interval_s * random.uniform(0.9, 1.1)):
            self.publish_state()
