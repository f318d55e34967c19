"""Sink benchmark: end-to-end ingest beside a bare paho subscriber, two sinks on one shared
subscription, and a site-month report over a 10-million-touch SQLite store.

    .venv/bin/python bench/bench_sink.py [--touches 30000] [--rounds 2] [--big 10000000]
                                         [--only ingest,shared,report]

Ingest: for each consumer (bare paho counter; Sink -> SQLite; Sink -> PostgreSQL) the broker
first holds N queued QoS 1 touches for the consumer's persistent session (registered, then
offline), then the consumer connects and the clock runs until it has counted (bare) or
committed (sink) all N: the rate is the consumer's own, not the publisher's. Rounds
alternate the consumers; the best round of each is reported, with its ratio to bare.
Shared: two `ccus sink run` processes in one $share group, touches published live; the
per-process split from their logs, the store's count, nothing lost or doubled.
Report: the store is generated once (cached under $TMPDIR/ccus-bench/) and the report path
(query + shaping + CSV) is timed over random site-months. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

from broker.launcher import PrivateBroker  # noqa: E402
from cloud_sink.model import BATCH_MAX as SINK_BATCH  # noqa: E402
from cloud_sink.model import IngestResult  # noqa: E402
from cloud_sink.store import open_store  # noqa: E402
from protocol import topics  # noqa: E402
from protocol.reasons import Reason  # noqa: E402
from protocol.timequality import TimeQuality  # noqa: E402
from protocol.touch import CardTech, Decision, Role, Touch, encode  # noqa: E402

SITE = "13100000000001"
PG_ADMIN = os.environ.get("CCUS_TEST_PG_URL",
                          "postgresql://ccus_test:ccus_test@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parents[1]


def payloads(n: int, devices: int = 100, seq0: int = 0) -> list[tuple[str, bytes]]:
    now = int(time.time() * 1000)
    out = []
    # about three taps per technician and work day, as at a site gate (in, out, one more);
    # a fixed pool would pile hundreds of taps onto one person-day as n grows
    pool = max(2000, n // 3)
    for i in range(n):
        dev, seq = f"gate-{i % devices:03d}", seq0 + i // devices + 1
        who = 10000000000000 + (i * 7919) % pool
        t = Touch(dev, SITE, Role.GATE, seq, now - (n - i) * 10, TimeQuality.SYNCED,
                  (who).to_bytes(8, "big"), CardTech.FELICA, f"{who:014d}", Decision.ALLOW,
                  Reason.OK, 3, 1, {"dir": "in" if seq % 2 else "out"})
        out.append((topics.touch(SITE, dev), encode(t)))
    return out


def publish_all(port: int, msgs: list[tuple[str, bytes]], window: int = 10_000,
                protocol: int = mqtt.MQTTv5) -> float:
    """QoS 1, in windows (paho stalls past 65,535 unacknowledged), every PUBLISH acknowledged;
    `protocol` mqtt.MQTTv311 for NATS's MQTT gateway. Returns seconds."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}",
                    protocol=protocol)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    for i in range(0, len(msgs), window):
        infos = [c.publish(t, p, qos=1) for t, p in msgs[i:i + window]]
        for info in infos:
            info.wait_for_publish(60)
            if not info.is_published():
                raise RuntimeError("publish not acknowledged within 60 s")
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return dt


def _session_props() -> Properties:
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 3600
    return p


class Bare:
    """A paho subscriber that only counts (auto-ack), on the same kind of shared subscription."""

    def __init__(self, port: int, group: str, n: int) -> None:
        self.port, self.group, self.n, self.count = port, group, n, 0
        self.done, self.subscribed = threading.Event(), threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{group}",
                             protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(
            topics.shared(group, topics.ALL_TOUCHES), options=SubscribeOptions(qos=1))
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        self.count += 1
        if self.count >= self.n:
            self.done.set()

    def start(self) -> None:
        self.c.connect("127.0.0.1", self.port, clean_start=False, properties=_session_props())
        self.c.loop_start()

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class SinkConsumer:
    def __init__(self, port: int, group: str, n: int, url: str, batch: int = SINK_BATCH) -> None:
        from cloud_sink.ingest import Sink

        self.n, self.res = n, IngestResult()
        self.done = threading.Event()
        self.store = open_store(url)
        self.sink = Sink(self.store, "127.0.0.1", port, group=group, client_id=f"sink-{group}",
                         on_batch=self._on_batch, batch_max=batch)
        self.subscribed = self.sink.subscribed

    def _on_batch(self, r: IngestResult) -> None:
        self.res.add(r)
        if self.res.stored + self.res.repeated >= self.n:
            self.done.set()

    def start(self) -> None:
        self.sink.start()

    def stop(self) -> None:
        self.sink.stop()

    def close(self) -> None:
        self.store.close()


def drain_rate(broker: PrivateBroker, make, n: int, group: str, seq0: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Register the session, go offline, queue n touches, come back and time the drain."""
    first = make(group)
    first.start()
    if not first.subscribed.wait(10):
        raise RuntimeError(f"{group}: not subscribed")
    first.stop()
    time.sleep(0.2)
    publish_all(broker.port, payloads(n, seq0=seq0))
    second = make(group)
    t0 = time.perf_counter()
    second.start()
    if not second.done.wait(max(60.0, n / 500)):
        raise RuntimeError(f"{group}: drained only part of {n} in time")
    dt = time.perf_counter() - t0
    second.stop()
    out = {"touches": n, "seconds": round(dt, 3), "per_s": round(n / dt)}
    if isinstance(second, SinkConsumer):
        out["stored"] = second.res.stored
        out["repeated"] = second.res.repeated
        second.close()
        if isinstance(first, SinkConsumer):
            first.close()
    return out


def pg_database() -> tuple[str, object]:
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        sys.exit(f"PostgreSQL is not reachable at {PG_ADMIN}: {exc}")
    name = f"ccus_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name, (admin, name)


def drop_database(handle: object) -> None:
    admin, name = handle  # type: ignore[misc]
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def bench_ingest(n: int, rounds: int, tmp: Path, batch: int) -> dict[str, object]:
    """Each sink round writes a fresh store, devices' seqs from 1 (the steady state: no gaps)."""
    results: dict[str, list[dict[str, float]]] = {"bare": [], "sqlite": [], "postgres": []}
    handles = []
    try:
        with PrivateBroker(tmp / "broker-ingest") as broker:
            for r in range(rounds):
                for name in ("bare", "sqlite", "postgres"):
                    group = f"{name}{r}"
                    if name == "bare":
                        def make(g: str) -> Bare:
                            return Bare(broker.port, g, n)
                    else:
                        if name == "sqlite":
                            url = str(tmp / f"ingest-{r}.sqlite")
                        else:
                            url, handle = pg_database()
                            handles.append(handle)

                        def make(g: str, url: str = url) -> SinkConsumer:  # type: ignore[misc]
                            return SinkConsumer(broker.port, g, n, url, batch)
                    results[name].append(drain_rate(broker, make, n, group, 0))
    finally:
        for handle in handles:
            drop_database(handle)
    best = {k: max(v, key=lambda x: x["per_s"]) for k, v in results.items()}
    bare = best["bare"]["per_s"]
    return {"touches_per_round": n, "rounds": rounds, "batch_max": batch,
            "best_per_s": {k: v["per_s"] for k, v in best.items()},
            "ratio_to_bare": {k: round(v["per_s"] / bare, 3) for k, v in best.items()},
            "target_ratio": 0.8, "all_rounds": results}


def _start_sinks(url: str, port: int, tmp: Path, tag: str) -> tuple[list[subprocess.Popen[bytes]],
                                                                     list[Path]]:
    procs, logs = [], []
    for i in (1, 2):
        ready, log = tmp / f"sink{i}-{tag}.ready", tmp / f"sink{i}-{tag}.log"
        ready.unlink(missing_ok=True)
        logs.append(log)
        with open(log, "wb") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ccus.cli", "sink", "run", "--store", url,
                 "--broker", f"127.0.0.1:{port}", "--client-id", f"bench-sink-{i}",
                 "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err))
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise RuntimeError(f"sink {i} did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
    return procs, logs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def bench_shared(n: int, tmp: Path, backend: str) -> dict[str, object]:
    """Two `ccus sink run` processes in one $share group. Their sessions are registered, the
    broker queues n touches while they are down, then both come back and drain. Rate: n over
    the store-side span (first to last commit, from received_ms); split from their logs."""
    handle = None
    if backend == "postgres":
        url, handle = pg_database()
    else:
        url = str(tmp / "shared.sqlite")
    procs: list[subprocess.Popen[bytes]] = []
    lo = hi = 0
    try:
        with PrivateBroker(tmp / f"broker-shared-{backend}") as broker:
            procs, _ = _start_sinks(url, broker.port, tmp, f"{backend}-register")
            _stop(procs)
            publish_all(broker.port, payloads(n))
            procs, logs = _start_sinks(url, broker.port, tmp, backend)
            store = open_store(url)
            deadline = time.monotonic() + max(60, n / 500)
            while store.counts()["touches"] < n and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # anything doubled would arrive now
            stored_total = store.counts()["touches"]
            lo, hi = store._rows("SELECT MIN(received_ms), MAX(received_ms) FROM touches")[0]  # type: ignore[attr-defined]
            store.close()
            _stop(procs)
            split = []
            for log in logs:
                m = re.search(r"stopped: (\d+) stored, (\d+) repeated, (\d+) dead", log.read_text())
                split.append({"stored": int(m[1]), "repeated": int(m[2])} if m else {"log": "?"})
    finally:
        _stop(procs)
        if handle:
            drop_database(handle)
    span = (hi - lo) / 1000 if hi and lo and hi > lo else None
    received = sum(s.get("stored", 0) + s.get("repeated", 0) for s in split)
    out: dict[str, object] = {"backend": backend, "touches": n, "store_count": stored_total,
                              "per_sink": split, "lost": n - stored_total,
                              "doubled": received - n}
    if span:
        out["drain_per_s"] = round(n / span)
    return out


# -- the 10-million-touch store ------------------------------------------------------------------
SITES, TECHS, DAYS_PER_MONTH = 500, 40, 21
MONTHS = [f"{y}-{m:02d}" for y, m in [(2025, 12)] + [(2026, k) for k in range(1, 12)]]


def _days(month: str) -> list[str]:
    # 21 working days: the weekdays-ish 1..28 minus every 4th
    return [f"{month}-{d:02d}" for d in range(1, 29) if d % 4][:DAYS_PER_MONTH]


def build_big_store(path: Path, target: int) -> dict[str, object]:
    """SITES x TECHS x months x days work days, an entry and an exit each (~10.08 M touches).

    Loaded straight into the schema the store migrates to (secondary indexes built after the
    load); work_history is written alongside, consistent by construction."""
    from cloud_sink.workday import jst_ms

    scale = max(1, round(SITES * TECHS * len(MONTHS) * DAYS_PER_MONTH * 2 / target))
    sites = SITES // scale
    open_store(path).close()  # schema at the current migration
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    idx = db.execute("SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"
                     " AND tbl_name IN ('touches', 'work_history')").fetchall()
    for name, _ in idx:
        db.execute(f"DROP INDEX {name}")
    t0 = time.perf_counter()
    day_ms = {d: jst_ms(int(d[:4]), int(d[5:7]), int(d[8:])) for m in MONTHS for d in _days(m)}
    db.execute("BEGIN")
    n = 0
    for s in range(sites):
        site, dev = f"{13100000000000 + s:014d}", f"gate-{s:04d}"
        seq = 0
        touches, days = [], []
        for k in range(TECHS):
            tid = f"{10000000000000 + s * TECHS + k:014d}"
            card = int(tid).to_bytes(8, "big")
            for m in MONTHS:
                for d in _days(m):
                    t_in = day_ms[d] + (7 * 60 + 30 + k) * 60_000
                    t_out = day_ms[d] + (17 * 60 + k) * 60_000
                    seq += 2
                    touches.append((dev, seq - 1, site, "gate", t_in, "synced", card, "felica", tid,
                                    "allow", "ok", 3, 1, '{"dir": "in"}', "in", d, t_in, None,
                                    m, tid, None, None, None, None, 4))
                    touches.append((dev, seq, site, "gate", t_out, "synced", card, "felica", tid,
                                    "allow", "ok", 3, 1, '{"dir": "out"}', "out", d, t_out, None,
                                    m, tid, None, None, None, None, 4))
                    days.append((tid, site, d, t_in, t_out, 2, 4, t_in))
        db.executemany("INSERT INTO touches (device, seq, site, role, ts_ms, tq, card, card_tech,"
                       " tid, decision, reason, lv, cv, facts, dir, work_day, received_ms, flag,"
                       " month, person, course, contractor, slot, result, cut_hour) VALUES"
                       f" ({','.join('?' * 25)})", touches)
        db.executemany("INSERT INTO work_history (tid, site, work_day, first_in_ms, last_out_ms,"
                       " taps, cut_hour, last_in_ms) VALUES (?,?,?,?,?,?,?,?)", days)
        n += len(touches)
    db.execute("COMMIT")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _, sql in idx:
        db.execute(sql)
    db.execute("ANALYZE")
    db.close()
    return {"touches": n, "sites": sites, "load_s": round(load_s, 1),
            "index_s": round(time.perf_counter() - t1, 1)}


def cached_big_store(target: int) -> tuple[Path, dict[str, object] | None]:
    """The big store of `target` touches, built once into the temp folder and kept for later
    runs; -> (path, the build figures, or None when it came from the cache)."""
    from cloud_sink.stores import migrations

    cache = Path(tempfile.gettempdir()) / "ccus-bench"
    cache.mkdir(exist_ok=True)
    # named by schema version: a store built for an older schema is rebuilt, not migrated
    path = cache / f"store-{target}-s{len(migrations.SQLITE)}.sqlite"
    built = None
    if not path.exists():
        partial = path.with_suffix(".building")
        partial.unlink(missing_ok=True)
        built = build_big_store(partial, target)
        partial.rename(path)
    return path, built


def bench_report(target: int, samples: int = 30) -> dict[str, object]:
    from cloud_sink.reports import output, shape

    path, built = cached_big_store(target)
    store = open_store(path)
    total = store.counts()["touches"]
    sites = sorted({r[0] for r in sqlite3.connect(path).execute(
        "SELECT DISTINCT site FROM work_history WHERE tid < '10000000000400'")})
    rng = random.Random(7)
    times, rows = [], 0
    for i in range(samples + 1):
        site, month = rng.choice(sites), rng.choice(MONTHS)
        t0 = time.perf_counter()
        table = shape.work_history(store.work_history(site, month))
        text = output.to_csv(table)
        dt = (time.perf_counter() - t0) * 1000
        if i:  # the first one warms the page cache after the open
            times.append(dt)
            rows = len(table)
        assert text.count("\n") == len(table) + 1
    t0 = time.perf_counter()
    dw = store.days_worked(sites[0], MONTHS[-1])
    days_ms = (time.perf_counter() - t0) * 1000
    store.close()
    return {"store": str(path), "store_touches": total, "built": built,
            "rows_per_site_month": rows, "samples": samples,
            "report_ms_median": round(statistics.median(times), 2),
            "report_ms_max": round(max(times), 2), "days_worked_ms": round(days_ms, 2),
            "days_worked_rows": len(dw), "target_ms": 100}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--touches", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=SINK_BATCH,
                    help="the sink's touches per transaction (default: `ccus sink run`'s)")
    ap.add_argument("--shared-touches", type=int, default=20_000)
    ap.add_argument("--big", type=int, default=10_000_000, help="touches in the report store")
    ap.add_argument("--only", default="ingest,shared,report")
    args = ap.parse_args()
    only = set(args.only.split(","))
    out: dict[str, object] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="ccus-bench-") as tmp:
        if "ingest" in only:
            out["ingest"] = bench_ingest(args.touches, args.rounds, Path(tmp), args.batch)
        if "shared" in only:
            out["shared"] = [bench_shared(args.shared_touches, Path(tmp), b)
                             for b in ("sqlite", "postgres")]
        if "report" in only:
            out["report"] = bench_report(args.big)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
