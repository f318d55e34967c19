"""Pieces the cluster-tier benchmarks share (bench_freshness, bench_replication): the two paths
(the 3-node NATS cluster, one private Mosquitto), `ccus sink run` processes on either, and a
fleet of cluster_fleet.py load processes.

Rules: every process started here is stopped here (the paths are context managers); ports are
free loopback ones; PostgreSQL databases come from bench_sink.pg_database and are dropped.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sink import _stop, drop_database, pg_database  # noqa: E402

from broker.launcher import PrivateBroker  # noqa: E402
from broker.nats import NatsCluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLEET = Path(__file__).resolve().parent / "cluster_fleet.py"
PATHS = ("cluster", "mosquitto")


class Path_:
    """One path under test: where devices connect (mqtt_ports) and how a sink reaches it."""

    def __init__(self, name: str, mqtt_ports: list[int], sink_args: list[str]) -> None:
        self.name, self.mqtt_ports, self.sink_args = name, mqtt_ports, sink_args


@contextlib.contextmanager
def open_path(name: str, tmp: Path) -> Iterator[Path_]:
    if name == "cluster":
        with NatsCluster(tmp / "nats") as c:
            yield Path_(name, c.mqtt_ports, ["--nats", ",".join(c.urls)])
    elif name == "mosquitto":
        with PrivateBroker(tmp / "mosquitto") as b:
            yield Path_(name, [b.port], ["--broker", f"127.0.0.1:{b.port}"])
    else:
        raise ValueError(name)


@contextlib.contextmanager
def pg_store() -> Iterator[str]:
    url, handle = pg_database()
    try:
        yield url
    finally:
        drop_database(handle)


def start_sinks(path: Path_, url: str, tmp: Path, tag: str, n: int = 1,
                group: str = "sink", ids: str | None = None) -> list[subprocess.Popen[bytes]]:
    """n `ccus sink run` processes of one group on the path, each subscribed when this returns.
    Client ids are ``bench-{ids or tag}-{i}``: the same ids come back to the same Mosquitto
    sessions (and the touches queued for them)."""
    procs = []
    for i in range(1, n + 1):
        ready, log = tmp / f"sink-{tag}-{i}.ready", tmp / f"sink-{tag}-{i}.log"
        ready.unlink(missing_ok=True)
        with open(log, "ab") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ccus.cli", "sink", "run", "--store", url, *path.sink_args,
                 "--group", group, "--client-id", f"bench-{ids or tag}-{i}", "--metrics", "off",
                 "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err))
        deadline = time.monotonic() + 60
        while not ready.exists():
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                _stop(procs)
                raise RuntimeError(f"sink {tag}-{i} did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
    return procs


def stop_sinks(procs: list[subprocess.Popen[bytes]]) -> None:
    _stop(procs)


def run_fleet(ports: list[int], devices: int, rate: float, seconds: float, procs: int,
              tmp: Path, tag: str, warmup: float = 5.0) -> list[dict[str, object]]:
    """`procs` cluster_fleet.py processes sharing `devices` and `rate`; all connect first, then
    start tapping together. -> each one's JSON."""
    go = tmp / f"fleet-{tag}.go"
    go.unlink(missing_ok=True)
    workers, readies = [], []
    per = [devices // procs + (1 if i < devices % procs else 0) for i in range(procs)]
    first = 0
    for i, n in enumerate(per):
        ready = tmp / f"fleet-{tag}-{i}.ready"
        ready.unlink(missing_ok=True)
        readies.append(ready)
        workers.append(subprocess.Popen(
            [sys.executable, str(FLEET), "--ports", ",".join(map(str, ports)), "--first",
             str(first), "--devices", str(n), "--rate", str(rate * n / devices), "--seconds",
             str(seconds), "--warmup", str(warmup), "--ready-file", str(ready), "--go-file",
             str(go)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        first += n
    try:
        t0 = time.monotonic()
        while not all(r.exists() for r in readies):
            for w in workers:
                if w.poll() is not None:
                    raise RuntimeError(f"a fleet process ended: {w.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            if time.monotonic() - t0 > 240:
                raise RuntimeError("the fleet did not connect within 240 s")
            time.sleep(0.1)
        connect_s = time.monotonic() - t0
        go.write_text(f"{time.time() + 1.0}\n")
        out = []
        for w in workers:
            stdout, stderr = w.communicate(timeout=seconds + 120)
            if w.returncode:
                raise RuntimeError(f"a fleet process failed: {stderr.decode()[-500:]}")
            res = json.loads(stdout)
            res["fleet_connect_s"] = round(connect_s, 2)
            out.append(res)
        return out
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(5)


def percentiles(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))], 1)

    return {"n": len(s), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99),
            "p999_ms": q(0.999), "max_ms": round(s[-1], 1)}


def receive_lag(url: str, warmup_s: float) -> dict[str, float | int | None]:
    """Tap (the touch's ts_ms) to the writer's receive stamp (received_ms), from the store:
    the share of the latency before the writer's transaction. Touches tapped in the first
    warmup_s seconds are left out, as in the fleet's figures."""
    import psycopg

    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT received_ms - ts_ms FROM touches"
            " WHERE ts_ms >= (SELECT MIN(ts_ms) FROM touches) + %s", (int(warmup_s * 1000),)
        ).fetchall()
    return percentiles([float(r[0]) for r in rows])


def store_counts(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url) as db:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("touches", "work_history", "dead_letters")}
