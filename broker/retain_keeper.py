"""The site broker's retained keeper: a paho client that republishes, retained, what the bridge
to NATS brought unretained (the rule is broker/retain_keep.py's; docs/operations.md, "The site
bridge watchdog"). It runs inside `ccus site-watchdog --keep-retained`.

Rules of this file:

- MQTT 5 to the site broker, a clean start, QoS 1 subscriptions with retain-as-published and
  no-local; at every (re)connect the broker sends its retained messages flagged, and they are
  left alone.
- Republished in the order received (paho's one network thread), so a list's chunks are kept
  before its manifest is; a device that takes the manifest and asks again for the chunks finds
  them retained, or gets the republished copy live after the manifest, which it takes.
- Logs: one INFO line per kept manifest or config (not per chunk), WARNING when the broker
  refuses the connection.
"""

import logging
import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.retain_keep import kept_filters, to_republish

log = logging.getLogger("ccus.site_watchdog")


class RetainKeeper:
    """``RetainKeeper(host, port, site).start()``; ``.stop()``; ``.kept`` (republished so far)."""

    def __init__(self, host: str, port: int, site: str, *, client_id: str | None = None,
                 tls: tuple[str, str, str] | None = None) -> None:
        self.host, self.port, self.site = host, port, site
        self.kept = 0
        self.subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2,
                        client_id=client_id or f"ccus-keeper-{site}", protocol=mqtt.MQTTv5)
        if tls:
            c.tls_set(ca_certs=tls[0], certfile=tls[1], keyfile=tls[2],
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.reconnect_delay_set(1, 2)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._client = c

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: object,
                    _p: object = None) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("site-watchdog: the site broker %s:%s refused the keeper's connection "
                        "(%s)", self.host, self.port, rc)
            return
        opts = SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)
        client.subscribe([(f, opts) for f in kept_filters(self.site)])

    def _on_subscribe(self, *_: object) -> None:
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        if not to_republish(m.topic, bool(m.retain), self.site):
            return
        client.publish(m.topic, m.payload, qos=1, retain=True)
        self.kept += 1
        if not m.topic.split("/")[-1].isdigit():   # a manifest, a config: not every chunk
            log.info("site-watchdog: kept %s retained on the site broker (%d bytes)",
                     m.topic, len(m.payload))

    def start(self) -> "RetainKeeper":
        self._client.connect_async(self.host, self.port, keepalive=10, clean_start=True)
        self._client.loop_start()
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
