"""The MQTT link (paho-mqtt 2, MQTT 5): drains the outbox in seq order, forgets touches only on
the sink's end-to-end acknowledgement, and keeps the state message.

Rules of this file (docs/delivery.md is the protocol):

- One thread, the pump, owns all bookkeeping (the in-flight window, what was sent, what the
  sink acknowledged) and also drives paho's network I/O: a select() loop over paho's socket
  and a wake socket, calling loop_read / loop_write / loop_misc itself. paho's callbacks run
  inside loop_read with paho's locks held, so they only append events to a list the pump
  handles right after; the window is refilled at once, with no hand-off between threads
  (a hand-off costs up to a GIL switch interval, 5 ms, each way). Other threads (the agent's
  notify(), the heartbeat, publish()) queue a command and write a byte to the wake socket.
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

import collections
import contextlib
import logging
import random
import select
import socket
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

from edge.config import MqttConfig
from edge.outbox import Outbox
from protocol import topics
from protocol.ack import AckError, decode_ack

log = logging.getLogger(__name__)

# state keys that change all the time: a change in them alone is not news (the heartbeat has it)
VOLATILE = frozenset({"ts", "backlog", "oldest_ms", "oldest_age_s", "disk_free", "link"})
STATE_MIN_INTERVAL_S = 1.0
READ_AHEAD = 256  # outbox rows read per query while a backlog drains


def _nodelay(sock: Any) -> None:
    """TCP_NODELAY: a PUBLISH (or PUBACK) goes out at once, not held by Nagle's algorithm until
    the peer's (delayed, up to 40 ms) TCP ACK of the previous small segment."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def backlog_class(n: int) -> int:
    """0, 1 (<100), 2 (<10,000), 3: a change of class is news for the state message."""
    return 0 if n == 0 else 1 if n < 100 else 2 if n < 10_000 else 3


class Link:
    """Owns the paho clients, the pump thread (which also drives paho's network I/O) and the
    heartbeat."""

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
        # from other threads to the pump: commands, then a byte on the wake socket
        self._cmds: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # paho callbacks run on the pump thread (inside loop_read): they only append here
        self._events: list[tuple[Any, ...]] = []
        self._stopped = threading.Event()
        self._gen = 0
        self._client: mqtt.Client | None = None
        self._ack_topic = topics.touch_ack(site, device)
        self._handlers: dict[str, Callable[[str, bytes], None]] = {}  # filter -> handler
        # the pump's bookkeeping (only the pump thread touches these)
        self._inflight: dict[int, int] = {}   # mid -> seq
        self._sent_upto = 0                   # highest seq handed to paho on this connection
        self._ahead: collections.deque[tuple[int, bytes]] = collections.deque()  # read, not sent
        self._hold_until = 0.0                # after a refusal: no touches until then
        self._holdoff = refusal_holdoff_s
        self._timeout = e2e_timeout_s
        self._last_progress = time.monotonic()
        self._last_state_check = 0.0
        self._last_sent_state: dict[str, Any] | None = None
        self._last_state_at = 0.0
        self._state_due = False
        self._pump_thread = threading.Thread(target=self._pump, name="mqtt-pump", daemon=True)
        self._beat_thread = threading.Thread(target=self._beat, name="mqtt-state", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._pump_thread.start()
        self._beat_thread.start()

    def stop(self) -> None:
        """Send the offline state (if connected), disconnect, end the threads."""
        self._stopped.set()
        self._command(("stop",))
        self._pump_thread.join(8)
        self._beat_thread.join(3)
        for s in (self._wake_r, self._wake_w):
            s.close()

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Before start(): (re)subscribed on every connect; `handler` runs on the pump thread,
        so it must only hand the message on (e.g. ConfigApplier.submit)."""
        self._handlers[topic_filter] = handler

    def resubscribe(self, topic_filter: str) -> None:
        """Subscribe `topic_filter` now, on this connection only (from any thread): the broker
        sends its retained messages again. Messages go to the handler of a subscribe() filter
        that covers it (the list updater's re-fetch of dropped chunks)."""
        self._command(("subscribe", topic_filter))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """A QoS 1 message outside the touch stream (e.g. a config ack). Best effort: with no
        connection it is dropped with a warning (its sender re-sends what must arrive)."""
        if not self.connected:
            log.warning("mqtt: not connected: %s not sent", topic)
            return
        self._command(("publish", topic, payload, retain))

    def notify(self) -> None:
        """A new touch is in the outbox."""
        self._command(("wake",))

    def publish_state(self) -> None:
        """Send the state message now (from any thread)."""
        self._command(("state",))

    def _command(self, cmd: tuple[Any, ...]) -> None:
        self._cmds.append(cmd)
        with contextlib.suppress(OSError):  # full (already woken) or closed (stopped)
            self._wake_w.send(b"x")

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected, "published": self.published,
                "refused": self.refused, "last_refusal": self.last_refusal,
                "acked_upto": self.acked_upto, "ack_ahead": self.ack_ahead,
                "ack_sub_refused": self.ack_sub_refused, "replays": self.replays,
                "connects": self.connects, "last_error": self.last_error}

    # -- connections: a fresh client each, backoff with jitter between them ---------------------
    def _new_client(self, gen: int) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device, protocol=mqtt.MQTTv5)
        ev = self._events.append
        c.on_connect = lambda _c, _u, _f, rc, _p: ev(("connected", gen, rc))
        c.on_publish = lambda _c, _u, mid, rc, _p: ev(("puback", gen, mid, rc))
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: ev(("suback", gen, rcs))
        c.on_message = lambda _c, _u, m: self._on_message(m.topic, bytes(m.payload), gen)
        # our own select() loop writes when paho has something to write: publish() only queues
        c.on_socket_register_write = lambda *_: None
        c.max_inflight_messages_set(0)  # the pump bounds the window; paho must not queue more
        if self.cfg.tls:
            c.tls_set(ca_certs=self.cfg.ca_file or None, certfile=self.cfg.cert_file or None,
                      keyfile=self.cfg.key_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        offline = {"v": 1, "dev": self.device, "site": self.site, "online": False}
        c.will_set(topics.state(self.site, self.device), cbor2.dumps(offline), qos=1, retain=True)
        return c

    def _on_message(self, topic: str, payload: bytes, gen: int) -> None:
        """Inside paho's loop_read: the ack goes to the pump's events; other subscriptions to
        their handlers."""
        if topic == self._ack_topic:
            self._events.append(("message", gen, topic, payload))
            return
        for topic_filter, handler in self._handlers.items():
            if mqtt.topic_matches_sub(topic_filter, topic):
                try:
                    handler(topic, payload)
                except Exception:  # noqa: BLE001 - a handler bug must not kill the link
                    log.exception("mqtt: handler for %s failed", topic_filter)

    def _pump(self) -> None:
        delay = self.backoff_min_s
        while not self._stopped.is_set():
            self._gen += 1
            c = self._new_client(self._gen)
            self._client = c
            self._events.clear()
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0  # the outbox, not the broker session, is our memory
            started = time.monotonic()
            try:
                rc = c.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                               clean_start=True, properties=props)
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    self._serve(c)
            except Exception as exc:  # noqa: BLE001 - socket, TLS, DNS: all mean "try later"
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.debug("mqtt: connection to %s:%d failed: %s", self.cfg.host, self.cfg.port,
                          exc)
            if self.connected and not self._stopped.is_set():
                log.warning("mqtt: disconnected; reconnecting")
            self.connected, self._inflight = False, {}
            with contextlib.suppress(Exception):
                c._sock_close()  # type: ignore[attr-defined]  # the old client is dropped
            if self._stopped.is_set():
                break
            if time.monotonic() - started > 2 * self.backoff_max_s:
                delay = self.backoff_min_s  # it was up for a good while: start over
            wait = delay * random.uniform(0.5, 1.0)  # "equal jitter"
            delay = min(delay * 2, self.backoff_max_s)
            self._idle(wait)

    def _idle(self, seconds: float) -> None:
        """Between connections: wait, still taking commands and keeping the outbox."""
        deadline = time.monotonic() + seconds
        while not self._stopped.is_set() and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(OSError, ValueError):
                select.select([self._wake_r], [], [], min(left, STATE_MIN_INTERVAL_S))
            self._drain_wake()
            self._commands(None)
            self._periodic(None, time.monotonic())

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _commands(self, c: mqtt.Client | None) -> None:
        while self._cmds:
            cmd = self._cmds.popleft()
            if cmd[0] == "state":
                self._state_due = True
            elif cmd[0] == "publish":
                if c is not None and self.connected:
                    c.publish(cmd[1], cmd[2], qos=1, retain=cmd[3])
                else:
                    log.warning("mqtt: not connected: %s not sent", cmd[1])
            elif cmd[0] == "subscribe" and c is not None and self.connected:
                c.subscribe(cmd[1], qos=1)  # offline: the next connect's retained delivery

    def _serve(self, c: mqtt.Client) -> None:
        """One connection: select() on paho's socket and the wake socket; paho's callbacks run
        here (no hand-off to another thread), the window is refilled right after a read."""
        sock = c.socket()
        _nodelay(sock)
        while sock is not None:
            if self._stopped.is_set():
                self._goodbye(c)
                return
            self._drain_wake()
            self._commands(c)
            now = time.monotonic()
            if self._events:
                events = self._events[:]
                self._events.clear()  # the same list: the callbacks hold its append
                self._handle(events, c, now)
            self._periodic(c, now)
            self._refill(c, now)
            if self._stopped.is_set():
                continue
            timeout = STATE_MIN_INTERVAL_S
            if self._hold_until:
                timeout = max(0.0, min(timeout, self._hold_until - now))
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                timeout = 0.0  # decrypted bytes wait inside the SSL object: select cannot see them
            try:
                r, w, _ = select.select([sock, self._wake_r], [sock] if c.want_write() else [],
                                        [], timeout)
            except (OSError, ValueError):
                return
            if (sock in r or timeout == 0.0) and c.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                return
            if c.want_write() and c.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                return
            if c.loop_misc() != mqtt.MQTT_ERR_SUCCESS or c.socket() is not sock:
                return

    def _goodbye(self, c: mqtt.Client) -> None:
        """Stopping: the offline state (retained), its PUBACK awaited briefly, DISCONNECT."""
        if self.connected:
            info = c.publish(topics.state(self.site, self.device),
                             cbor2.dumps({**self._state(), "online": False}), qos=1, retain=True)
            self._flush(c, lambda: info.is_published(), 2.0)
        c.disconnect()
        self._flush(c, lambda: not c.want_write(), 1.0)

    def _flush(self, c: mqtt.Client, done: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        sock = c.socket()
        while sock is not None and not done() and time.monotonic() < deadline:
            try:
                r, _, _ = select.select([sock], [sock] if c.want_write() else [], [], 0.05)
            except (OSError, ValueError):
                return
            if (r and c.loop_read() != mqtt.MQTT_ERR_SUCCESS) or \
                    (c.want_write() and c.loop_write() != mqtt.MQTT_ERR_SUCCESS):
                return
            sock = c.socket()

    # -- the pump's bookkeeping: events, state message, the window ------------------------------
    def _handle(self, events: list[tuple[Any, ...]], c: mqtt.Client, now: float) -> None:
        gen = self._gen
        for event in events:
            kind = event[0]
            if event[1] != gen:
                continue
            if kind == "puback":
                seq = self._inflight.pop(event[2], None)
                if seq is None:
                    continue
                rc: ReasonCode = event[3]
                if rc.is_failure:
                    self.refused += 1
                    self.last_refusal = f"{rc} ({rc.value})"
                    log.error("mqtt: broker refused touch seq %d: %s; kept, holding off %.0f s",
                              seq, self.last_refusal, self._holdoff)
                    self._hold_until = now + self._holdoff
                    self._holdoff = min(self._holdoff * 2, 300.0)
                    self._state_due = True
                else:
                    self.published += 1
            elif kind == "message":
                if event[2] == self._ack_topic and self._on_ack(event[3]):
                    self._last_progress, self._timeout = now, self.e2e_timeout_s
                    self._holdoff = self.refusal_holdoff_s
                    self._sent_upto = max(self._sent_upto, self.acked_upto)
            elif kind == "connected":
                rc = event[2]
                if rc.is_failure:
                    self.last_error = f"connect refused: {rc}"
                    log.warning("mqtt: connect refused: %s", rc)
                    continue
                self.connects += 1
                log.info("mqtt: connected to %s:%d", self.cfg.host, self.cfg.port)
                c.subscribe([(self._ack_topic, SubscribeOptions(qos=1))] +
                            [(f, SubscribeOptions(qos=1)) for f in self._handlers])
                self.connected, self._inflight = True, {}
                self._sent_upto = self.acked_upto  # replay the backlog in order
                self._ahead.clear()
                self._last_progress, self._timeout = now, self.e2e_timeout_s
                self._state_due = True
            elif kind == "suback" and any(rc.is_failure for rc in event[2]):
                self.ack_sub_refused = True
                log.error("mqtt: subscription to %s refused (%s): touches cannot be "
                          "acknowledged end to end and stay in the outbox",
                          self._ack_topic, event[2])
                self._state_due = True

    def _periodic(self, c: mqtt.Client | None, now: float) -> None:
        """At most once a second: the outbox's upkeep and the state message."""
        if now - self._last_state_check < STATE_MIN_INTERVAL_S:
            return
        self._last_state_check = now
        self.outbox.maintain()
        if self.connected and c is not None:
            st = self._state()
            sig = self._significant(st)
            if (self._state_due or sig != self._last_sent_state) and \
                    now - self._last_state_at >= STATE_MIN_INTERVAL_S:
                c.publish(topics.state(self.site, self.device), cbor2.dumps(st), qos=1,
                          retain=True)
                self._last_sent_state, self._last_state_at = sig, now
                self._state_due = False

    def _refill(self, c: mqtt.Client, now: float) -> None:
        if not self.connected or now < self._hold_until:
            return
        if self._hold_until:
            self._hold_until = 0.0
            if self._sent_upto > self.acked_upto:
                self.replays += 1
                log.warning("mqtt: retrying from seq %d after a refusal", self.acked_upto + 1)
                self._sent_upto, self._inflight = self.acked_upto, {}
                self._ahead.clear()
        elif (not self._inflight and self._sent_upto > self.acked_upto
              and now - self._last_progress > self._timeout):
            self.replays += 1
            log.warning("mqtt: no end-to-end acknowledgement beyond %d for %.0f s; replaying",
                        self.acked_upto, now - self._last_progress)
            self._sent_upto, self._last_progress = self.acked_upto, now
            self._ahead.clear()
            self._timeout = min(self._timeout * 2, 600.0)
        room = self.cfg.inflight - len(self._inflight)
        if room <= 0:
            return
        # refill as soon as a place is free, never in chunks: a publisher that waits for several
        # PUBACKs sends nothing meanwhile, so its TCP ACKs are delayed (~40 ms), while a broker
        # without TCP_NODELAY holds its next PUBACKs back until that ACK: a stall per window.
        # Rows are read ahead in batches (self._ahead), so this costs no query per PUBACK.
        was_idle = self._sent_upto <= self.acked_upto
        touch_topic = topics.touch(self.site, self.device)
        ahead = self._ahead
        while ahead and ahead[0][0] <= self._sent_upto:
            ahead.popleft()  # acknowledged meanwhile
        while room > 0:
            if not ahead:
                ahead.extend(self.outbox.pending(self._sent_upto, max(READ_AHEAD, room)))
                if not ahead:
                    break
            seq, payload = ahead.popleft()
            info = c.publish(touch_topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                ahead.clear()
                break  # connection lost; the next connect replays from the oldest
            self._inflight[info.mid] = seq
            self._sent_upto = seq
            room -= 1
        if was_idle and self._sent_upto > self.acked_upto:
            self._last_progress = now  # the e2e timeout counts from the first unacknowledged send

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
