"""`ccus ops config push`: TOML overlay -> checked -> signed envelope -> retained -> acks.

Versions default to the issue time in milliseconds, so site-wide and per-device pushes share
one ordering and a later push always outranks an earlier one without bookkeeping.

An ack is attributed to the device whose topic it came on (`ccus/v1/{site}/{dev}/config/ack`:
the broker's ACL lets only that device publish there), never to the `dev` or `site` written in
its payload; an ack whose payload names another device or site than its topic is refused and
counted (`mismatched`), so one device cannot answer for another.
"""

from __future__ import annotations

import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge import config_apply
from edge.config import ConfigError, from_dict
from ops.mqttc import BrokerOpts, publish, session, subscribe
from protocol import topics

PLACEHOLDER_DEV = "preflight"


@dataclass
class PushResult:
    topic: str
    version: int
    acks: dict[str, dict[str, Any]]   # device (from the topic) -> its ack for this version
    mismatched: dict[str, int] = field(default_factory=dict)  # topic device -> refused acks
    expected: list[str] = field(default_factory=list)  # devices that should answer

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.expected) - set(self.acks))

    @property
    def refused(self) -> dict[str, dict[str, Any]]:
        return {d: a for d, a in self.acks.items() if a.get("result") != "applied"}


def attribute(topic: str, payload: bytes, site: str, version: int) -> tuple[str, str, Any]:
    """What one config-ack message says, judged by its topic: ("ack", dev, ack) for an ack of
    this version, ("mismatch", dev, ack) when the payload speaks for another device or site
    than the topic, ("ignore", dev or "", None) for anything else (other versions, junk)."""
    where = topics.parse_config_ack(topic)
    if where is None or where[0] != site:
        return "ignore", "", None
    dev = where[1]
    try:
        ack = cbor2.loads(payload)
    except Exception:  # noqa: BLE001 - any undecodable ack is junk here, not a crash
        return "ignore", dev, None
    if not isinstance(ack, dict):
        return "ignore", dev, None
    if ack.get("dev", dev) != dev or ack.get("site", site) != site:
        return "mismatch", dev, ack
    if ack.get("version") != version or isinstance(ack.get("version"), bool):
        return "ignore", dev, None
    return "ack", dev, ack


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
         dev: str | None, wait_s: float = 0.0, client_id: str = "",
         expected: list[str] | None = None) -> PushResult:
    """Publish retained (PUBACK checked); then collect acks for this version for `wait_s`
    (until every expected device answered: `dev`, or `expected` for a site push; without
    `expected` the whole window, every device that answers)."""
    want = sorted({dev} if dev is not None else set(expected or ()))
    res = PushResult(topic, version, {}, {}, want)
    done = threading.Event()
    lock = threading.Lock()

    def on_message(msg: mqtt.MQTTMessage) -> None:
        kind, who, ack = attribute(msg.topic, bytes(msg.payload), site, version)
        with lock:
            if kind == "mismatch":
                res.mismatched[who] = res.mismatched.get(who, 0) + 1
            elif kind == "ack" and (dev is None or who == dev):
                res.acks[who] = ack
            if want and set(want) <= set(res.acks):
                done.set()

    with session(opts, client_id, on_message=on_message) as client:
        if wait_s > 0:
            subscribe(client, topics.config_ack(site, dev or "+"))
        publish(client, topic, payload, retain=True)
        if wait_s > 0:
            done.wait(wait_s)
        with lock:
            return PushResult(topic, version, dict(res.acks), dict(res.mismatched), want)
