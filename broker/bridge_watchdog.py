"""The site bridge watchdog's moving parts: what it watches on the site broker, and the restart.

Rules of this file:

- The decision is broker/bridge_watch.py's; this file only feeds it. A paho client on the
  site broker subscribes (QoS 0) to the bridge's state ``$SYS/broker/connection/<bridge>/state``
  (``notifications true`` in the broker's config), the site's touches and its end-to-end
  acknowledgements; every ``TICK_S`` it asks the decision, and when a restart is due it
  first checks that a cloud node accepts a TCP connection.
- The restart is a callable: ``SiteBridge`` stop and start on the same port for the local
  cluster (`ccus cluster up --site`), a command such as ``systemctl restart mosquitto`` in
  production (`ccus site-watchdog`, deploy/systemd/ccus-site-watchdog.service).
- ``keep_retained`` (`ccus site-watchdog --keep-retained`, a NATS cloud): the same connection
  also keeps retained on the site broker what the bridge brought unretained (the rule is
  broker/retain_keep.py's): QoS 1 subscriptions with retain-as-published and no-local to the
  site's config and the lists; an unretained message there is published again, retained, same
  payload, in arrival order (paho's one network thread), so a list's chunks are kept before
  its manifest. One connection, because a real site broker makes the certificate's CN the
  client id (use_username_as_clientid): two connections on the bridge certificate would take
  each other's session.
- MQTT 5 to the site broker (no-local and retain-as-published are MQTT 5), a clean start.
- Logs: one line each, WARNING when it restarts (journald: ``journalctl -p warning``); INFO for
  a kept manifest or config (not for every chunk).
"""

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.bridge_watch import BridgeWatch, WatchConfig
from broker.retain_keep import is_kept, kept_filters, to_republish

log = logging.getLogger("ccus.site_watchdog")

TICK_S = 0.5
NO_STATE_S = 10.0   # no bridge state this long after connecting: notifications are off


def state_topic(bridge: str) -> str:
    """Where Mosquitto publishes a bridge's state: its remote_clientid names it."""
    return f"$SYS/broker/connection/{bridge}/state"


def cloud_answers(cloud: list[tuple[str, int]], timeout: float = 1.0) -> str:
    """The first cloud node that accepts a TCP connection ("host:port"), or ""."""
    for host, port in cloud:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return f"{host}:{port}"
        except OSError:
            continue
    return ""


def parse_hostports(spec: str) -> list[tuple[str, int]]:
    """ "h1:p1 h2:p2" or "h1:p1,h2:p2" -> [(h1, p1), (h2, p2)]; ValueError naming a bad one."""
    out = []
    for item in spec.replace(",", " ").split():
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{item!r} is not HOST:PORT")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no HOST:PORT given")
    return out


class BridgeWatchdog:
    """``BridgeWatchdog(host, port, site, cloud, restart).start()``; ``.stop()``; ``.restarts``."""

    def __init__(self, host: str, port: int, site: str, cloud: list[tuple[str, int]],
                 restart: Callable[[], None], *, bridge: str | None = None,
                 config: WatchConfig | None = None, client_id: str | None = None,
                 tls: tuple[str, str, str] | None = None, keep_retained: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host, self.port, self.site, self.cloud = host, port, site, cloud
        self.bridge = bridge or f"bridge-{site}"
        self.restart = restart
        self.watch = BridgeWatch(config)
        self.clock = clock
        self.events: list[tuple[float, str]] = []   # (clock, why) of every restart
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected_at: float | None = None
        self._seen_state = False
        self._told_unreachable = False
        self.keep_retained = keep_retained
        self.kept = 0                      # messages published again, retained
        self.subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"ccus-watchdog-{site}",
                        protocol=mqtt.MQTTv5)
        if tls:
            c.tls_set(ca_certs=tls[0], certfile=tls[1], keyfile=tls[2],
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.reconnect_delay_set(1, 2)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = lambda *_: self.subscribed.set()
        self._client = c

    @property
    def restarts(self) -> int:
        return self.watch.restarts

    # -- the site broker ---------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: object,
                    _p: object = None) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("site-watchdog: the site broker %s:%s refused the connection (%s)",
                        self.host, self.port, rc)
            return
        watch = SubscribeOptions(qos=0)
        subs = [(state_topic(self.bridge), watch), (f"ccus/v1/{self.site}/+/touch", watch),
                (f"ccus/v1/{self.site}/+/ack", watch)]
        if self.keep_retained:
            keep = SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)
            subs += [(f, keep) for f in kept_filters(self.site)]
        client.subscribe(subs)
        with self._lock:
            self._connected_at = self.clock()

    def _on_disconnect(self, *_: object) -> None:
        with self._lock:
            self.watch.lost()
            self._connected_at = None

    def _on_message(self, client: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        if self.keep_retained and is_kept(m.topic, self.site):
            self._keep(client, m)
            return
        now = self.clock()
        with self._lock:
            if m.topic.startswith("$SYS/"):
                self._seen_state = True
                self.watch.state(m.payload == b"1", now)
            elif m.topic.endswith("/touch"):
                self.watch.touch(now)
            else:
                self.watch.ack(now)

    def _keep(self, client: mqtt.Client, m: mqtt.MQTTMessage) -> None:
        if not to_republish(m.topic, bool(m.retain), self.site):
            return   # flagged retained: the site broker has it already
        client.publish(m.topic, m.payload, qos=1, retain=True)
        self.kept += 1
        if not m.topic.rsplit("/", 1)[-1].isdigit():   # a manifest, a config: not every chunk
            log.info("site-watchdog: kept %s retained on the site broker (%d bytes)", m.topic,
                     len(m.payload))

    # -- the loop ----------------------------------------------------------------------------
    def tick(self) -> bool:
        """One look: restart when due, the backoff allows it and the cloud answers; True if so."""
        now = self.clock()
        with self._lock:
            why = self.watch.wanted(now)
            if (not self._seen_state and self._connected_at is not None
                    and now - self._connected_at > NO_STATE_S):
                self._seen_state = True   # said once
                log.warning("site-watchdog: no state of bridge %s on %s: set `notifications "
                            "true` on its connection", self.bridge, state_topic(self.bridge))
        if not why:
            return False
        node = cloud_answers(self.cloud)
        if not node:
            if not self._told_unreachable:
                log.warning("site-watchdog: %s, but no cloud node answers: not restarting",
                            why)
            self._told_unreachable = True
            return False
        self._told_unreachable = False
        log.warning("site-watchdog: restarting the site broker: %s; cloud node %s answers "
                    "(restart %d)", why, node, self.watch.restarts + 1)
        try:
            self.restart()
        except Exception as exc:  # noqa: BLE001 - one line; the next tick tries again
            log.warning("site-watchdog: the restart failed: %s", exc)
        with self._lock:
            self.watch.restarted(self.clock())
            self.events.append((now, why))
        return True

    def run(self) -> None:
        """Until stop(): connect to the site broker (and again after it went away), tick."""
        self._client.connect_async(self.host, self.port, keepalive=10, clean_start=True)
        self._client.loop_start()
        log.info("site-watchdog: watching bridge %s on %s:%s (limit %.0fs)", self.bridge,
                 self.host, self.port, self.watch.config.limit_s)
        try:
            while not self._stop.wait(TICK_S):
                self.tick()
        finally:
            self._client.disconnect()
            self._client.loop_stop()

    def start(self) -> "BridgeWatchdog":
        self._thread = threading.Thread(target=self.run, name="site-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
