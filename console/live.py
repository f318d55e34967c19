"""The console's MQTT link: retained device state (the fleet), list manifests, retained config
pushes and their acks (the operations page), and the touch stream, fanned out to the browsers'
server-sent-event queues.

Plain (non-shared) subscriptions: the console sees every touch without taking any from the
sinks' $share group. Retained touches are ignored (the sink drops them too); a touch sent
again (same device and seq, until the sink acknowledges it) shows once. paho's thread hands
messages to asyncio queues with call_soon_threadsafe; a slow browser loses touches (its queue
is bounded, QUEUE_MAX), never the broker connection, and each listener counts what it lost
(`Listener.dropped`) so the live page can say so.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from ops.mqttc import BrokerOpts, connect, sub_qos
from protocol import topics
from protocol.touch import TouchError, decode

log = logging.getLogger("ccus.console")
QUEUE_MAX = 1000
SEEN_MAX = 20_000   # (device, seq) remembered: a touch the agent sends again shows once
MANIFESTS = f"{topics.LIST_ROOT}/+/snapshot/manifest"


@dataclass(eq=False)
class Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    site: str | None          # touches of this site; None: fleet changes only
    dropped: int = 0          # items not queued because the queue was full (a slow browser)


class Bridge:
    """Holds the retained state and hands touches to listeners; `feed()` is the one input."""

    def __init__(self) -> None:
        self.states: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.configs: dict[str, bytes] = {}    # retained config pushes (site-wide and per device)
        self.acks: dict[str, bytes] = {}       # retained config acknowledgements, per device
        self.version = 0
        self._lock = threading.Lock()
        self._listeners: set[Listener] = set()
        self.client: mqtt.Client | None = None
        self.touches_seen = 0
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()

    # -- input (paho's thread, or a test) --------------------------------------------------
    def feed(self, topic: str, payload: bytes, retain: bool = False) -> None:
        kept = self._retained_config(topic)
        if kept is not None:
            with self._lock:
                if payload:
                    kept[topic] = payload
                else:
                    kept.pop(topic, None)   # a cleared retained push or ack
            return
        where = topics.parse_device_topic(topic)
        if where is None:
            if topic.startswith(topics.LIST_ROOT) and topic.endswith("/snapshot/manifest"):
                with self._lock:
                    if payload:
                        self.manifests[topic] = payload
                    else:
                        self.manifests.pop(topic, None)
            return
        site, _dev, kind = where
        if kind == topics.STATE:
            with self._lock:
                if payload:
                    self.states[topic] = payload
                else:
                    self.states.pop(topic, None)   # a cleared retained state: device removed
                self.version += 1
            self._send(lambda lst: lst.site is None, ("fleet", self.version))
        elif kind == topics.TOUCH and not retain:
            try:
                t = decode(payload)
            except (TouchError, ValueError):
                return  # the sink dead-letters it; the live page shows only what decodes
            if t.site != site:
                return
            key = (t.device, t.seq)
            with self._lock:
                # QoS 1 and the end-to-end ack resend a touch until the sink confirms it
                if key in self._seen:
                    return
                self._seen[key] = None
                if len(self._seen) > SEEN_MAX:
                    self._seen.popitem(last=False)
            self.touches_seen += 1
            self._send(lambda lst: lst.site == site, ("touch", t))

    def _retained_config(self, topic: str) -> dict[str, bytes] | None:
        """Which map keeps this topic: config acks, config pushes (`_site` included, which
        parse_device_topic refuses as a device id), or None for any other topic."""
        if topics.parse_config_ack(topic) is not None:
            return self.acks
        parts = topic.split("/")
        if len(parts) == 5 and parts[4] == topics.CONFIG and topic.startswith(topics.PREFIX + "/"):
            return self.configs
        return None

    def _send(self, want: Callable[[Listener], bool], item: Any) -> None:
        with self._lock:
            targets = [lst for lst in self._listeners if want(lst)]
        for lst in targets:
            lst.loop.call_soon_threadsafe(_offer, lst, item)

    # -- listeners (the event loop) --------------------------------------------------------
    def listen(self, site: str | None) -> Listener:
        lst = Listener(asyncio.get_running_loop(), asyncio.Queue(QUEUE_MAX), site)
        with self._lock:
            self._listeners.add(lst)
        return lst

    def unlisten(self, lst: Listener) -> None:
        with self._lock:
            self._listeners.discard(lst)

    def snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self.states)

    def manifest_snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self.manifests)

    def config_snapshot(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """(retained config pushes, retained config acks), topic -> payload."""
        with self._lock:
            return dict(self.configs), dict(self.acks)

    # -- the broker ------------------------------------------------------------------------
    def start(self, opts: BrokerOpts, client_id: str = "") -> None:
        self.client = connect(opts, client_id,
                              on_message=lambda m: self.feed(m.topic, bytes(m.payload), bool(m.retain)))
        q = sub_qos(self.client)   # 0 on NATS's 3.1.1 gateway: no JetStream consumer per filter
        filters = [(topics.every(topics.STATE), q), (topics.ALL_TOUCHES, 0), (MANIFESTS, q),
                   (topics.every(topics.CONFIG), q), (topics.every(topics.CONFIG_ACK), q)]
        sub = self.client.subscribe(filters)

        def resubscribe(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                c.subscribe(filters)
        self.client.on_connect = resubscribe
        log.info("console subscribed to %s (mid %s)", [f for f, _ in filters], sub[1])

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


def _offer(lst: Listener, item: Any) -> None:
    if lst.queue.full():
        lst.dropped += 1
    else:
        lst.queue.put_nowait(item)


def drain(q: asyncio.Queue[Any], first: Any, limit: int) -> list[Any]:
    """`first` and whatever else is queued already, up to `limit` items, oldest first: the live
    stream sends one SSE event per batch, not per touch (at 1,000 touches/s a write and an
    htmx swap per touch is what falls behind)."""
    out = [first]
    while len(out) < limit and not q.empty():
        out.append(q.get_nowait())
    return out
