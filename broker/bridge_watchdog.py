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
- Logs: one line each, WARNING when it restarts (journald: ``journalctl -p warning``).
"""

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.bridge_watch import BridgeWatch, WatchConfig

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
                 tls: tuple[str, str, str] | None = None,
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
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"ccus-watchdog-{site}",
                        protocol=mqtt.MQTTv311, clean_session=True)
        if tls:
            c.tls_set(ca_certs=tls[0], certfile=tls[1], keyfile=tls[2],
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.reconnect_delay_set(1, 2)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
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
        client.subscribe([(state_topic(self.bridge), 0), (f"ccus/v1/{self.site}/+/touch", 0),
                          (f"ccus/v1/{self.site}/+/ack", 0)])
        with self._lock:
            self._connected_at = self.clock()

    def _on_disconnect(self, *_: object) -> None:
        with self._lock:
            self.watch.lost()
            self._connected_at = None

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        now = self.clock()
        with self._lock:
            if m.topic.startswith("$SYS/"):
                self._seen_state = True
                self.watch.state(m.payload == b"1", now)
            elif m.topic.endswith("/touch"):
                self.watch.touch(now)
            else:
                self.watch.ack(now)

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
        self._client.connect_async(self.host, self.port, keepalive=10)
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
