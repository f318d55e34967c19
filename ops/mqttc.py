"""The ONE MQTT client helper of every `ccus ops` command (paho-mqtt 2, MQTT 5 or 3.1.1, TLS
included).

Rules: every ops command that talks MQTT takes the same options through `add_broker_args`
(`--broker HOST:PORT`, default `DEFAULT_BROKER` = the cloud broker's TLS port, `--ca`,
`--cert`, `--key`, `--mqtt-protocol`: 5 for Mosquitto, 3.1.1 for the NATS cluster's MQTT
gateway, which speaks nothing newer) and turns them into a `BrokerOpts` with `broker_opts`;
every failure is an `MqttError` whose message is one line naming the broker and the cause
(refused, TLS verification, certificate refused, unknown host, no CONNACK), so the CLI prints
it and exits non-zero without a traceback. Thin: publishing with checked PUBACKs, a bounded
window, a snapshot of retained messages; no decisions here.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ops.errors import OpsError

if TYPE_CHECKING:  # the list code (and `cryptography`) only when a list is handled
    from edge.idlist.dist import Message
    from edge.idlist.updater import ListUpdater, Outcome

# every operator command's MQTT client id starts so: NATS's auth callout allows an operator's
# tools exactly these (ops/nats_auth.py)
OPS_CLIENT_PREFIX = "ccus-ops-"
TLS_PORT = 8883            # the cloud broker's listener (docs/operations.md, broker-config)
DEFAULT_BROKER = f"127.0.0.1:{TLS_PORT}"
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class MqttError(OpsError, RuntimeError):
    """Connection refused or failed, a publish refused (reason code) or not acknowledged."""


class PublishError(MqttError):
    """The broker refused or did not acknowledge a message."""


class Progress(Protocol):
    def update(self, n: int) -> Any: ...


@dataclass(frozen=True)
class BrokerOpts:
    host: str = "127.0.0.1"
    port: int = TLS_PORT
    ca: str = ""
    cert: str = ""
    key: str = ""
    protocol: str = "5"         # a key of PROTOCOLS

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def add_broker_args(p: argparse.ArgumentParser) -> None:
    """The broker options, the same for every ops command that talks MQTT."""
    p.add_argument("--broker", default=DEFAULT_BROKER, metavar="HOST:PORT",
                   help="broker address (default %(default)s: the cloud broker's TLS port)")
    p.add_argument("--ca", default="", help="CA certificate (PEM); enables TLS")
    p.add_argument("--cert", default="", help="this client's certificate (PEM)")
    p.add_argument("--key", default="", help="its private key (PEM)")
    p.add_argument("--mqtt-protocol", choices=sorted(PROTOCOLS), default="5",
                   help="MQTT version (default 5; 3.1.1 for the NATS cluster's MQTT gateway)")


def parse_broker(spec: str, default_port: int = TLS_PORT) -> tuple[str, int]:
    """'host:port' (or 'host', or '[v6]:port') -> (host, port); ValueError names the input."""
    host, sep, port = spec.rpartition(":")
    if not sep or (spec.startswith("[") and spec.endswith("]")):
        return spec.strip("[]"), default_port
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--broker must be HOST:PORT, got {spec!r}")
    return host.strip("[]"), int(port)


def broker_opts(args: argparse.Namespace) -> BrokerOpts:
    """BrokerOpts from the parsed options; a named file that is missing fails here, by name
    (paho would raise a bare FileNotFoundError later)."""
    host, port = parse_broker(args.broker)
    for flag in ("ca", "cert", "key"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise ValueError(f"--{flag} {path}: no such file")
    if bool(args.cert) != bool(args.key):
        raise ValueError("--cert and --key go together (the client certificate and its key)")
    if args.cert and not args.ca:
        raise ValueError("--cert needs --ca (the CA that signed the broker's certificate)")
    return BrokerOpts(host, port, args.ca, args.cert, args.key,
                      getattr(args, "mqtt_protocol", "5"))


def _cause(exc: BaseException) -> str:
    """One short phrase for why a connection failed, with what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate is not trusted ({exc.verify_message}); "
                "check --ca and that the host name is in the server certificate")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        hint = ("not a TLS port? drop --ca/--cert/--key or use the TLS port"
                if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE")
                else "client certificate refused or revoked?")
        return f"TLS handshake failed ({reason}): {hint}"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there: check host and port)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out (host unreachable or filtered)"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def connect(opts: BrokerOpts, client_id: str = "", timeout: float = 10.0,
            on_message: Callable[[mqtt.MQTTMessage], None] | None = None) -> mqtt.Client:
    """An MQTT client (5, or 3.1.1 as `opts.protocol` says) with its loop running; raises
    MqttError (one line, with the cause) unless the CONNACK is a success."""
    if opts.protocol == "3.1.1" and not client_id:
        # 3.1.1 lets a server refuse an empty client id; NATS's gateway keeps a session
        # (a JetStream stream entry) per id, so a fresh one per command, cleaned at the end
        client_id = f"{OPS_CLIENT_PREFIX}{uuid.uuid4().hex[:12]}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=PROTOCOLS[opts.protocol])
    where = f"broker {opts.address}"
    if opts.tls:
        try:
            client.tls_set(ca_certs=opts.ca or None, certfile=opts.cert or None,
                           keyfile=opts.key or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError) as exc:  # unreadable or mismatched PEM files
            raise MqttError(f"{where}: cannot load --ca/--cert/--key: {_cause(exc)}") from None
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        result["rc"] = rc
        done.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        result.setdefault("closed", rc)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    if on_message:
        client.on_message = lambda _c, _u, msg: on_message(msg)
    client.connect_timeout = timeout
    try:
        client.connect(opts.host, opts.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise MqttError(f"{where}: {_cause(exc)}") from None
    client.loop_start()
    ok = done.wait(timeout) and isinstance(result.get("rc"), ReasonCode) \
        and not result["rc"].is_failure and client.is_connected()
    if not ok:
        client.loop_stop()
        with contextlib.suppress(Exception):
            client.disconnect()
        if isinstance(result.get("rc"), ReasonCode):
            why = f"refused: {result['rc']}"
            if result["rc"].value in (1, 132) and opts.protocol == "5":  # 3.1.1 / 5 codes
                why += " (an MQTT 3.1.1 broker such as NATS's gateway? give --mqtt-protocol 3.1.1)"
        elif "closed" in result:
            why = ("closed the connection before CONNACK"
                   + (" (client certificate refused, revoked or expired?)" if opts.tls
                      else " (a TLS-only listener? give --ca/--cert/--key)")
                   + ("; NATS's gateway also does so while its session stream has no "
                      "leader (after a node's loss): try again in a few seconds"
                      if opts.protocol == "3.1.1" else ""))
        else:
            why = f"no CONNACK within {timeout:g}s" + (
                "" if opts.tls else " (a TLS port? give --ca/--cert/--key)")
        raise MqttError(f"{where}: {why}")
    return client


@contextlib.contextmanager
def session(opts: BrokerOpts, client_id: str = "", timeout: float = 10.0,
            on_message: Callable[[mqtt.MQTTMessage], None] | None = None
            ) -> Iterator[mqtt.Client]:
    """`with session(opts) as client:` connected, and disconnected cleanly afterwards."""
    client = connect(opts, client_id, timeout, on_message)
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def publish(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False,
            timeout: float = 10.0) -> None:
    """QoS 1 and wait for the PUBACK; an ACL refusal (reason code >= 128) raises."""
    from edge.idlist.dist import Message

    publish_all(client, [Message(topic, payload, retain)], window=1, timeout=timeout)


def publish_all(client: mqtt.Client, messages: Iterable[Message], *, window: int = 32,
                timeout: float = 30.0, progress: Progress | None = None) -> int:
    """Publish QoS 1 in order with at most `window` unacknowledged; raise PublishError on a
    failure reason code (e.g. 135 not authorized, 149 packet too large) or when no PUBACK
    comes within `timeout` s. Returns the number of messages acknowledged."""
    cond = threading.Condition()
    acked: dict[int, ReasonCode | None] = {}
    inflight: dict[int, str] = {}
    closed: list[Any] = []
    old, old_disconnect = client.on_publish, client.on_disconnect

    def on_publish(_c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with cond:
            acked[mid] = rc
            cond.notify_all()

    def on_disconnect(c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
        with cond:  # e.g. 149 packet too large: Mosquitto drops the connection, no PUBACK
            closed.append(rc)
            cond.notify_all()
        if old_disconnect is not None:
            old_disconnect(c, u, f, rc, p)  # type: ignore[call-arg,arg-type]  # paho's union

    def drain(limit: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for mid in [m for m in inflight if m in acked]:
                rc, topic = acked.pop(mid), inflight.pop(mid)
                if rc is not None and rc.is_failure:
                    raise PublishError(f"broker refused {topic}: {rc} ({rc.value})")
            if len(inflight) <= limit:
                return
            if closed:
                raise PublishError(f"broker closed the connection ({closed[0]}) with "
                                   f"{len(inflight)} messages unacknowledged")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PublishError(f"no PUBACK within {timeout:g}s for {len(inflight)} "
                                   "messages")
            cond.wait(left)

    client.on_publish, client.on_disconnect = on_publish, on_disconnect
    count = 0
    try:
        for m in messages:
            # never under `cond`: paho calls on_publish holding its message mutex, which
            # publish() takes too (a lock-order deadlock). A PUBACK that beats us to
            # `inflight` waits in `acked` until drain() matches it.
            info = client.publish(m.topic, m.payload, qos=1, retain=m.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise PublishError(f"publish {m.topic}: {mqtt.error_string(info.rc)}")
            with cond:
                inflight[info.mid] = m.topic
                drain(window - 1)
            count += 1
            if progress is not None:
                progress.update(len(m.payload))
        with cond:
            drain(0)
    finally:
        client.on_publish, client.on_disconnect = old, old_disconnect
    return count


def sub_qos(client: mqtt.Client) -> int:
    """QoS 1 on MQTT 5; 0 on 3.1.1, which here means NATS's gateway: there a QoS 1
    subscription is a replicated JetStream consumer made for the command (slow, and refused
    with 'Unspecified error' while the cluster is busy or electing), while retained messages,
    all an operator's command reads, come to a QoS 0 subscription as well."""
    return 0 if client.protocol == mqtt.MQTTv311 else 1


def subscribe(client: mqtt.Client, topic_filter: str, *, timeout: float = 10.0) -> None:
    """Subscribe (QoS `sub_qos`) and wait for the SUBACK; a refused subscription raises."""
    subscribed = threading.Event()
    codes: list[ReasonCode] = []

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, rcs: list[ReasonCode],
                     _p: Any) -> None:
        codes.extend(rcs)
        subscribed.set()

    old = client.on_subscribe
    client.on_subscribe = on_subscribe
    try:
        client.subscribe(topic_filter, qos=sub_qos(client))
        if not subscribed.wait(timeout):
            raise MqttError(f"no SUBACK for {topic_filter} within {timeout:g}s")
    finally:
        client.on_subscribe = old
    if codes and codes[0].is_failure:
        raise MqttError(f"subscription to {topic_filter} refused: {codes[0]}")


def snapshot(opts: BrokerOpts, topic_filter: str, *, quiet_s: float = 0.5, timeout: float = 10.0,
             client_id: str = "") -> dict[str, bytes]:
    """The retained messages under a filter: subscribe, then collect until quiet (bounded)."""
    got: dict[str, bytes] = {}
    last = [time.monotonic()]
    lock = threading.Lock()

    def on_message(msg: mqtt.MQTTMessage) -> None:
        with lock:
            if msg.retain:
                got[msg.topic] = bytes(msg.payload)
            last[0] = time.monotonic()

    with session(opts, client_id, timeout, on_message) as client:
        subscribe(client, topic_filter, timeout=timeout)
        last[0] = time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if time.monotonic() - last[0] >= quiet_s:
                    break
            time.sleep(0.05)
        with lock:
            return dict(got)


def attach_updater(client: mqtt.Client, updater: ListUpdater,
                   on_outcome: Callable[[Outcome], Any] | None = None, *,
                   subscribe: bool = True, executor: Executor | None = None) -> str:
    """Route `ccus/v1/list/{name}/#` into `updater.handle` (serialised) and subscribe:
    a list follower outside the agent (tests, a cache host). The agent has its own in
    edge/link.py.

    Without an executor, messages are handled on paho's network thread (a big delta stalls
    that client for its apply time); pass a single-worker ThreadPoolExecutor to keep the
    link responsive (one worker keeps the order). Returns the filter: subscribe it again in
    on_connect when the session is not persistent."""
    from edge.idlist.dist import subscription

    topic = subscription(updater.name)
    lock = threading.Lock()

    def process(topic_: str, payload: bytes) -> None:
        with lock:
            outcomes = updater.handle(topic_, payload)
        for o in outcomes:
            if o.fetch:  # chunks dropped before their manifest: the broker sends them again
                client.subscribe(o.fetch, qos=sub_qos(client))
        if on_outcome is not None:
            for o in outcomes:
                on_outcome(o)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if executor is None:
            process(msg.topic, bytes(msg.payload))
        else:
            executor.submit(process, msg.topic, bytes(msg.payload))

    client.message_callback_add(topic, on_message)
    if subscribe:
        client.subscribe(topic, qos=sub_qos(client))
    return topic
