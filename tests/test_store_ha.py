"""The store tier: a lost PostgreSQL connection, the pg_auto_failover pair (broker/pgha.py,
`ccus cluster up --pg`), and kill -9 of the primary under steady load through the sink."""

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sink_support import NOW, CommitSampler, fresh_store, touch

from broker.launcher import PrivateBroker
from broker.pgha import PgHa
from broker.procs import stop_process, wait_until
from cloud_sink.model import StoreError
from cloud_sink.store import Store, open_store


def _kill_backend(store: Store, url: str) -> None:
    """Terminate the store's server process from another connection (what a failover or a
    restart of the server does to it)."""
    pid = store._db.info.backend_pid  # type: ignore[attr-defined]
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_store_whose_connection_was_cut_reconnects_and_the_batch_retried_counts_once(
        tmp_path: Path, pg_url: str) -> None:
    with fresh_store("postgres", tmp_path, pg_url) as s:
        assert s.ingest([touch(1), touch(2, dir="out")], now_ms=NOW).stored == 2
        _kill_backend(s, pg_url)
        batch = [touch(2, dir="out"), touch(3)]
        # the expected fault, as one line (the writer logs it and retries the batch)
        with pytest.raises(StoreError, match="lost the connection to PostgreSQL") as lost:
            s.ingest(batch, now_ms=NOW)
        assert "\n" not in str(lost.value) and ":ccus_test@" not in str(lost.value)
        res = s.ingest(batch, now_ms=NOW)       # the same batch again, on a new connection
        assert (res.stored, res.repeated) == (1, 1)
        _kill_backend(s, pg_url)      # reads reconnect too (the ledger reads between batches)
        with pytest.raises(StoreError, match="lost the connection"):
            s.counts()
        assert s.counts()["touches"] == 3
        assert sum(r[5] for r in s.table("work_history")) == 3


# -- the pg_auto_failover pair --------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("fault_agent.py")
ROUNDS = int(os.environ.get("CCUS_HA_ROUNDS", "1"))
AGENTS = 3
TOTAL = int(os.environ.get("CCUS_HA_TOUCHES", "1500"))   # per agent
RATE = 150.0                                              # per agent: 450 touches/s in all


def _ccus(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccus.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def test_cluster_up_pg_starts_a_primary_and_a_standby_and_down_stops_them(tmp_path: Path) -> None:
    up = _ccus("cluster", "up", "--dir", str(tmp_path), "--pg")
    try:
        assert up.returncode == 0, up.stderr
        url = next(x.split(" ", 1)[1] for x in up.stdout.splitlines() if x.startswith("store: "))
        assert url.endswith("/ccus?target_session_attrs=read-write") and url.count(",") == 1
        ha = PgHa(tmp_path)
        assert url == ha.url and ha.pair_ready()
        with psycopg.connect(url, autocommit=True) as db:    # the multi-host URL: the primary
            assert db.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            assert db.info.port == ha.primary().port
            # commits wait for the standby: an acknowledged touch survives the primary's loss
            assert "pgautofailover_standby" in db.execute(
                "SHOW synchronous_standby_names").fetchone()[0]
        standby = next(n for n in ha.state.nodes if n.port != ha.primary().port)
        with psycopg.connect(f"postgresql://{ha.state.user}@127.0.0.1:{standby.port}/ccus",
                             autocommit=True) as db:
            assert db.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("CREATE TABLE kept (x INT)")
            db.execute("INSERT INTO kept VALUES (7)")
        again = _ccus("cluster", "up", "--dir", str(tmp_path), "--pg")
        assert again.returncode == 1 and "running already" in again.stderr
        down = _ccus("cluster", "down", "--dir", str(tmp_path))
        assert down.returncode == 0 and "stopped 3 PostgreSQL node(s)" in down.stdout, down.stderr
        assert not any(ha._ours(n) for n in [ha.state.monitor, *ha.state.nodes])
        # the same folder again: the same ports and data (the roles may have swapped)
        up = _ccus("cluster", "up", "--dir", str(tmp_path), "--pg")
        assert up.returncode == 0, up.stderr
        assert f"store: {url}" in up.stdout
        with psycopg.connect(url, autocommit=True) as db:
            assert db.execute("SELECT x FROM kept").fetchall() == [(7,)]
    finally:
        down = _ccus("cluster", "down", "--dir", str(tmp_path))
        PgHa(tmp_path).stop(purge=True)
    assert down.returncode == 0 and "stopped 3 PostgreSQL node(s)" in down.stdout, down.stderr


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgHa]:
    with PgHa(tmp_path_factory.mktemp("pgha")) as h:
        yield h


class Ingest(CommitSampler):
    """How many of the round's touches are committed, sampled every 50 ms: (time, count)."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(url, "SELECT count(*) FROM touches WHERE device LIKE %s",
                         (prefix + "%",))

    def count_at(self, t: float) -> int:
        return max([n for s, n in self.samples if s <= t], default=0)

    def longest_pause(self) -> tuple[float, float]:
        """(from, to): the longest time between two samples that saw more touches committed,
        while touches were still coming (the failover gap: ingest stopped, then resumed)."""
        rises = [s for (s, n), (_, m) in zip(self.samples[1:], self.samples, strict=False)
                 if n > m]
        return max(zip(rises, rises[1:], strict=False), key=lambda p: p[1] - p[0])


def _start_agent(tmp: Path, port: int, device: str) -> subprocess.Popen[str]:
    log = open(tmp / f"{device}.log", "ab")  # noqa: SIM115 - the process owns it
    p = subprocess.Popen([sys.executable, str(DRIVER), "--data", str(tmp / device), "--port",
                          str(port), "--total", str(TOTAL), "--rate", str(RATE), "--device",
                          device], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    assert p.stdout and "started" in json.loads(p.stdout.readline() or "{}")
    return p


@pytest.mark.e2e
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_kill_9_of_the_primary_under_load_fails_over_and_every_touch_is_stored_once(
        round_: int, ha: PgHa, tmp_path: Path) -> None:
    rng = random.Random(round_)
    ha.wait_pair()
    broker = PrivateBroker(tmp_path / "broker", persistence=True).start()
    ready = tmp_path / "sink.ready"
    sink_log = open(tmp_path / "sink.log", "ab")  # noqa: SIM115
    sink = subprocess.Popen([sys.executable, "-m", "ccus.cli", "sink", "run", "--store", ha.url,
                             "--broker", f"127.0.0.1:{broker.port}", "--client-id", "sink-ha",
                             "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=sink_log)
    sink_log.close()
    prefix = f"gate-ha{round_}-"
    devices = [f"{prefix}{i}" for i in range(AGENTS)]
    agents: list[subprocess.Popen[str]] = []
    ingest = Ingest(ha.url, prefix)
    try:
        wait_until(lambda: ready.exists() or sink.poll() is not None, 30, "sink subscribed")
        assert sink.poll() is None, (tmp_path / "sink.log").read_text()[-2000:]
        agents = [_start_agent(tmp_path, broker.port, d) for d in devices]
        # a random moment while the touches stream in (a run lasts TOTAL / RATE = 10 s)
        wait_until(lambda: ingest.count_at(time.monotonic()) > 300, 60, "ingest under way")
        time.sleep(rng.uniform(0.0, 3.0))
        victim = ha.primary()
        killed = time.monotonic()
        ha.kill_node(victim.name)
        for a in agents:
            a.wait(300)
            assert a.returncode == 0, (tmp_path / "sink.log").read_text()[-2000:]
        stopped, resumed = ingest.longest_pause()
        new = ha.primary()
        assert new.name != victim.name
        print(json.dumps({"round": round_, "killed": victim.name, "new_primary": new.name,
                          "committed_at_kill": ingest.count_at(killed),
                          "failover_gap_s": round(resumed - stopped, 2),
                          "kill_to_resumed_s": round(resumed - killed, 2)}))
        assert stopped <= killed + 0.2 < resumed    # the longest pause is the failover's
        with psycopg.connect(ha.url, autocommit=True) as db:
            for d in devices:
                n, distinct, lo, hi = db.execute(
                    "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM touches"
                    " WHERE device=%s", (d,)).fetchone()  # type: ignore[misc]
                assert (n, distinct, lo, hi) == (TOTAL, TOTAL, 1, TOTAL), d   # once, contiguous
            assert db.execute("SELECT count(*) FROM seq_gaps WHERE device LIKE %s AND"
                              " closed_ms IS NULL", (prefix + "%",)).fetchone() == (0,)
        for d in devices:   # acknowledged end to end: every outbox is empty
            out = sqlite3.connect(tmp_path / d / "outbox.sqlite")
            assert out.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)
            out.close()
        # the work history folded in through the failover equals a recomputation from touches
        with open_store(ha.url) as s:
            folded = s.table("work_history")
            assert sum(r[5] for r in folded) > 0
            s.rederive()
            assert s.table("work_history") == folded
        log = (tmp_path / "sink.log").read_text()
        assert "lost the connection to PostgreSQL" in log and "Traceback" not in log, log[-3000:]
        # the lost node comes back as the standby of the new primary (pg_rewind)
        t = time.monotonic()
        ha.restart_node(victim.name)
        ha.wait_pair()
        print(json.dumps({"round": round_, "rejoined_as_standby_s": round(time.monotonic() - t, 1)}))
    finally:
        ingest.stop.set()
        for p in [*agents, sink]:
            stop_process(p)  # type: ignore[arg-type]
        broker.close()
        for n in ha.state.nodes:   # after a failure: the next round needs the pair
            if not ha._ours(n):
                ha.restart_node(n.name)
