"""paho-mqtt 2 helpers for operator commands: connect with a certificate, publish with a
checked PUBACK, take a snapshot of retained messages. Thin; no decisions here."""

from __future__ import annotations

import argparse
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ops.errors import OpsError


class MqttError(OpsError, RuntimeError):
    """Connection refused, a publish refused (reason code) or not acknowledged in time."""


@dataclass(frozen=True)
class BrokerOpts:
    host: str = "127.0.0.1"
    port: int = 8883
    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)


def add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="127.0.0.1:8883", metavar="HOST:PORT")
    p.add_argument("--ca", default="", help="CA certificate (enables TLS)")
    p.add_argument("--cert", default="", help="this operator's client certificate")
    p.add_argument("--key", default="", help="its private key")


def broker_opts(args: argparse.Namespace) -> BrokerOpts:
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--broker must be HOST:PORT, got {args.broker!r}")
    return BrokerOpts(host.strip("[]"), int(port), args.ca, args.cert, args.key)


def connect(opts: BrokerOpts, client_id: str = "", timeout: float = 10.0,
            on_message: Callable[[mqtt.MQTTMessage], None] | None = None) -> mqtt.Client:
    """An MQTT 5 client with its loop running; raises MqttError unless the CONNACK is a success."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if opts.tls:
        client.tls_set(ca_certs=opts.ca or None, certfile=opts.cert or None,
                       keyfile=opts.key or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        result["rc"] = rc
        done.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        result.setdefault("rc", rc)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    if on_message:
        client.on_message = lambda _c, _u, msg: on_message(msg)
    try:
        client.connect(opts.host, opts.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise MqttError(f"connect to {opts.host}:{opts.port}: {exc}") from None
    client.loop_start()
    if not done.wait(timeout) or not isinstance(result.get("rc"), ReasonCode) \
            or result["rc"].is_failure or not client.is_connected():
        client.loop_stop()
        raise MqttError(f"connect to {opts.host}:{opts.port} refused: "
                        f"{result.get('rc', f'no CONNACK within {timeout}s')}")
    return client


def publish(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False,
            timeout: float = 10.0) -> None:
    """QoS 1 and wait for the PUBACK; an ACL refusal (reason code >= 128) raises."""
    done = threading.Event()
    result: dict[str, ReasonCode] = {}
    info: list[Any] = []

    def on_publish(_c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        if info and mid == info[0].mid:
            result["rc"] = rc
            done.set()

    client.on_publish = on_publish
    info.append(client.publish(topic, payload, qos=1, retain=retain))
    if info[0].is_published():
        done.set()  # PUBACK raced ahead of our bookkeeping; on_publish still recorded it
    if not done.wait(timeout):
        raise MqttError(f"no PUBACK for {topic} within {timeout}s")
    rc = result.get("rc")
    if rc is not None and rc.is_failure:
        raise MqttError(f"broker refused {topic}: {rc}")


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

    client = connect(opts, client_id, timeout, on_message)
    try:
        subscribed = threading.Event()
        codes: list[ReasonCode] = []

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, rcs: list[ReasonCode],
                         _p: Any) -> None:
            codes.extend(rcs)
            subscribed.set()

        client.on_subscribe = on_subscribe
        client.subscribe(topic_filter, qos=1)
        if not subscribed.wait(timeout):
            raise MqttError(f"no SUBACK for {topic_filter}")
        if codes and codes[0].is_failure:
            raise MqttError(f"subscription to {topic_filter} refused: {codes[0]}")
        last[0] = time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if time.monotonic() - last[0] >= quiet_s:
                    break
            time.sleep(0.05)
        with lock:
            return dict(got)
    finally:
        client.disconnect()
        client.loop_stop()
