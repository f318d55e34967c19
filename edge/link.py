"""The MQTT link (paho-mqtt 2, MQTT 5 or 3.1.1): the adapter between paho, the outbox and the
sans-IO delivery core (edge/delivery.py), plus the state message.

Rules of this file (docs/delivery.md is the protocol; edge/delivery.py decides):

- One thread, the pump, drives paho's network I/O (a select() loop over paho's socket and a
  wake socket, calling loop_read / loop_write / loop_misc itself) and is the only caller of the
  delivery core. paho's callbacks run inside loop_read with paho's locks held, so they only
  append events to a list the pump feeds to the core right after; the window is refilled at
  once, with no hand-off between threads (a hand-off costs up to a GIL switch interval, 5 ms,
  each way). Other threads (the agent's notify(), the heartbeat, publish()) queue a command and
  write a byte to the wake socket.
- What to send, when to send it again and when to forget is the core's: this file carries out
  its actions (Publish: outbox rows, read ahead; Forget: Outbox.delete_upto; Replay: drop what
  was read ahead; Hold / AckAhead: log and report) and keeps no delivery bookkeeping of its own
  beyond the read-ahead rows.
- Every connection is a fresh paho client (no paho-internal resend between connections).
- Reconnect delays come from the core's Reconnect (every CONNACK starts over; a broker host
  refusing TCP is retried within mqtt.reconnect_fast_max_s). Every connection fault is logged
  once at WARNING in words, with the next attempt's time; repeats of the same cause are only
  counted; one line says when it is over. Expected faults log no traceback.
- MQTT 5 is the default; ``mqtt.protocol = "3.1.1"`` (a NATS node's gateway speaks nothing
  else) changes only the wire: a clean session instead of clean start with session expiry 0,
  plain QoS subscriptions instead of subscribe options. paho reports 3.1.1's CONNACK and SUBACK
  return codes as reason codes; a 3.1.1 PUBACK carries none, so there a refused touch shows only
  as an acknowledgement that does not come (replayed after ack_timeout_s, kept meanwhile).
- ``mqtt.brokers``: every failed or lost connection moves to the next broker of the list; the
  first one tried is picked by the device id, so a fleet spreads over a cluster's nodes.
- TLS files are checked when the link is made (ConfigError naming the key and the file): a
  device with a missing or mismatched key must not start. If the pump thread still dies, the
  link records why (``fatal``) and calls ``on_fatal``: the agent exits non-zero.
"""

import collections
import contextlib
import errno
import logging
import random
import select
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.config import ConfigError, MqttConfig
from edge.delivery import (
    CAUSES,
    AckAhead,
    Action,
    Cause,
    Delivery,
    FaultLog,
    Forget,
    Hold,
    Policy,
    Publish,
    Reconnect,
    Replay,
    Why,
)
from edge.outbox import Outbox
from protocol import topics
from protocol.ack import AckError, decode_ack_msg

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


def check_tls_files(cfg: MqttConfig) -> None:
    """Raise ConfigError (one line: key, file, what to do) unless mqtt.ca_file, cert_file and
    key_file can be read and the key matches the certificate. No-op without TLS."""
    if not cfg.tls:
        return
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg, key)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise ConfigError(f"mqtt.{key}: {path} does not exist: put the device's file there "
                              "(ccus ops device add writes them) or fix the path") from None
        except IsADirectoryError:
            raise ConfigError(f"mqtt.{key}: {path} is a folder, not a PEM file") from None
        except OSError as exc:
            raise ConfigError(f"mqtt.{key}: cannot read {path} ({exc.strerror}): the agent's user "
                              "needs read access") from None
    if bool(cfg.cert_file) != bool(cfg.key_file):
        raise ConfigError("mqtt.cert_file and mqtt.key_file: set both or neither")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cfg.ca_file:
        try:
            ctx.load_verify_locations(cafile=cfg.ca_file)
        except ssl.SSLError:
            raise ConfigError(f"mqtt.ca_file: {cfg.ca_file} holds no PEM CA certificate") from None
    if cfg.cert_file:
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        except ssl.SSLError as exc:
            what = ("does not match the certificate " + cfg.cert_file
                    if "KEY_VALUES_MISMATCH" in str(exc) else
                    f"or {cfg.cert_file} is not a PEM key/certificate ({exc.reason})")
            raise ConfigError(f"mqtt.key_file: {cfg.key_file} {what}: install the device's own "
                              "key and certificate pair") from None


_CERT_ALERTS = ("BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA", "CERTIFICATE_REVOKED",
                "CERTIFICATE_EXPIRED", "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE")


def classify(exc: BaseException | None, text: str = "", *, tls: bool = False) -> tuple[Cause, str]:
    """A failed connection in words: (cause, detail). `text` is paho's last error message when
    the failure surfaced inside paho (it turns socket errors into a return code); `tls`: the
    attempt was a TLS one (a peer that hangs up during connect() then is no TLS listener)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Cause.TLS_VERIFY, exc.verify_message or str(exc)
    reason = (getattr(exc, "reason", None) or "") if isinstance(exc, ssl.SSLError) else ""
    words = f"{reason} {text}".upper()
    if any(a in words for a in _CERT_ALERTS) and "ALERT" in words:
        return Cause.BAD_CERT, (reason or text).strip()
    if "CERTIFICATE_VERIFY_FAILED" in words:
        return Cause.TLS_VERIFY, (reason or text).strip()
    if isinstance(exc, ssl.SSLError):
        return Cause.TLS, reason or str(exc)
    if tls and isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return Cause.TLS, f"the broker hung up during the TLS handshake ({exc})"
    if isinstance(exc, ConnectionRefusedError):
        return Cause.REFUSED, str(exc)
    if isinstance(exc, socket.gaierror):
        return Cause.UNKNOWN_HOST, str(exc)
    if isinstance(exc, TimeoutError):
        return Cause.TIMEOUT, str(exc) or "no answer"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return Cause.UNREACHABLE, str(exc)
    if exc is None:
        return Cause.OTHER, text
    return Cause.OTHER, f"{type(exc).__name__}: {exc}"


class _PahoErrors(logging.Handler):
    """Keeps paho's last error line (e.g. "failed to receive on socket: [SSL: ...]") for the
    link's fault report. Through a logger at ERROR, not on_log: with on_log set, paho formats
    a debug line for every packet (half the link's throughput)."""

    def __init__(self, link: "Link") -> None:
        super().__init__(logging.ERROR)
        self.link = link

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.link._paho_error = record.getMessage()


class Link:
    """Owns the paho clients, the pump thread (which also drives paho's network I/O) and the
    heartbeat. Keyword arguments override the mqtt config's timing keys (tests use short ones)."""

    def __init__(self, cfg: MqttConfig, site: str, device: str, outbox: Outbox,
                 state: Callable[[], dict[str, Any]], *, backoff_min_s: float | None = None,
                 backoff_max_s: float | None = None, e2e_timeout_s: float | None = None,
                 refusal_holdoff_s: float = 5.0,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        check_tls_files(cfg)
        self.cfg, self.site, self.device, self.outbox = cfg, site, device, outbox
        self._state = state
        self.on_fatal = on_fatal
        self.fatal: str | None = None  # why the pump thread ended for good
        timeout = cfg.ack_timeout_s if e2e_timeout_s is None else e2e_timeout_s
        self.core = Delivery(Policy(inflight=cfg.inflight, ack_timeout_s=timeout,
                                    ack_timeout_max_s=max(timeout, cfg.ack_timeout_max_s),
                                    holdoff_s=refusal_holdoff_s))
        lo = cfg.reconnect_min_s if backoff_min_s is None else backoff_min_s
        hi = cfg.reconnect_max_s if backoff_max_s is None else backoff_max_s
        self.reconnect = Reconnect(lo, max(lo, hi), max(lo, min(hi, cfg.reconnect_fast_max_s)))
        self.faults = FaultLog()
        self._end: tuple[Cause, str] | None = None  # why this connection ended (_serve, _handle)
        self.connected = False
        self.ack_sub_refused = False
        self.connects = 0
        self.last_error = ""
        # from other threads to the pump: commands, then a byte on the wake socket
        self._cmds: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # paho callbacks run on the pump thread (inside loop_read): they only append here
        self._events: list[tuple[Any, ...]] = []
        self._paho_error = ""  # paho's last error log line (it turns socket errors into codes)
        self._paho_log = logging.Logger("edge.link.paho", logging.ERROR)  # outside the tree
        self._paho_log.addHandler(_PahoErrors(self))
        self._stopped = threading.Event()
        self._gen = 0
        self._client: mqtt.Client | None = None
        self._ack_topic = topics.touch_ack(site, device)
        self._v5 = cfg.protocol == "5"
        self._endpoints = cfg.endpoints()
        self._at = zlib.crc32(device.encode()) % len(self._endpoints)  # the broker tried next
        self._handlers: dict[str, Callable[[str, bytes], None]] = {}  # filter -> handler
        self._ahead: collections.deque[tuple[int, bytes]] = collections.deque()  # read, not sent
        self._last_state_check = 0.0
        self._last_sent_state: dict[str, Any] | None = None
        self._last_state_at = 0.0
        self._state_due = False
        self._pump_thread = threading.Thread(target=self._pump, name="mqtt-pump", daemon=True)
        self._beat_thread = threading.Thread(target=self._beat, name="mqtt-state", daemon=True)

    # the core's counters, under the names the state message and the tests know
    published = property(lambda self: self.core.published)
    refused = property(lambda self: self.core.refused)
    last_refusal = property(lambda self: self.core.last_refusal)
    acked_upto = property(lambda self: self.core.acked)
    ack_ahead = property(lambda self: self.core.ack_ahead)
    replays = property(lambda self: self.core.replays)

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
                "connects": self.connects, "last_error": self.last_error,
                "broker": self.broker}

    # -- connections: a fresh client each, backoff with jitter between them ---------------------
    @property
    def broker(self) -> str:
        """HOST:PORT of the broker of this connection (or the next attempt)."""
        host, port = self._endpoints[self._at]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _new_client(self, gen: int) -> mqtt.Client:
        if self._v5:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device,
                            protocol=mqtt.MQTTv5)
        else:
            # a clean session: the outbox, not the broker session, is our memory (as session
            # expiry 0 in MQTT 5); no reconnect_on_failure: paho would otherwise retry inside
            # loop_read on a "refused: protocol version" CONNACK, with MQTT 3.1
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device,
                            protocol=mqtt.MQTTv311, clean_session=True,
                            reconnect_on_failure=False)
        ev = self._events.append
        c.on_connect = lambda _c, _u, _f, rc, _p: ev(("connected", gen, rc))
        c.on_publish = lambda _c, _u, mid, rc, _p: ev(("puback", gen, mid, rc))
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: ev(("suback", gen, rcs))
        c.on_message = lambda _c, _u, m: self._on_message(m.topic, bytes(m.payload), m.retain,
                                                          gen)
        c.enable_logger(self._paho_log)  # errors only: see _PahoErrors
        # our own select() loop writes when paho has something to write: publish() only queues
        c.on_socket_register_write = lambda *_: None
        c.max_inflight_messages_set(0)  # the core bounds the window; paho must not queue more
        if self.cfg.tls:
            try:
                c.tls_set(ca_certs=self.cfg.ca_file or None,
                          certfile=self.cfg.cert_file or None,
                          keyfile=self.cfg.key_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ValueError):  # the files changed since start: say which one
                check_tls_files(self.cfg)
                raise
        offline = {"v": 1, "dev": self.device, "site": self.site, "online": False}
        c.will_set(topics.state(self.site, self.device), cbor2.dumps(offline), qos=1, retain=True)
        return c

    def _on_message(self, topic: str, payload: bytes, retained: bool, gen: int) -> None:
        """Inside paho's loop_read: the ack goes to the pump's events; other subscriptions to
        their handlers."""
        if topic == self._ack_topic:
            self._events.append(("message", gen, topic, payload, retained))
            return
        for topic_filter, handler in self._handlers.items():
            if mqtt.topic_matches_sub(topic_filter, topic):
                try:
                    handler(topic, payload)
                except Exception:  # noqa: BLE001 - a handler bug must not kill the link
                    log.exception("mqtt: handler for %s failed", topic_filter)

    def _pump(self) -> None:
        try:
            self._pump_loop()
        except ConfigError as exc:
            self._die(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: the agent must not run without a link
            log.exception("mqtt: the link's pump thread failed")
            self._die(f"the MQTT link stopped: {type(exc).__name__}: {exc}")

    def _die(self, why: str) -> None:
        self.fatal = why
        self.connected = False
        log.critical("mqtt: %s", why)
        if self.on_fatal is not None:
            self.on_fatal(why)

    def _connect(self, c: mqtt.Client) -> int:
        host, port = self._endpoints[self._at]
        if not self._v5:
            return int(c.connect(host, port, keepalive=self.cfg.keepalive_s))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0  # the outbox, not the broker session, is our memory
        return int(c.connect(host, port, keepalive=self.cfg.keepalive_s, clean_start=True,
                             properties=props))

    def _subscribe(self, c: mqtt.Client, filters: list[str]) -> None:
        qos = self.cfg.subscribe_qos
        if self._v5:
            c.subscribe([(f, SubscribeOptions(qos=qos)) for f in filters])
        else:
            c.subscribe([(f, qos) for f in filters])

    def _pump_loop(self) -> None:
        while not self._stopped.is_set():
            where = self.broker
            self._gen += 1
            c = self._new_client(self._gen)
            self._client = c
            self._events.clear()
            self._paho_error = ""
            self._end = None
            bug: Exception | None = None
            try:
                rc = self._connect(c)
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    self._serve(c)
                else:
                    self._end = (Cause.OTHER, mqtt.error_string(rc))
            except (OSError, ValueError) as exc:  # socket, TLS, DNS: all mean "try later"
                self._end = classify(exc, tls=self.cfg.tls)
            except Exception as exc:  # noqa: BLE001 - unexpected (outbox, a bug): retried too,
                # as before; its traceback is logged with the first warning
                self._end = (Cause.OTHER, f"{type(exc).__name__}: {exc}")
                bug = exc
            was_connected = self.connected
            self.connected = False
            self.core.disconnected(time.monotonic())
            self._ahead.clear()
            with contextlib.suppress(Exception):
                c._sock_close()  # type: ignore[attr-defined]  # the old client is dropped
            if self._stopped.is_set():
                break
            cause, detail = self._end or (Cause.OTHER, self._paho_error or "closed")
            if was_connected and cause is not Cause.CONNACK:
                cause = Cause.LOST
            self.last_error = f"{CAUSES[cause][0]}: {detail}"
            wait = self.reconnect.failed(cause, random.random())
            self._at = (self._at + 1) % len(self._endpoints)  # the next broker (a cluster node)
            self._report_failure(cause, detail, wait, where, was_connected, bug)
            self._idle(wait)

    def _report_failure(self, cause: Cause, detail: str, wait: float, where: str,
                        was_connected: bool, bug: Exception | None = None) -> None:
        words, hint, _ = CAUSES[cause]
        loud = self.faults.failed(cause, detail, time.monotonic())
        at = time.strftime("%H:%M:%S", time.gmtime(time.time() + wait)) + " UTC"
        what = (f"connection to {where} lost ({detail})" if was_connected else
                f"cannot connect to {where}: {words} ({detail})")
        if len(self._endpoints) > 1:
            at += f", at {self.broker}"  # _at has moved on: the next broker of the list
        if loud:
            log.warning("mqtt: %s%s; next attempt in %.3g s (%s)%s", what,
                        f"; {hint}" if hint and not was_connected else "", wait, at,
                        "" if self.faults.failures <= 1 else
                        f", {self.faults.failures} failures so far", exc_info=bug)
        else:
            log.debug("mqtt: %s; next attempt in %.3g s", what, wait)

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
                self._subscribe(c, [cmd[1]])  # offline: the next connect's retained delivery

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
            if self.connected:
                self._carry_out(self.core.tick(now), c)
            if self._stopped.is_set():
                continue
            timeout = STATE_MIN_INTERVAL_S
            due = self.core.next_timer(now) if self.connected else None
            if due is not None:
                timeout = min(timeout, due)
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                timeout = 0.0  # decrypted bytes wait inside the SSL object: select cannot see them
            try:
                r, w, _ = select.select([sock, self._wake_r], [sock] if c.want_write() else [],
                                        [], timeout)
            except (OSError, ValueError):
                return
            if (sock in r or timeout == 0.0) and (rc := c.loop_read()) != mqtt.MQTT_ERR_SUCCESS:
                return self._lost(rc)
            if c.want_write() and (rc := c.loop_write()) != mqtt.MQTT_ERR_SUCCESS:
                return self._lost(rc)
            if (rc := c.loop_misc()) != mqtt.MQTT_ERR_SUCCESS or c.socket() is not sock:
                return self._lost(rc)

    def _lost(self, rc: int) -> None:
        """Why the connection ended, in words, unless a CONNACK refusal said it already."""
        if self._end is not None:
            return
        text = self._paho_error or mqtt.error_string(rc)
        if self.connected:
            self._end = (Cause.LOST, text)
            return
        cause, _ = classify(None, text)
        if cause is Cause.OTHER:
            # closed before CONNACK: without TLS, most often plain MQTT to a TLS port; with TLS
            # (handshake done), the broker checked our certificate after the handshake and hung
            # up (TLS 1.3, or an alert that came after an EOF)
            cause = Cause.BAD_CERT if self.cfg.tls else Cause.TLS
            text = f"closed by the broker before CONNACK ({text})"
        self._end = (cause, text)

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

    # -- events in, the core's actions out ---------------------------------------------------
    def _handle(self, events: list[tuple[Any, ...]], c: mqtt.Client, now: float) -> None:
        gen = self._gen
        for event in events:
            kind = event[0]
            if event[1] != gen:
                continue
            if kind == "puback":
                rc: ReasonCode = event[3]
                failed = rc.is_failure
                self._carry_out(self.core.puback(event[2], failed,
                                                 f"{rc} ({rc.value})" if failed else "", now), c)
            elif kind == "message":
                self._on_ack(event[3], event[4], now, c)
            elif kind == "connected":
                self._on_connack(event[2], c, now)
            elif kind == "suback" and any(rc.is_failure for rc in event[2]):
                self.ack_sub_refused = True
                log.error("mqtt: subscription to %s refused (%s): touches cannot be "
                          "acknowledged end to end and stay in the outbox",
                          self._ack_topic, event[2])
                self._state_due = True

    def _on_connack(self, rc: ReasonCode, c: mqtt.Client, now: float) -> None:
        if rc.is_failure:
            self._end = (Cause.CONNACK, f"{rc} ({rc.value})")
            return  # the broker closes the connection; _pump_loop reports it
        self.connects += 1
        self.reconnect.connected()
        where = self.broker
        over = self.faults.recovered(now)
        if over is None:
            log.info("mqtt: connected to %s", where)
        else:
            down, failures, cause = over
            log.warning("mqtt: connected to %s again after %.1f s down (%d failure%s, last: "
                        "%s)", where, down, failures, "" if failures == 1 else "s",
                        CAUSES[cause][0])
        self.last_error = ""
        self._subscribe(c, [self._ack_topic, *self._handlers])
        self.connected = True
        self._carry_out(self.core.connected(now), c)
        self._state_due = True

    def _on_ack(self, payload: bytes, retained: bool, now: float, c: mqtt.Client) -> None:
        """The sink's end-to-end acknowledgement."""
        try:
            msg = decode_ack_msg(payload)
        except AckError as exc:
            log.error("mqtt: malformed end-to-end acknowledgement ignored: %s", exc)
            return
        made = self.outbox.next_seq() - 1
        self._carry_out(self.core.ack(msg.upto, msg.epoch, made, now, retained), c)

    def _carry_out(self, actions: list[Action], c: mqtt.Client) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self._send(c, a)
            elif isinstance(a, Forget):
                self.outbox.delete_upto(a.upto)
            elif isinstance(a, Replay):
                self._ahead.clear()
                if a.why is Why.REFUSAL:
                    log.warning("mqtt: retrying from seq %d after a refusal", a.start)
                elif a.why is Why.ACK_TIMEOUT:
                    log.warning("mqtt: no end-to-end acknowledgement beyond %d for %.0f s; "
                                "replaying", a.start - 1, a.waited_s)
                elif a.why is Why.SINK_EPOCH:
                    log.warning("mqtt: the sink subscribed again (new epoch %s); replaying from "
                                "seq %d", self.core.epoch, a.start)
            elif isinstance(a, Hold):
                log.error("mqtt: broker refused touch seq %d: %s; kept, holding off %.0f s",
                          a.seq, a.reason, a.seconds)
                self._state_due = True
            elif isinstance(a, AckAhead):
                # the sink has seqs this device never made: the outbox was reset or restored
                log.critical("mqtt: the sink acknowledges seq %d but this device made only %d: "
                             "outbox reset? seqs may be reused; nothing deleted", a.upto, a.made)

    def _send(self, c: mqtt.Client, want: Publish) -> None:
        # refill as soon as a place is free, never in chunks: a publisher that waits for several
        # PUBACKs sends nothing meanwhile, so its TCP ACKs are delayed (~40 ms), while a broker
        # without TCP_NODELAY holds its next PUBACKs back until that ACK: a stall per window.
        # Rows are read ahead in batches (self._ahead), so this costs no query per PUBACK.
        ahead, room, after = self._ahead, want.count, want.after
        while ahead and ahead[0][0] <= after:
            ahead.popleft()  # acknowledged meanwhile
        touch_topic = topics.touch(self.site, self.device)
        now = time.monotonic()
        while room > 0:
            if not ahead:
                ahead.extend(self.outbox.pending(after, max(READ_AHEAD, room)))
                if not ahead:
                    break
            seq, payload = ahead.popleft()
            info = c.publish(touch_topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                ahead.clear()
                break  # connection lost; the next connect replays from the oldest
            self.core.sent(seq, info.mid, now)
            after = seq
            room -= 1

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
