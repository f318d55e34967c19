"""The sink's receiving process: an MQTT 5 shared subscription, PUBACK only after the commit.

Rules of this file:

- Two processes. The receiving process (this file) runs paho and nothing else heavy: one
  thread, one select() loop over the broker socket and a socket to the writer. The **writer
  process** (cloud_sink.ingest.writer) decodes, validates and writes (one transaction a batch)
  and keeps the end-to-end acknowledgement ledger (cloud_sink.acks); the two speak framed
  pickles over a socketpair (cloud_sink.ingest.pipe). Splitting them takes the decoding and
  the database calls off the interpreter lock that paho's receive path needs (on one
  interpreter the two starved each other: ~0.3 of what a bare paho subscriber drains).
- Batches go to the writer as raw (topic, payload) lists; the writer answers with the counts
  and the acknowledgements to publish **after** its commit. Only then does the receiving
  process send the broker the PUBACKs of that batch (paho ``manual_ack``) and publish the
  end-to-end acknowledgements (retained, QoS 1): a sink killed anywhere before that leaves the
  broker to redeliver (the session outlives the process), and insert-or-ignore on
  (device, seq) makes the redelivery harmless.
- Up to ``PIPELINE`` batches are with the writer at once, so it never waits for the network;
  batches are cut from whatever arrived meanwhile (at most ``batch_max``). The broker may have
  ``receive_max`` unacknowledged messages out to us (MQTT 5 Receive Maximum; without it
  Mosquitto sends only its max_inflight_messages, 100 in dev.conf, and every batch would wait
  for the commit of the one before).
- A PUBACK goes only to the connection the message came on; a batch committed after a
  reconnect is not acknowledged (the broker redelivers it, it is stored as a repeat and
  acknowledged then). A writer that dies is started again and given every batch not yet
  confirmed; a store error is retried every second in the writer, never fatal.
- It subscribes on every connect, whatever the session-present flag says (Mosquitto 2.0 does
  not restore a ``$share`` subscription after a kill -9), and each time the subscription is
  granted it takes a new **epoch** (milliseconds, strictly increasing) and publishes, retained,
  the current acknowledgement of every device the store knows with that epoch (the writer
  answers an ANNOUNCE). Every acknowledgement carries the epoch; a device that sees a new one
  replays what is unacknowledged at once (docs/delivery.md), so touches the broker accepted
  while no sink was subscribed come back within a second or so, not after the device's
  acknowledgement timeout.
"""

import contextlib
import logging
import select
import socket
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

from cloud_sink.ingest.pipe import ANNOUNCE, frame, start_writer, stop_writer, take_frames
from cloud_sink.model import BATCH_MAX, IngestResult, Policy
from protocol import topics
from protocol.ack import encode_ack

log = logging.getLogger(__name__)

PIPELINE = 2            # batches with the writer at once
# The sink's reconnect backoff. Short on purpose: while no sink is subscribed the broker drops
# every touch (after a kill -9 Mosquitto has no $share subscription), and devices replay only
# once the sink is back and announces its epoch; one sink per machine is no thundering herd.
# (It was 1 s doubling to 30 s: a broker down 5 s kept the sink away up to 4 s more.)
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 2.0


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


@dataclass
class _Batch:
    gen: int                                 # the connection its messages came on
    items: list[tuple[str, bytes]]           # (topic, payload)
    mids: list[tuple[int, int]]              # (mid, qos)
    frame: bytes = b""
    sent_at: float = 0.0                     # monotonic: handed to the writer
    epoch: int | None = None                 # an ANNOUNCE: publish under this epoch


class Sink:
    def __init__(self, store: Any, host: str, port: int, *, group: str = "sink",
                 client_id: str = "sink-1", batch_max: int = BATCH_MAX,
                 on_batch: Callable[[IngestResult], None] | None = None,
                 tls: "TlsFiles | None" = None, metrics: Any = None) -> None:
        self.store, self.host, self.port, self.group = store, host, port, group
        self.url: str = store.url
        self.policy: Policy = store.policy
        self.batch_max = batch_max
        self.receive_max = min(65_535, max(100, PIPELINE * 2 * batch_max))
        self.on_batch = on_batch
        self.totals = IngestResult()
        self.subscribed = threading.Event()
        self.gaps_opened = 0
        self.retained_dropped = 0
        self.batches = 0
        self.metrics = metrics          # cloud_sink.metrics.SinkMetrics or None
        self.epoch = 0                  # of the current subscription; 0: not yet subscribed
        self.announced = threading.Event()  # the acks of the current epoch are out
        self.writer_restarts = 0
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._gen = 0
        self._connected = False
        self._pending: list[tuple[str, bytes, int, int]] = []   # received, not yet with the writer
        self._sent: dict[int, _Batch] = {}                      # with the writer, not confirmed
        self._next_id = 0
        self._proc: Any = None
        self._wsock: socket.socket | None = None
        self._out = bytearray()    # frames for the writer not yet written
        self._in = bytearray()     # bytes from the writer not yet parsed
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        # our select() loop writes when paho has something queued: ack()/publish() only queue
        self._client.on_socket_register_write = lambda *_: None
        if tls is not None:  # the cloud broker: TLS only, identity from the client certificate
            self._client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key,
                                 tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self._thread = threading.Thread(target=self._run, name="sink-net", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._start_writer()
        self._thread.start()

    def stop(self) -> None:
        """Finish the batches the writer has (their PUBACKs and acknowledgements go out), then
        disconnect. Messages not yet handed to the writer stay unacknowledged: redelivered."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(10)
        self._stop_writer()
        for s in (self._wake_r, self._wake_w):
            s.close()

    # -- the writer process ---------------------------------------------------------------------
    def _start_writer(self) -> None:
        self._proc, parent = start_writer(self.url, self.policy)
        parent.setblocking(False)
        self._wsock, self._out, self._in = parent, bytearray(), bytearray()
        for b in self._sent.values():  # a restarted writer gets what the old one did not confirm
            self._out += b.frame

    def _stop_writer(self) -> None:
        stop_writer(self._proc, self._wsock)
        self._wsock = self._proc = None

    def _writer_lost(self) -> None:
        log.error("sink: the writer process ended (exit %s); starting it again",
                  self._proc.poll() if self._proc is not None else "?")
        self._stop_writer()
        self.writer_restarts += 1
        if self.metrics is not None:
            self.metrics.writer_restarts.inc()
        if not self._stop.is_set():
            time.sleep(0.5)
            self._start_writer()

    # -- paho callbacks (on the sink-net thread) ------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if rc.is_failure:
            log.error("sink: connect refused: %s", rc)
            return
        self._connected = True
        # always, session present or not: Mosquitto 2.0 loses a $share subscription on kill -9
        client.subscribe(topics.shared(self.group, topics.ALL_TOUCHES),
                         options=SubscribeOptions(qos=1))

    def _on_disconnect(self, *_: Any) -> None:
        self._connected = False

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[Any],
                      props: Any) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("sink: subscription refused: %s", rcs)
            return
        # a new epoch: every device learns that what it sent before now may have been dropped
        self.epoch = max(self.epoch + 1, int(time.time() * 1000))
        self.announced.clear()
        if self.metrics is not None:
            self.metrics.epoch.set(self.epoch)
        log.info("sink: subscribed to %s (epoch %d)",
                 topics.shared(self.group, topics.ALL_TOUCHES), self.epoch)
        self._next_id += 1
        b = _Batch(self._gen, [], [], epoch=self.epoch, sent_at=time.monotonic())
        b.frame = frame((self._next_id, ANNOUNCE))
        self._sent[self._next_id] = b
        self._out += b.frame
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        if m.retain:  # never a live touch: a device replaying one the broker kept (the broker
            # cannot refuse retain per topic; docs/security.md); acknowledged and dropped
            self.retained_dropped += 1
            log.warning("sink: dropped a retained touch on %s", m.topic)
            client.ack(m.mid, m.qos)
            return
        self._pending.append((m._topic.decode("utf-8", "replace"), m.payload, m.mid, m.qos))

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        c = self._client
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 24 * 3600  # the broker queues for us while we are down
        props.ReceiveMaximum = self.receive_max
        delay, first = RECONNECT_MIN_S, True
        while not self._stop.is_set():
            try:
                if first:
                    rc = c.connect(self.host, self.port, keepalive=30, clean_start=False,
                                   properties=props)
                else:
                    rc = c.reconnect()
            except (OSError, ssl.SSLError) as exc:
                rc = None
                log.warning("sink: cannot connect to %s:%d: %s", self.host, self.port, exc)
            if rc == mqtt.MQTT_ERR_SUCCESS:
                first = False
                self._gen += 1
                self._pending.clear()   # unacknowledged: the broker sends them again
                started = time.monotonic()
                self._serve()
                if time.monotonic() - started > 60:
                    delay = RECONNECT_MIN_S
                if self._stop.is_set():
                    break
                log.warning("sink: connection lost; reconnecting")
            self._idle(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
        self._finish()

    def _idle(self, seconds: float) -> None:
        """Wait (for a reconnect) while still taking the writer's answers."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self._pump_writer(min(left, 0.5))

    def _serve(self) -> None:
        c = self._client
        sock = c.socket()
        with contextlib.suppress(OSError, AttributeError):  # PUBACKs out at once, not after 40 ms
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        while not self._stop.is_set():
            if sock is None or c.socket() is not sock:
                return
            rl: list[Any] = [sock, self._wake_r]
            wl: list[Any] = [sock] if c.want_write() else []
            if self._wsock is not None:
                rl.append(self._wsock)
                if self._out:
                    wl.append(self._wsock)
            pending_tls = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            try:
                r, w, _ = select.select(rl, wl, [], 0 if pending_tls else 1.0)
            except (OSError, ValueError):
                return
            if self._wake_r in r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            if (sock in r or pending_tls) and c.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                c._sock_close()  # type: ignore[attr-defined]
                return
            if sock in w and c.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                c._sock_close()  # type: ignore[attr-defined]
                return
            if c.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                return
            if self._wsock is not None and (self._wsock in r or self._wsock in w):
                self._writer_io(self._wsock in r, self._wsock in w)
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand what arrived to the writer when it has room (the batch forms meanwhile)."""
        while (self._pending and sum(b.epoch is None for b in self._sent.values()) < PIPELINE
               and self._wsock is not None):
            take, self._pending = (self._pending[:self.batch_max],
                                   self._pending[self.batch_max:])
            self._next_id += 1
            b = _Batch(self._gen, [(t, p) for t, p, _, _ in take], [(m, q) for _, _, m, q in take],
                       sent_at=time.monotonic())
            b.frame = frame((self._next_id, b.items))
            self._sent[self._next_id] = b
            self._out += b.frame
            self._writer_io(False, True)

    def _pump_writer(self, timeout: float) -> None:
        if self._wsock is None:
            time.sleep(timeout)
            return
        wl = [self._wsock] if self._out else []
        r, w, _ = select.select([self._wsock, self._wake_r], wl, [], timeout)
        if self._wake_r in r:
            with contextlib.suppress(OSError):
                self._wake_r.recv(64)
        if self._wsock in r or self._wsock in w:
            self._writer_io(self._wsock in r, self._wsock in w)

    def _writer_io(self, readable: bool, writable: bool) -> None:
        ws = self._wsock
        assert ws is not None
        try:
            if writable and self._out:
                n = ws.send(self._out)
                del self._out[:n]
            if readable:
                while True:
                    chunk = ws.recv(1 << 16)
                    if not chunk:
                        raise ConnectionError("writer closed its socket")
                    self._in += chunk
                    if len(chunk) < 1 << 16:
                        break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._writer_lost()
            return
        for reply in take_frames(self._in):
            self._committed(*reply)

    def _committed(self, batch_id: int, counts: tuple[int, int, int, int],
                   acks: list[tuple[str, str, int]], gaps_opened: int,
                   extra: dict[str, Any] | None = None) -> None:
        """The writer committed a batch: PUBACK it (same connection only), then the acks."""
        b = self._sent.pop(batch_id, None)
        if b is None:
            return
        c = self._client
        extra = extra or {}
        if self.metrics is not None:
            self.metrics.batch_answered(b.epoch is None, time.monotonic() - b.sent_at, counts,
                                        extra)
        if b.epoch is not None:  # an ANNOUNCE: the acks of every known device, new epoch
            if b.gen == self._gen and self._connected and b.epoch == self.epoch:
                for site, device, upto in acks:
                    c.publish(topics.touch_ack(site, device), encode_ack(upto, self.epoch),
                              qos=1, retain=True)
                log.info("sink: epoch %d announced to %d devices", b.epoch, len(acks))
                self.announced.set()
            return
        if b.gen == self._gen and self._connected:
            for mid, qos in b.mids:
                c.ack(mid, qos)
            for site, device, upto in acks:
                c.publish(topics.touch_ack(site, device), encode_ack(upto, self.epoch or None),
                          qos=1, retain=True)
        res = IngestResult(*counts)
        self.batches += 1
        self.totals.add(res)
        self.gaps_opened += gaps_opened
        if self.on_batch:
            self.on_batch(res)

    def _finish(self) -> None:
        """Stopping: let the writer finish what it has (their PUBACKs go out), disconnect."""
        deadline = time.monotonic() + 5
        while self._sent and self._wsock is not None and time.monotonic() < deadline:
            wl = [self._wsock] if self._out else []
            r, w, _ = select.select([self._wsock], wl, [], 0.2)
            if r or w:
                self._writer_io(bool(r), bool(w))
        c = self._client
        with contextlib.suppress(Exception):
            c.disconnect()
            end = time.monotonic() + 2
            while c.want_write() and time.monotonic() < end and c.socket() is not None:
                c.loop_write()
                time.sleep(0.001)
        with contextlib.suppress(Exception):
            c._sock_close()  # type: ignore[attr-defined]
