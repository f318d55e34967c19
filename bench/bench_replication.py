"""The price of replication: ingest with two sinks on the 3-node NATS cluster (JetStream R3, two
`ccus sink run --nats` on one durable consumer) beside two sinks on one private Mosquitto (two
`ccus sink run` in one $share group), the same touches, one run, into PostgreSQL.

    .venv/bin/python bench/bench_replication.py [--touches 50000] [--rounds 1]
                                                [--paths cluster,mosquitto]

Per path: the two sinks start once (the cluster's stream and durable consumer, the broker's
shared-subscription sessions), stop; N touches (100 devices) are published by one MQTT 3.1.1
QoS 1 publisher (each PUBLISH acknowledged) while no sink runs, so the publish rate is what
the broker tier accepts: on the cluster, into a stream replicated on three nodes. Then the
two sinks come back and drain: the drain rate is N over the store-side span (first to last
commit, from received_ms), and N over the wall time from their start to the last commit.
The per-sink split comes from their logs; nothing lost or doubled is checked in the store.
Ratios are cluster / Mosquitto (below 1: what replication costs). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster_bench as cb  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from bench_sink import payloads, publish_all  # noqa: E402


def _split(tmp: Path, tag: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for i in (1, 2):
        text = (tmp / f"sink-{tag}-{i}.log").read_text()
        m = re.findall(r"stopped: (\d+) stored, (\d+) repeated", text)
        out.append({"stored": int(m[-1][0]), "repeated": int(m[-1][1])} if m else {"log": "?"})
    return out


def one_path(name: str, n: int, tmp: Path, r: int) -> dict[str, object]:
    tag = f"{name}-{r}"
    with cb.open_path(name, tmp / tag) as path, cb.pg_store() as url:
        cb.stop_sinks(cb.start_sinks(path, url, tmp, f"{tag}-register", 2, group="rep",
                                     ids=tag))
        msgs = payloads(n)
        pub_s = publish_all(path.mqtt_ports[0], msgs, protocol=mqtt.MQTTv311)
        import psycopg

        t0 = time.monotonic()
        sinks = cb.start_sinks(path, url, tmp, tag, 2, group="rep")
        try:
            with psycopg.connect(url, autocommit=True) as db:
                deadline = time.monotonic() + max(120, n / 200)
                count = 0
                while time.monotonic() < deadline:
                    count = db.execute("SELECT COUNT(*) FROM touches").fetchone()[0]
                    if count >= n:
                        break
                    time.sleep(0.05)
                wall = time.monotonic() - t0
                time.sleep(1.0)   # anything doubled would be in by now
                lo, hi = db.execute("SELECT MIN(received_ms), MAX(received_ms) FROM touches"
                                    ).fetchone()
        finally:
            cb.stop_sinks(sinks)
        counts = cb.store_counts(url)
    split = _split(tmp, tag)
    received = sum(int(s.get("stored", 0)) + int(s.get("repeated", 0)) for s in split)  # type: ignore[call-overload]
    span = (hi - lo) / 1000 if lo and hi and hi > lo else None
    return {"path": name, "touches": n, "publish_s": round(pub_s, 2),
            "publish_per_s": round(n / pub_s), "drain_wall_s": round(wall, 2),
            "drain_wall_per_s": round(n / wall), "drain_span_s": span and round(span, 2),
            "drain_per_s": round(n / span) if span else None, "store": counts,
            "lost": n - counts["touches"], "per_sink": split,
            "redelivered": received - n if all("stored" in s for s in split) else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--touches", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=1, help="alternating the paths")
    ap.add_argument("--paths", default=",".join(cb.PATHS))
    args = ap.parse_args()
    names = args.paths.split(",")
    out: dict[str, object] = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                              "touches": args.touches, "sinks_per_path": 2}
    runs: dict[str, list[dict[str, object]]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="ccus-repl-") as tmp:
        for r in range(args.rounds):
            for name in names:
                runs[name].append(one_path(name, args.touches, Path(tmp), r))
    best = {k: max(v, key=lambda x: x["drain_per_s"] or 0) for k, v in runs.items()}
    out["best"] = best
    if "cluster" in best and "mosquitto" in best:
        c, m = best["cluster"], best["mosquitto"]
        out["ratio_cluster_to_mosquitto"] = {
            k: round(c[k] / m[k], 3) if c[k] and m[k] else None  # type: ignore[operator]
            for k in ("publish_per_s", "drain_per_s", "drain_wall_per_s")}
    if args.rounds > 1:
        out["all_rounds"] = runs
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
