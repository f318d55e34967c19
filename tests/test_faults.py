"""Fault tests with real processes: nothing lost, nothing doubled, whatever is killed.

Each round runs a gate agent process (tests/fault_agent.py: the production Agent tapping
synthetic cards at a steady rate), the sink process (`ccus sink run`) and a private Mosquitto
with persistence, and breaks one of them at random moments:

- agent:   kill -9 the agent a few times; it resumes from its outbox;
- broker:  kill -9 the broker (no final persistence write) and start it again;
- sink:    kill -9 the sink mid-batch and start it again (same session);
- network: stop the broker for a while (the device keeps tapping into its outbox).

After every round: every seq 1..next_seq-1 of the agent's outbox is in the store exactly once,
with exactly the content an undisturbed run stores; the work history equals the undisturbed
run's; no gap is open; the device's outbox is empty (the end-to-end acknowledgement covered
everything). CCUS_FAULT_ROUNDS (default 1) repeats each fault kind with new random moments;
CCUS_FAULT_TOUCHES (default 2000) sets the touches per round.
"""

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.launcher import PrivateBroker, free_port
from broker.procs import stop_process, wait_until
from cloud_sink.acks import gap_report
from cloud_sink.store import SqliteStore

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("fault_agent.py")
ROUNDS = int(os.environ.get("CCUS_FAULT_ROUNDS", "1"))
TOTAL = int(os.environ.get("CCUS_FAULT_TOUCHES", "2000"))
RATE = 600.0
DEVICE = "gate-f1"
SITE = "13100000000001"


class Rig:
    """Broker, sink and agent processes around one store and one device outbox."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = PrivateBroker(tmp / "broker", persistence=True)
        self.store = tmp / "store.sqlite"
        self.agent_data = tmp / "agent"
        self.sink: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[str] | None = None
        self.sink_starts = 0

    def start_sink(self) -> None:
        ready = self.tmp / f"sink.ready.{self.sink_starts}"
        self.sink_starts += 1
        log = open(self.tmp / "sink.log", "ab")  # noqa: SIM115 - the process owns it
        self.sink = subprocess.Popen(
            [sys.executable, "-m", "ccus.cli", "sink", "run", "--db", str(self.store),
             "--broker", f"127.0.0.1:{self.broker.port}", "--client-id", "sink-f",
             "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        wait_until(lambda: ready.exists() or self.sink.poll() is not None, 20, "sink subscribed")
        assert self.sink.poll() is None, (self.tmp / "sink.log").read_text()[-2000:]

    def kill_sink(self) -> None:
        assert self.sink
        self.sink.kill()
        self.sink.wait(5)

    def start_agent(self) -> None:
        log = open(self.tmp / "agent.log", "ab")  # noqa: SIM115
        self.agent = subprocess.Popen(
            [sys.executable, str(DRIVER), "--data", str(self.agent_data), "--port",
             str(self.broker.port), "--total", str(TOTAL), "--rate", str(RATE)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        assert self.agent.stdout
        assert "started" in json.loads(self.agent.stdout.readline() or "{}")

    def kill_agent(self) -> None:
        assert self.agent
        self.agent.kill()
        self.agent.wait(5)

    def wait_done(self, timeout: float = 90.0) -> dict:  # type: ignore[type-arg]
        assert self.agent and self.agent.stdout
        try:
            # wait(), then read(): communicate(timeout=) reads the raw pipe and would miss
            # what readline() in start_agent() already buffered
            self.agent.wait(timeout)
            out = self.agent.stdout.read()
        except subprocess.TimeoutExpired:
            self.agent.kill()
            pytest.fail(f"agent not done in {timeout}s; log: "
                        f"{(self.tmp / 'agent.log').read_text()[-2000:]}")
        assert self.agent.returncode == 0, (self.tmp / "agent.log").read_text()[-2000:]
        lines = [json.loads(x) for x in out.splitlines() if x.strip()]
        return next(x for x in lines if "done" in x)

    def close(self) -> None:
        for p in (self.agent, self.sink):
            stop_process(p)
        self.broker.close()


def made_by_agent(agent_data: Path) -> int:
    db = sqlite3.connect(agent_data / "outbox.sqlite")
    try:
        (next_seq,) = db.execute("SELECT v FROM meta WHERE k='next_seq'").fetchone()
        (depth,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
    finally:
        db.close()
    assert depth == 0, f"{depth} touches still in the outbox: not acknowledged end to end"
    return int(next_seq) - 1


def snapshot(store_path: Path) -> tuple[list[tuple], list]:  # type: ignore[type-arg]
    db = sqlite3.connect(store_path)
    try:
        rows = db.execute("SELECT seq, card, ts_ms, tq, dir, decision, reason, tid, work_day"
                          " FROM touches WHERE device=? ORDER BY seq", (DEVICE,)).fetchall()
        others = db.execute("SELECT COUNT(*) FROM touches WHERE device<>?", (DEVICE,)).fetchone()
    finally:
        db.close()
    assert others[0] == 0
    store = SqliteStore(store_path)
    try:
        wh = store.work_history(SITE)
    finally:
        store.close()
    return rows, wh


# -- the faults ---------------------------------------------------------------------------
def undisturbed(rig: Rig, rng: random.Random) -> None:
    rig.start_agent()


def kill_agent(rig: Rig, rng: random.Random) -> None:
    for _ in range(3):
        rig.start_agent()
        time.sleep(rng.uniform(0.3, TOTAL / RATE / 2))
        rig.kill_agent()
    rig.start_agent()


def kill_broker(rig: Rig, rng: random.Random) -> None:
    rig.start_agent()
    for _ in range(2):
        time.sleep(rng.uniform(0.3, TOTAL / RATE / 2))
        rig.broker.kill()
        time.sleep(rng.uniform(0.0, 1.0))
        rig.broker.start()


def kill_sink(rig: Rig, rng: random.Random) -> None:
    rig.start_agent()
    for _ in range(3):
        time.sleep(rng.uniform(0.2, TOTAL / RATE / 3))
        rig.kill_sink()
        time.sleep(rng.uniform(0.0, 0.5))
        rig.start_sink()


def cut_network(rig: Rig, rng: random.Random) -> None:
    rig.start_agent()
    time.sleep(rng.uniform(0.3, TOTAL / RATE / 2))
    rig.broker.stop()  # clean stop: the network is gone, the device keeps tapping
    time.sleep(rng.uniform(2.0, 4.0))
    rig.broker.start()


def run_round(tmp: Path, fault: Callable[[Rig, random.Random], None], seed: int) -> tuple:  # type: ignore[type-arg]
    rig = Rig(tmp)
    rng = random.Random(seed)
    try:
        rig.broker.start()
        rig.start_sink()
        fault(rig, rng)
        done = rig.wait_done()
        n = made_by_agent(rig.agent_data)
        assert done["done"] - 1 == n
        # the sink has committed everything (the outbox is empty only after the ack)
        rows, wh = snapshot(rig.store)
        return n, rows, wh, done
    finally:
        rig.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:  # type: ignore[type-arg]
    n, rows, wh, _ = run_round(tmp_path_factory.mktemp("undisturbed"), undisturbed, 0)
    assert n == TOTAL
    yield rows, wh


def test_a_free_port_is_below_the_ephemeral_range() -> None:
    """The brokers these rounds stop and start again listen below the range the kernel gives
    connecting clients their source ports from: in it, the agent reconnecting to its stopped
    broker once connected to itself and held the port (CI: the restart failed with 'Address
    already in use')."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(50)}
    assert all(1024 <= p < low for p in ports), sorted(ports)
    assert len(ports) > 40      # spread out, not one port handed to every caller


def test_undisturbed_run_is_complete(reference: tuple) -> None:  # type: ignore[type-arg]
    rows, wh = reference
    assert [r[0] for r in rows] == list(range(1, TOTAL + 1))
    assert {r[3] for r in rows[:10]} == {"never_synced"}  # the flag survives to the store
    assert {r[3] for r in rows[10:]} == {"synced"}
    assert len(wh) > 100 and any(r.last_out_ms for r in wh)


FAULTS = {"agent": kill_agent, "broker": kill_broker, "sink": kill_sink, "network": cut_network}


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("kind", list(FAULTS))
def test_fault(kind: str, round_: int, reference: tuple,  # type: ignore[type-arg]
               tmp_path: Path) -> None:
    seed = hash((kind, round_, os.environ.get("CCUS_FAULT_SEED", ""))) & 0xFFFF
    started = time.monotonic()
    n, rows, wh, done = run_round(tmp_path, FAULTS[kind], seed)
    ref_rows, ref_wh = reference
    seqs = [r[0] for r in rows]
    missing = sorted(set(range(1, n + 1)) - set(seqs))
    assert n == TOTAL
    assert not missing, f"{len(missing)} touches missing, e.g. {missing[:10]}"
    assert len(seqs) == len(set(seqs)) == n  # none twice
    assert rows == ref_rows                    # the same touches, field by field
    assert wh == ref_wh                        # the same work history
    store = SqliteStore(tmp_path / "store.sqlite")
    try:
        assert gap_report(store) == []
    finally:
        store.close()
    print(f"fault {kind} round {round_} seed {seed}: {n} touches, link {done['link']}, "
          f"{time.monotonic() - started:.1f} s")
