"""A benchmark load process: many MQTT 3.1.1 devices in one process, one select() loop, tapping
at a fixed combined rate and timing each touch from its tap to the end-to-end acknowledgement.

    python bench/cluster_fleet.py --ports P[,P...] --first 0 --devices 250 --rate 250
                                  --seconds 60 [--ready-file F --go-file G] [--warmup 5]

With --ready-file it writes that file once every device is subscribed, then waits for the
--go-file to appear and starts tapping at the wall-clock time (epoch s) written in it.

Used by bench/bench_freshness.py (several of these side by side); prints one JSON line.

Rules of this file:
- A device is a paho client (MQTT 3.1.1, clean session, QoS 1 touches, its acknowledgement
  topic subscribed at QoS 0 as tests/nats_support.Device311 does; the agent's own link speaks
  MQTT 5 only today). Devices are spread over the ports in turn (the cluster's three nodes).
- One thread drives every client (paho's loop_read/loop_write/loop_misc): a thread per client
  would be 1,000 threads on a 2-core box, measuring the interpreter rather than the tier.
- The latency of a touch is the monotonic time from just before its PUBLISH is queued to the
  arrival of the first acknowledgement whose ``upto`` covers its seq. The sink sends that
  acknowledgement only after the transaction holding the touch and its work-history row has
  committed, so this is commit latency plus one delivery back: an upper bound of
  tap-to-committed, seen by the device.
- Touches tapped in the first --warmup seconds are sent but left out of the figures.
- Delivery as the agent's: a touch is kept until acknowledged; a device whose connection is
  lost connects again and replays its unacknowledged touches, and one whose acknowledgement
  has not progressed for E2E_TIMEOUT_S (doubling while nothing moves, as the agent: a 3 s
  timeout made an overloaded box replay everything again and again) replays them too
  (NATS 2.9 PUBACKs an MQTT QoS 1
  publish before JetStream has stored it, docs/operations.md). A replayed touch keeps its
  tap time: its latency includes the replay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import selectors
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from protocol import topics  # noqa: E402
from protocol.ack import AckError, decode_ack  # noqa: E402
from protocol.reasons import Reason  # noqa: E402
from protocol.timequality import TimeQuality  # noqa: E402
from protocol.touch import CardTech, Decision, Role, Touch, encode  # noqa: E402

DEVICES_PER_SITE = 10
E2E_TIMEOUT_S = 30.0   # the agent's default ack_timeout_s (edge/config.py), doubling to 240
E2E_TIMEOUT_MAX_S = 240.0


def site_of(index: int) -> str:
    return f"{13100000000000 + index // DEVICES_PER_SITE:014d}"


def device_name(index: int) -> str:
    return f"gate-{index:05d}"


class Device:
    def __init__(self, index: int, port: int) -> None:
        self.index, self.port = index, port
        self.name, self.site = device_name(index), site_of(index)
        self.topic = topics.touch(self.site, self.name)
        self.seq = 0
        self.acked = 0
        self.taps: dict[int, float] = {}     # seq -> monotonic tap time, until acknowledged
        self.unacked: dict[int, bytes] = {}  # seq -> payload, until acknowledged
        self.progress = 0.0                  # monotonic time the acknowledgement last grew
        self.replays = 0
        self.reconnects = 0
        self.timeout = E2E_TIMEOUT_S
        self.ready = False
        self.dropped = 0.0                   # monotonic time of a loss before ready, 0: none
        self.tried = 0.0                     # monotonic time of the last connection attempt
        self.retries = 0
        self.lat_ms: list[float] = []
        self.counted_from = -1               # seqs above this one count; -1: still warming up
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name,
                             protocol=mqtt.MQTTv311, clean_session=True)
        self.c.max_inflight_messages_set(1000)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(
            topics.touch_ack(self.site, self.name), qos=0)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect

    def _on_disconnect(self, *a: object) -> None:
        if not self.ready:   # a fresh cluster refuses the first sessions while JetStream settles
            self.dropped = time.monotonic()

    def _on_subscribe(self, *a: object) -> None:
        if self.unacked and not self.ready:   # connected again: replay what is unacknowledged
            self.replay(time.monotonic())
        self.ready = True

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        try:
            upto = decode_ack(m.payload)
        except AckError:
            return
        for seq in range(self.acked + 1, upto + 1):
            self.unacked.pop(seq, None)
            t = self.taps.pop(seq, None)
            if t is not None and 0 <= self.counted_from < seq:
                self.lat_ms.append((now - t) * 1000)
        if upto > self.acked:
            self.acked = upto
            self.progress = now
            self.timeout = E2E_TIMEOUT_S

    def tap(self, now_ms: int) -> None:
        self.seq += 1
        who = 10000000000000 + self.index * 1000 + (self.seq // 3) % 1000
        t = Touch(self.name, self.site, Role.GATE, self.seq, now_ms, TimeQuality.SYNCED,
                  who.to_bytes(8, "big"), CardTech.FELICA, f"{who:014d}", Decision.ALLOW,
                  Reason.OK, 3, 1, {"dir": "in" if self.seq % 2 else "out"})
        payload = encode(t)
        self.taps[self.seq] = time.monotonic()
        if not self.unacked:
            self.progress = time.monotonic()
        self.unacked[self.seq] = payload
        self.c.publish(self.topic, payload, qos=1)

    def tend(self, now: float) -> bool:
        """Once a second: connect again when lost (True: the socket changed), replay when the
        acknowledgement stalls."""
        if self.c.socket() is None:
            self.reconnects += 1
            self.ready = False
            try:
                self.c.reconnect()
            except OSError:
                return False
            self.progress = now   # the replay follows the SUBACK (in ready_replay)
            return True
        if self.ready and self.unacked and now - self.progress > self.timeout:
            self.timeout = min(E2E_TIMEOUT_MAX_S, self.timeout * 2)
            self.replay(now)
        return False

    def replay(self, now: float) -> None:
        self.replays += 1
        self.progress = now
        for _, payload in sorted(self.unacked.items()):
            self.c.publish(self.topic, payload, qos=1)


class Steady:
    """The loop while tapping: an epoll over the connected sockets, registered once, and
    writes only for the devices that still have bytes queued (paho writes a PUBLISH at once
    when it can): a select() over every socket each round cost more than the taps."""

    def __init__(self, devs: list[Device]) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: dict[Device, object] = {}
        for d in devs:
            self.update(d)
        self.dirty: set[Device] = set()

    def update(self, d: Device) -> None:
        """(Re-)register the device's current socket (after it connected again)."""
        old = self.socks.pop(d, None)
        if old is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(old)  # type: ignore[arg-type]
        sock = d.c.socket()
        if sock is not None:
            self.sel.register(sock, selectors.EVENT_READ, d)
            self.socks[d] = sock

    def __call__(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            key.data.c.loop_read(100)
        for d in list(self.dirty):
            if d.c.want_write():
                d.c.loop_write()
            else:
                self.dirty.discard(d)

    def close(self) -> None:
        self.sel.close()


def pump(devs: list[Device], timeout: float) -> None:
    """One round of the loop (connecting, draining): read what arrived, write what is queued."""
    socks = {}
    for d in devs:
        s = d.c.socket()
        if s is not None:
            socks[s] = d
    want_w = [s for s, d in socks.items() if d.c.want_write()]
    r, w, _ = select.select(list(socks), want_w, [], timeout)
    for s in r:
        socks[s].c.loop_read(100)
    for s in w:
        socks[s].c.loop_write()


def run(ports: list[int], first: int, n: int, rate: float, seconds: float, warmup: float,
        ready_file: str | None = None, go_file: str | None = None,
        connect_timeout: float = 120.0) -> dict[str, object]:
    devs = [Device(first + i, ports[(first + i) % len(ports)]) for i in range(n)]
    t0 = time.monotonic()
    for d in devs:   # connect() blocks for the TCP handshake only; CONNACKs come in pump()
        d.c.connect("127.0.0.1", d.port, keepalive=60)
        d.tried = time.monotonic()
        pump(devs, 0)
    deadline = time.monotonic() + connect_timeout
    while not all(d.ready for d in devs):
        if time.monotonic() > deadline:
            raise SystemExit(f"cluster_fleet: only {sum(d.ready for d in devs)} of {n} devices "
                             f"subscribed within {connect_timeout:.0f}s")
        for d in devs:
            now = time.monotonic()
            # lost, or no CONNACK/SUBACK for 5 s: a new connection
            if not d.ready and ((d.dropped and now - d.dropped > 1) or now - d.tried > 5):
                d.dropped, d.tried = 0.0, now
                d.retries += 1
                try:
                    d.c.reconnect()
                except OSError:
                    d.dropped = now
        pump(devs, 0.05)
    connect_s = time.monotonic() - t0
    last_misc = time.monotonic()
    start_at = 0.0
    if ready_file and go_file:
        Path(ready_file).write_text("ready\n")
        go = Path(go_file)
        while not go.exists() or not go.read_text().strip():
            pump(devs, 0.05)
            if time.monotonic() - last_misc > 1:
                for d in devs:
                    d.c.loop_misc()
                last_misc = time.monotonic()
        start_at = float(go.read_text())
    while time.time() < start_at:
        pump(devs, min(0.05, max(0.0, start_at - time.time())))
    steady = Steady(devs)
    begin = time.monotonic()
    interval = 1.0 / rate
    k = 0
    end = begin + seconds
    counting = False
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if not counting and now - begin >= warmup:
            counting = True
            for d in devs:
                d.counted_from = d.seq
        while k * interval <= now - begin:  # catch up when a round ran late
            d = devs[k % n]
            d.tap(int(time.time() * 1000))
            if d.c.want_write():
                steady.dirty.add(d)
            k += 1
        if now - last_misc > 1:
            for d in devs:
                d.c.loop_misc()
                if d.tend(now):
                    steady.update(d)
                if d.c.want_write():
                    steady.dirty.add(d)
            last_misc = now
        steady(max(0.0, min(0.01, begin + k * interval - time.monotonic())))
    steady.close()
    drain_end = time.monotonic() + 45   # the last acknowledgements, a replay included
    while any(d.taps for d in devs) and time.monotonic() < drain_end:
        pump(devs, 0.05)
        now = time.monotonic()
        if now - last_misc > 1:
            for d in devs:
                d.c.loop_misc()
                d.tend(now)
            last_misc = now
    sent = sum(d.seq for d in devs)
    lat = [x for d in devs for x in d.lat_ms]
    unacked = sum(len(d.taps) for d in devs)
    for d in devs:
        d.c.disconnect()
    pump(devs, 0.1)
    return {"devices": n, "sent": sent, "unacked": unacked, "connect_s": round(connect_s, 2),
            "connect_retries": sum(d.retries for d in devs),
            "replays": sum(d.replays for d in devs),
            "reconnects": sum(d.reconnects for d in devs),
            "tap_late_s": round(time.monotonic() - begin - seconds, 2), "lat_ms": lat}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ports", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True, help="touches/s of this process")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--ready-file")
    ap.add_argument("--go-file")
    ap.add_argument("--warmup", type=float, default=5.0)
    args = ap.parse_args()
    out = run([int(p) for p in args.ports.split(",")], args.first, args.devices, args.rate,
              args.seconds, args.warmup, args.ready_file, args.go_file)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
