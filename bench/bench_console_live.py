"""Live-page benchmark: 1,000 touches/s for --seconds through a private Mosquitto while the
live page's server-sent-event stream is open; tap-to-page latency p50/p99/max and what was lost.

    .venv/bin/python bench/bench_console_live.py [--rate 1000] [--seconds 20] [--devices 100]

The touches are bench_sink.payloads() (one site, --devices gates); a paho client publishes them
at QoS 1 in 10 ms slices to keep the rate. The console's Bridge subscribes to the broker as
`ccus console` does, the app is served by uvicorn in this process, and the stream
/sites/SITE/live/events is read with urllib by a logged-in session: a touch is 'on the page'
when its row (data-device, data-seq) has arrived in the stream. Latency = arrival - publish
call, on this machine's monotonic clock. One JSON document; target: max < 1 s, none lost.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_console  # noqa: E402
import bench_sink  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from broker.launcher import PrivateBroker  # noqa: E402
from cloud_sink.store import open_store  # noqa: E402
from console import auth, users  # noqa: E402
from console.app import Config, build_app  # noqa: E402
from console.live import Bridge  # noqa: E402
from ops.mqttc import BrokerOpts  # noqa: E402
from protocol.touch import decode  # noqa: E402

ROW = re.compile(r'data-seq="(\d+)" data-device="([^"]+)"')


def pct(xs: list[float], p: float) -> float:
    return round(sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000, 1) if xs else -1.0


def paced_publish(port: int, msgs: list[tuple[str, bytes]], keys: list[tuple[str, int]],
                  rate: int, clock: Callable[[], float]
                  ) -> tuple[mqtt.Client, dict[tuple[str, int], float], float]:
    """Publish `msgs` at QoS 1 at `rate` a second, in 10 ms slices; -> (the connected client,
    `clock()` at each publish call by key, publishing seconds). The caller disconnects it."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}",
                      protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    sent: dict[tuple[str, int], float] = {}
    per_slice = max(1, rate // 100)
    t0 = time.monotonic()
    for i, (topic, payload) in enumerate(msgs):
        if i % per_slice == 0:
            due = t0 + (i // per_slice) * 0.01
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
        sent[keys[i]] = clock()
        pub.publish(topic, payload, qos=1)
    return pub, sent, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--devices", type=int, default=100)
    a = ap.parse_args()
    n = int(a.rate * a.seconds)
    msgs = bench_sink.payloads(n, a.devices)
    keys = [(t.device, t.seq) for t in (decode(p) for _, p in msgs)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-live-"))
    open_store(tmp / "store.sqlite").close()          # the console reads a store; empty here
    password = "bench-password-1"
    users.save(tmp / "users.toml", {"op": users.User("op", "operator",
                                                     auth.hash_password(password))})
    with PrivateBroker(tmp / "broker") as broker:
        bridge = Bridge()
        bridge.start(BrokerOpts(port=broker.port), f"console-bench-{uuid.uuid4().hex[:6]}")
        app = build_app(Config(str(tmp / "store.sqlite"), tmp / "users.toml", "bench-secret",
                               secure_cookies=False), bridge)
        server, th, base = bench_console.serve(app)
        opener = bench_console.login(base, "op", password)
        arrived: dict[tuple[str, int], float] = {}
        events = {"touch": 0, "dropped": 0}
        stream = opener.open(f"{base}/sites/{bench_sink.SITE}/live/events", timeout=60)

        def read() -> None:
            for raw in stream:
                line = raw.decode()
                now = time.monotonic()
                if line.startswith("event: "):
                    kind = line[7:].strip()
                    events[kind] = events.get(kind, 0) + 1
                for m in ROW.finditer(line):
                    arrived.setdefault((m.group(2), int(m.group(1))), now)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(0.5)                                 # the stream's listener is registered
        pub, sent, pub_s = paced_publish(broker.port, msgs, keys, a.rate, time.monotonic)
        deadline = time.monotonic() + 5
        while len(arrived) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        pub.loop_stop()
        pub.disconnect()
        server.should_exit = True
        bridge.stop()
        th.join(5)
    lat = [arrived[k] - sent[k] for k in sent if k in arrived]
    print(json.dumps({
        "rate": a.rate, "seconds": a.seconds, "published": n,
        "publish_s": round(pub_s, 2), "achieved_rate": round(n / pub_s),
        "bridge_seen": bridge.touches_seen, "on_page": len(lat), "lost": n - len(lat),
        "events": events,
        "latency_ms": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                       "max": round(max(lat) * 1000, 1) if lat else -1.0,
                       "mean": round(statistics.fmean(lat) * 1000, 1) if lat else -1.0},
        "target": {"max_ms": 1000, "lost": 0}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
