"""Backlog-drain benchmark: a device comes back online with N queued touches.

    .venv/bin/python bench/bench_backlog.py [--n 100000] [--inflight 50] [--idle-s 10]

One run, side by side, against one private Mosquitto (the project's dev.conf):

- backlog: N real v1 touches in a device outbox; the production Link connects and replays
  them; the real sink process (`ccus sink run`, SQLite store) stores them and publishes the
  end-to-end acknowledgement. Timed from Link.start() until the acknowledgement covers all N
  (the outbox is empty). touches/s = N / that time. CPU seconds of the sink (both of its
  processes), of the device link (this process) and of the broker over that time.
- raw: plain paho publishing the same N payloads at QoS 1, at most the same in-flight window
  outstanding (a semaphore: paho slows quadratically with 100k messages queued inside it),
  timed until the last PUBACK, to a topic nobody subscribes to (the broker's best case).
- idle: the agent process (tests/fault_agent.py --idle, the production Agent and Link, no
  readers) connected and doing nothing: resident memory and CPU over --idle-s seconds.

The outbox is filled in one transaction (a benchmark shortcut; the agent appends one durable
transaction per touch). Prints one JSON document.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from broker.launcher import PrivateBroker  # noqa: E402
from edge.config import MqttConfig  # noqa: E402
from edge.link import Link  # noqa: E402
from edge.outbox import Outbox  # noqa: E402
from protocol.reasons import Reason  # noqa: E402
from protocol.timequality import TimeQuality  # noqa: E402
from protocol.touch import CardTech, Decision, Role, Touch, encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITE, DEV = "13100000000001", "gate-b1"
DAY0_MS = 1_795_640_400_000


def payloads(n: int) -> list[bytes]:
    out = []
    for seq in range(1, n + 1):
        out.append(encode(Touch(
            device=DEV, site=SITE, role=Role.GATE, seq=seq, ts_ms=DAY0_MS + seq * 1000,
            tq=TimeQuality.SYNCED, card=bytes.fromhex(f"012E4CD3{seq % 500:08X}"),
            card_tech=CardTech.FELICA, tid=f"{10000000000000 + seq % 500:014d}",
            decision=Decision.ALLOW, reason=Reason("ok"), list_version=1, config_version=1,
            facts={"reader": "entry" if seq % 2 else "exit", "dir": "in" if seq % 2 else "out"})))
    return out


def fill_outbox(path: Path, data: list[bytes]) -> Outbox:
    ob = Outbox(path, reserve_bytes=0)
    db = ob._db  # benchmark shortcut: one transaction for the whole backlog
    db.execute("BEGIN")
    db.executemany("INSERT INTO outbox (seq, payload, created_ms) VALUES (?,?,?)",
                   [(i + 1, p, DAY0_MS) for i, p in enumerate(data)])
    db.execute("UPDATE meta SET v=? WHERE k='next_seq'", (len(data) + 1,))
    db.execute("COMMIT")
    return ob


def bench_backlog(tmp: Path, broker: PrivateBroker, data: list[bytes], inflight: int) -> dict:  # type: ignore[type-arg]
    ob = fill_outbox(tmp / "outbox.sqlite", data)
    ready = tmp / "sink.ready"
    sink = subprocess.Popen(
        [sys.executable, "-m", "ccus.cli", "sink", "run", "--db", str(tmp / "store.sqlite"),
         "--broker", f"127.0.0.1:{broker.port}", "--client-id", "sink-bench",
         "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=open(tmp / "sink.log", "wb"))  # noqa: SIM115
    while not ready.exists():
        if sink.poll() is not None:
            raise RuntimeError((tmp / "sink.log").read_text()[-2000:])
        time.sleep(0.05)
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, tls=False, inflight=inflight,
                     state_interval_s=60)
    link = Link(cfg, SITE, DEV, ob, lambda: {"v": 1, "dev": DEV, "online": True})
    time.sleep(0.5)  # the sink's writer process is up
    sink_cpu0, broker_cpu0 = _tree_cpu_s(sink.pid), _cpu_s(broker.proc.pid)  # type: ignore[union-attr]
    link_cpu0 = time.process_time()
    t0 = time.perf_counter()
    link.start()
    # acked_upto is set right after delete_upto() committed; polling ob.depth() (a COUNT over
    # the outbox every 10 ms) would take CPU and the outbox lock from the link being measured
    while link.acked_upto < len(data):
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    assert ob.depth() == 0
    sink_cpu = _tree_cpu_s(sink.pid) - sink_cpu0
    broker_cpu = _cpu_s(broker.proc.pid) - broker_cpu0  # type: ignore[union-attr]
    link_cpu = time.process_time() - link_cpu0
    stats = link.stats()
    link.stop()
    ob.close()
    sink.terminate()
    sink.wait(10)
    import sqlite3

    stored = sqlite3.connect(tmp / "store.sqlite").execute("SELECT COUNT(*) FROM touches").fetchone()[0]
    return {"n": len(data), "seconds": round(elapsed, 2), "touches_per_s": round(len(data) / elapsed),
            "stored": stored, "published": stats["published"], "replays": stats["replays"],
            "cpu_s": {"sink": round(sink_cpu, 1), "device_link": round(link_cpu, 1),
                      "broker": round(broker_cpu, 1)}}


def bench_raw(broker: PrivateBroker, data: list[bytes], inflight: int) -> dict:  # type: ignore[type-arg]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-bench", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(inflight)
    done = threading.Event()
    acked = [0]

    window = threading.Semaphore(inflight)  # paho degrades badly with 100k queued inside it

    def on_publish(*_: object) -> None:
        acked[0] += 1
        window.release()
        if acked[0] == len(data):
            done.set()

    c.on_publish = on_publish
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    time.sleep(0.2)
    topic = f"bench/raw/{DEV}/touch"
    t0 = time.perf_counter()
    for p in data:
        window.acquire()
        c.publish(topic, p, qos=1)
    done.wait(600)
    elapsed = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return {"n": len(data), "seconds": round(elapsed, 2), "touches_per_s": round(len(data) / elapsed),
            "acked": acked[0]}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (the sink's writer process)."""
    total = _cpu_s(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _tree_cpu_s(int(child))
    return total


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def bench_idle(tmp: Path, broker: PrivateBroker, seconds: float) -> dict:  # type: ignore[type-arg]
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_agent.py"), "--data",
                          str(tmp / "idle-agent"), "--port", str(broker.port),
                          "--idle", str(seconds + 5)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    assert p.stdout and "started" in p.stdout.readline()
    time.sleep(2.0)  # connected, first state message out
    cpu0, t0 = _cpu_s(p.pid), time.monotonic()
    rss = []
    while time.monotonic() - t0 < seconds:
        rss.append(_rss_kib(p.pid))
        time.sleep(0.5)
    cpu = _cpu_s(p.pid) - cpu0
    wall = time.monotonic() - t0
    p.terminate()
    p.wait(10)
    return {"seconds": round(wall, 1), "rss_mib": round(max(rss) / 1024, 1),
            "cpu_percent": round(100 * cpu / wall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--idle-s", type=float, default=10.0)
    args = ap.parse_args()
    data = payloads(args.n)
    with tempfile.TemporaryDirectory(prefix="ccus-bench-") as d:
        tmp = Path(d)
        with PrivateBroker(tmp / "broker") as broker:
            raw = bench_raw(broker, data, args.inflight)
            backlog = bench_backlog(tmp, broker, data, args.inflight)
            idle = bench_idle(tmp, broker, args.idle_s)
    result = {
        "bench": "backlog",
        "payload_bytes_avg": round(sum(map(len, data)) / len(data)),
        "inflight": args.inflight,
        "raw_paho_qos1": raw,
        "backlog_drain_e2e": backlog,
        "ratio_vs_raw": round(backlog["touches_per_s"] / raw["touches_per_s"], 3),
        "target_ratio": 0.5,
        "agent_idle": idle,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
