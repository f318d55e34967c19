"""Helpers for the NATS cluster tests: a small MQTT 3.1.1 device that keeps every touch until
the sink's end-to-end acknowledgement covers it, and fails over between the cluster's nodes.

It is lighter than the agent's own 3.1.1 mode (edge/link.py, `[mqtt] protocol = "3.1.1"`,
tested as real agent processes in tests/test_agent_311.py), with the same delivery rules: a
fresh paho client per connection, the backlog replayed in seq order after every connect, and
replayed again when no acknowledgement progresses for ``e2e_timeout_s``. It counts as
connected only once its acknowledgement subscription is granted.

The acknowledgement subscription is QoS 0: the sink publishes the acknowledgement from NATS,
which reaches an MQTT subscriber as QoS 0 whatever it asked for, and on NATS a QoS 1
subscription is a replicated JetStream consumer per device (12 took 1.5 s to grant here, and
one created while a node was being killed never delivered: seen in 2 of 3 runs).
"""

import socket
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sink_support import SITE, touch

from protocol import topics
from protocol.ack import decode_ack
from protocol.touch import encode


def listens(port: int) -> bool:
    """Does something accept a TCP connection on 127.0.0.1:port?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False

FAILOVER_S = 30.0  # how long a device keeps trying the other nodes after losing its own


class Device311:
    def __init__(self, name: str, ports: list[int], first: int = 0, *,
                 e2e_timeout_s: float = 3.0, tls: tuple[str, str, str] | None = None) -> None:
        self.name, self.ports, self.node = name, ports, first % len(ports)
        self.tls = tls  # (ca, cert, key): the secure cluster (tests/test_cluster_security.py)
        self.e2e_timeout_s = e2e_timeout_s
        self.acked = 0
        self.next_seq = 1
        self.connects = 0
        self.replays = 0
        self.disconnects = 0
        self.events: list[tuple[float, str, bool]] = []   # (monotonic, what, current client)
        self.finished_at = 0.0                            # when the last touch was acked
        self._lock = threading.Lock()
        self._unacked: dict[int, bytes] = {}
        self._progress = time.monotonic()
        self._client: mqtt.Client | None = None
        self._up = threading.Event()
        self._gone = threading.Event()

    # -- connection -------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the current node, or the next ones in turn, until one takes us."""
        deadline = time.monotonic() + timeout
        while True:
            port = self.ports[self.node]
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name,
                            protocol=mqtt.MQTTv311, clean_session=True)
            if self.tls:
                c.tls_set(ca_certs=self.tls[0], certfile=self.tls[1], keyfile=self.tls[2])
            c.on_connect = self._on_connect
            c.on_subscribe = self._on_subscribe
            c.on_message = self._on_message
            # only the current client's loss counts (an old one's callback may come late)
            c.on_disconnect = self._on_disconnect
            self._up.clear()
            self._gone.clear()
            self._client = c
            try:
                c.connect("127.0.0.1", port, keepalive=5)
                c.loop_start()
                if self._up.wait(3):
                    self.connects += 1
                    self.events.append((time.monotonic(), f"connect {port}", True))
                    self.replay()
                    return
                c.loop_stop()
            except OSError:
                # refused at once: not a tight loop, which on a port in the ephemeral range can
                # end in a TCP self-connect that holds the port (a site broker restarting on it
                # then fails with "Address already in use")
                time.sleep(0.1)
            self._client = None
            self.node = (self.node + 1) % len(self.ports)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no node took the connection")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object,
                    props: object) -> None:
        client.subscribe(topics.touch_ack(SITE, self.name), qos=0)

    def _on_disconnect(self, client: mqtt.Client, *_: object) -> None:
        self.disconnects += 1
        self.events.append((time.monotonic(), "disconnect", client is self._client))
        if client is self._client:
            self._gone.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: list[object],
                      props: object) -> None:
        if not any(getattr(rc, "is_failure", False) for rc in rcs):
            self._up.set()

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        upto = decode_ack(m.payload)
        with self._lock:
            if upto > self.acked:
                self.acked = upto
                if not self._unacked.keys() - set(range(upto + 1)) and upto + 1 == self.next_seq:
                    self.finished_at = time.monotonic()
                self._progress = time.monotonic()
                for s in [s for s in self._unacked if s <= upto]:
                    del self._unacked[s]

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    # -- touches ----------------------------------------------------------------------------
    def tap(self) -> None:
        """One new touch: kept until acknowledged, published now (QoS 1)."""
        with self._lock:
            seq = self.next_seq
            self.next_seq += 1
            payload = encode(touch(seq, device=self.name))
            self._unacked[seq] = payload
        self._send(seq, payload)

    def _send(self, seq: int, payload: bytes) -> None:
        if self._client is not None:
            self._client.publish(topics.touch(SITE, self.name), payload, qos=1)

    def replay(self) -> None:
        with self._lock:
            backlog = sorted(self._unacked.items())
            self._progress = time.monotonic()
        if backlog:
            self.replays += 1
        for seq, payload in backlog:
            self._send(seq, payload)

    def tend(self) -> None:
        """Fail over when the node went away; replay when the acknowledgement stalls."""
        if self._gone.is_set():
            if self._client is not None:
                self._client.loop_stop()
                self._client = None
            self.node = (self.node + 1) % len(self.ports)
            # after a node's kill -9 the others take MQTT sessions only once JetStream has a new
            # meta leader: measured ~7 s here, so a 10 s wait failed now and then under load
            self.connect(timeout=FAILOVER_S)
            return
        with self._lock:
            stalled = self._unacked and time.monotonic() - self._progress > self.e2e_timeout_s
        if stalled:
            self.replay()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._unacked)
