"""`ccus ops config push`: TOML overlay -> checked -> signed envelope -> retained -> acks.

Versions default to the issue time in milliseconds, so site-wide and per-device pushes share
one ordering and a later push always outranks an earlier one without bookkeeping.
"""

from __future__ import annotations

import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge import config_apply
from edge.config import ConfigError, from_dict
from ops.mqttc import BrokerOpts, connect, publish
from protocol import topics

PLACEHOLDER_DEV = "preflight"


@dataclass
class PushResult:
    topic: str
    version: int
    acks: dict[str, dict[str, Any]]   # device -> its ack for this version


def load_overlay(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def preflight(site: str, body: dict[str, Any]) -> None:
    """Catch typos before anything is signed: the overlay on a minimal config must load.
    The device checks again against its own file (readers, profiles) and may still refuse."""
    base = {"device": {"id": PLACEHOLDER_DEV, "site": site}}
    bad = config_apply._touches_protected(body, base)  # same rule the device applies
    if bad:
        raise ConfigError(f"{bad} cannot be changed remotely")
    from_dict(config_apply.merge(base, body))


def build(key: Ed25519PrivateKey, site: str, dev: str | None, body: dict[str, Any], *,
          version: int | None = None, issued_ms: int | None = None,
          force: bool = False) -> tuple[str, int, bytes]:
    """(topic, version, payload) for a device, or for the whole site when `dev` is None.
    `force` (signed): devices apply it even if issued before their freshness window."""
    preflight(site, body)
    issued = int(time.time() * 1000) if issued_ms is None else issued_ms
    version = issued if version is None else version
    target = dev or config_apply.SITE_LEVEL
    payload = config_apply.encode(key, version=version, site=site, dev=target, body=body,
                                  issued_ms=issued, force=force)
    return topics.config(site, target), version, payload


def push(opts: BrokerOpts, topic: str, version: int, payload: bytes, *, site: str,
         dev: str | None, wait_s: float = 0.0, client_id: str = "") -> PushResult:
    """Publish retained (PUBACK checked); then collect acks for this version for `wait_s`
    (a device: until it answers; a site: the whole window, every device that answers)."""
    acks: dict[str, dict[str, Any]] = {}
    done = threading.Event()
    lock = threading.Lock()

    def on_message(msg: mqtt.MQTTMessage) -> None:
        try:
            ack = cbor2.loads(msg.payload)
        except Exception:  # a bad ack is not ours to judge here
            return
        if isinstance(ack, dict) and ack.get("version") == version:
            with lock:
                acks[str(ack.get("dev"))] = ack
            if dev is not None:
                done.set()

    client = connect(opts, client_id, on_message=on_message)
    try:
        if wait_s > 0:
            client.subscribe(topics.config_ack(site, dev or "+"), qos=1)
        publish(client, topic, payload, retain=True)
        if wait_s > 0:
            done.wait(wait_s)
        with lock:
            return PushResult(topic, version, dict(acks))
    finally:
        client.disconnect()
        client.loop_stop()
