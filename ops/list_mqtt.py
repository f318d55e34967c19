"""paho-mqtt 2 adapter for ID lists: publish messages (QoS 1, checked PUBACKs, bounded
in flight) and route a device's list subscription into a ListUpdater. No logic of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge.idlist.dist import Message, subscription
from edge.idlist.updater import ListUpdater, Outcome
from ops.errors import OpsError


class PublishError(OpsError, RuntimeError):
    """The broker refused or did not acknowledge a message."""


class Progress(Protocol):
    def update(self, n: int) -> Any: ...


def parse_broker(spec: str, default_port: int = 1883) -> tuple[str, int]:
    """'host:port' (or 'host') -> (host, port)."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, default_port
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"broker must be host:port, got {spec!r}")
    return host.strip("[]"), int(port)


def connect(host: str, port: int, *, client_id: str = "", timeout: float = 10.0) -> mqtt.Client:
    """An MQTT 5 client, connected (CONNACK checked), network loop running."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    done = threading.Event()
    result: dict[str, ReasonCode] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        result["rc"] = rc
        done.set()

    client.on_connect = on_connect
    rc = client.connect(host, port, keepalive=60)  # raises OSError if nobody listens
    if rc != mqtt.MQTT_ERR_SUCCESS:
        raise PublishError(f"connect to {host}:{port}: {mqtt.error_string(rc)}")
    client.loop_start()
    if not done.wait(timeout) or result["rc"].is_failure:
        client.loop_stop()
        client.disconnect()
        why = result.get("rc", f"no CONNACK within {timeout}s")
        raise PublishError(f"connect to {host}:{port} refused: {why}")
    return client


def publish_all(client: mqtt.Client, messages: Iterable[Message], *, window: int = 32,
                timeout: float = 30.0, progress: Progress | None = None) -> int:
    """Publish QoS 1 in order with at most `window` unacknowledged; raise PublishError on a
    failure reason code (e.g. 135 not authorized, 149 packet too large) or when no PUBACK
    comes within `timeout` s. Returns the number of messages acknowledged."""
    cond = threading.Condition()
    acked: dict[int, ReasonCode] = {}
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
            old_disconnect(c, u, f, rc, p)

    def drain(limit: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for mid in [m for m in inflight if m in acked]:
                rc, topic = acked.pop(mid), inflight.pop(mid)
                if rc.is_failure:
                    raise PublishError(f"broker refused {topic}: {rc} ({rc.value})")
            if len(inflight) <= limit:
                return
            if closed:
                raise PublishError(f"broker closed the connection ({closed[0]}) with "
                                   f"{len(inflight)} messages unacknowledged")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PublishError(f"no PUBACK within {timeout}s for {len(inflight)} messages")
            cond.wait(left)

    client.on_publish, client.on_disconnect = on_publish, on_disconnect
    count = 0
    try:
        for m in messages:
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


def attach_updater(client: mqtt.Client, updater: ListUpdater,
                   on_outcome: Callable[[Outcome], Any] | None = None, *,
                   subscribe: bool = True, executor: Executor | None = None) -> str:
    """Route `ccus/v1/list/{name}/#` into `updater.handle` (serialised) and subscribe QoS 1.

    Without an executor, messages are handled on paho's network thread (a big delta stalls
    that client for its apply time); pass a single-worker ThreadPoolExecutor to keep the
    link responsive (one worker keeps the order). Returns the filter: subscribe it again in
    on_connect when the session is not persistent."""
    topic = subscription(updater.name)
    lock = threading.Lock()

    def process(topic_: str, payload: bytes) -> None:
        with lock:
            outcomes = updater.handle(topic_, payload)
        for o in outcomes:
            if o.fetch:  # chunks dropped before their manifest: the broker sends them again
                client.subscribe(o.fetch, qos=1)
        if on_outcome is not None:
            for o in outcomes:
                on_outcome(o)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if executor is None:
            process(msg.topic, msg.payload)
        else:
            executor.submit(process, msg.topic, msg.payload)

    client.message_callback_add(topic, on_message)
    if subscribe:
        client.subscribe(topic, qos=1)
    return topic
