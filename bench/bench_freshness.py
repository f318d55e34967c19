"""Freshness at the peak: tap-to-committed latency of N devices at a combined R touches/s through
the 3-node NATS cluster (JetStream R3, MQTT gateway) into PostgreSQL via the JetStream sink,
beside the same load through one private Mosquitto into PostgreSQL via the MQTT sink.

    .venv/bin/python bench/bench_freshness.py [--devices 1000] [--rate 1000] [--seconds 60]
                                              [--procs 4] [--warmup 5] [--paths cluster,mosquitto]

One run, the paths one after the other (not at once: on a 2-core box each would be measuring
the other), each with a fresh PostgreSQL database, one `ccus sink run` and the same fleet:
--procs cluster_fleet.py processes holding the devices (paho, MQTT 3.1.1, QoS 1; the agent's
own link speaks MQTT 5 only on this branch).

What is measured: for every touch, the device's time from the tap to the end-to-end
acknowledgement covering it. The sink publishes that acknowledgement only after the writer's
transaction with the touch and its work-history row has committed (cloud_sink.ingest), so it
is the commit seen from the store plus one delivery back to the device: an upper bound of
tap-to-committed, taken without a poller's own load on the store and its polling interval
(a poller at 1,000 touches/s would add up to its interval to every figure). The store is
checked afterwards: every acknowledged touch stored once, work-history rows present.
``tap_to_received`` is the part before the writer's transaction: the touch's tap stamp to the
receive stamp the writer put on its row (the same clock: one machine).
Touches of the first --warmup seconds are left out (connections settling). The machine's
1-minute load average before and after each path is printed with it (the box is shared):
``tap_late_s`` says how far the fleet itself fell behind its tapping schedule. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster_bench as cb  # noqa: E402


def one_path(name: str, devices: int, rate: float, seconds: float, procs: int, warmup: float,
             tmp: Path) -> dict[str, object]:
    with cb.open_path(name, tmp / name) as path, cb.pg_store() as url:
        sinks = cb.start_sinks(path, url, tmp, name)
        try:
            load0 = os.getloadavg()[0]
            t0 = time.monotonic()
            fleet = cb.run_fleet(path.mqtt_ports, devices, rate, seconds, procs, tmp, name, warmup)
            wall = time.monotonic() - t0
            load1 = os.getloadavg()[0]
            time.sleep(1.0)   # anything doubled would be in by now
            counts = cb.store_counts(url)
            recv = cb.receive_lag(url, warmup)
        finally:
            cb.stop_sinks(sinks)
    lat = [x for f in fleet for x in f.pop("lat_ms")]  # type: ignore[attr-defined]
    sent = sum(int(f["sent"]) for f in fleet)  # type: ignore[call-overload]
    unacked = sum(int(f["unacked"]) for f in fleet)  # type: ignore[call-overload]
    return {"path": name, "sent": sent, "unacked_at_end": unacked,
            "offered_per_s": round(sent / seconds), "wall_s": round(wall, 1),
            "fleet_connect_s": max(float(f["fleet_connect_s"]) for f in fleet),  # type: ignore[arg-type]
            "tap_late_s": max(float(f["tap_late_s"]) for f in fleet),  # type: ignore[arg-type]
            "replays": sum(int(f["replays"]) for f in fleet),  # type: ignore[call-overload]
            "reconnects": sum(int(f["reconnects"]) for f in fleet),  # type: ignore[call-overload]
            "load_avg_1m": [round(load0, 1), round(load1, 1)],
            "store": counts, "all_stored_once": counts["touches"] == sent,
            "latency": cb.percentiles(lat), "tap_to_received": recv}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1000.0, help="combined touches/s")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--procs", type=int, default=4, help="fleet processes")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--paths", default=",".join(cb.PATHS))
    args = ap.parse_args()
    out: dict[str, object] = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                              "devices": args.devices, "rate": args.rate,
                              "seconds": args.seconds, "procs": args.procs,
                              "warmup_s": args.warmup,
                              "measured": "tap -> end-to-end ack (sent after the commit)"}
    res = {}
    with tempfile.TemporaryDirectory(prefix="ccus-fresh-") as tmp:
        for name in args.paths.split(","):
            res[name] = one_path(name, args.devices, args.rate, args.seconds, args.procs,
                                 args.warmup, Path(tmp))
    out["paths"] = res
    if "cluster" in res and "mosquitto" in res:
        c, m = res["cluster"]["latency"], res["mosquitto"]["latency"]  # type: ignore[index]
        out["ratio_cluster_to_mosquitto"] = {
            k: round(c[k] / m[k], 2) if c.get(k) and m.get(k) else None
            for k in ("p50_ms", "p99_ms", "max_ms")}
    out["target_p99_ms_cluster"] = 100
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
