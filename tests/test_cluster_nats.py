"""The NATS cluster tier: the local 3-node cluster (broker/nats.py, `ccus cluster up/down`), the
JetStream sink (cloud_sink/ingest/jetstream.py), MQTT 3.1.1 devices, kill -9 of a node."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats_support import FAILOVER_S, Device311

from broker.launcher import free_port
from broker.nats import RESTART_S, START_S, NatsCluster, Node, node_env, render_node
from broker.procs import poll_until, wait_until
from cloud_sink.errors import SinkError
from cloud_sink.ingest.jetstream import JetStreamSink, JetStreamSinkError, parse_servers
from cloud_sink.store import open_store
from protocol import topics

ROOT = Path(__file__).resolve().parent.parent


# -- pure parts ---------------------------------------------------------------------------------
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
sites = st.from_regex(r"[0-9]{14}", fullmatch=True)


@given(sites, ids, st.sampled_from([topics.TOUCH, topics.ACK, topics.STATE, topics.CONFIG_ACK]))
def test_every_device_topic_maps_to_a_nats_subject_and_back(site: str, dev: str, kind: str) -> None:
    topic = topics.device(site, dev, kind)
    subject = topics.nats_subject(topic)
    assert "/" not in subject and subject.startswith("ccus.v1.")
    assert topics.mqtt_topic(subject) == topic


def test_the_touch_filter_is_the_streams_subject() -> None:
    assert topics.ALL_TOUCH_SUBJECTS == "ccus.v1.*.*.touch"
    assert topics.nats_subject(topics.ALL_LISTS) == "ccus.v1.list.>"


def test_a_node_config_routes_to_its_peers_only() -> None:
    nodes = [Node(f"n{i}", 1000 + i, 2000 + i, 3000 + i, 4000 + i) for i in (1, 2, 3)]
    text = render_node(nodes[0], nodes, Path("/data"))
    assert "server_name: n1" in text and "listen: 127.0.0.1:1001" in text
    assert "nats-route://127.0.0.1:2002" in text and "nats-route://127.0.0.1:2003" in text
    assert "nats-route://127.0.0.1:2001" not in text          # not to itself
    assert "listen: 127.0.0.1:3001" in text and "stream_replicas: 3" in text
    assert 'store_dir: "/data/n1/js"' in text


def test_nats_urls_are_parsed_and_an_empty_list_refused() -> None:
    assert parse_servers("127.0.0.1:4001, nats://h:4002") == ["nats://127.0.0.1:4001",
                                                              "nats://h:4002"]
    with pytest.raises(JetStreamSinkError):
        parse_servers(" , ")
    assert issubclass(JetStreamSinkError, SinkError)   # the package's one error base


# -- the real cluster -------------------------------------------------------------------------
def _ccus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccus.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


@pytest.mark.e2e
def test_cluster_up_starts_three_nodes_and_down_stops_them(tmp_path: Path) -> None:
    assert NatsCluster(tmp_path / "fresh").start_timeout() == START_S
    up = _ccus("cluster", "up", "--dir", str(tmp_path))
    try:
        assert up.returncode == 0, up.stderr
        c = NatsCluster(tmp_path)
        assert len(c.nodes) == 3 and all(c.healthy(n) and c._ours(n) for n in c.nodes)
        # three nodes on one machine: each runs with its share of the CPUs
        want = os.environ.get("GOMAXPROCS") or str(max(1, len(os.sched_getaffinity(0)) // 3))
        for n in c.nodes:
            environ = Path(f"/proc/{n.pid}/environ").read_bytes().split(b"\0")
            assert f"GOMAXPROCS={want}".encode() in environ, n.name
        again = _ccus("cluster", "up", "--dir", str(tmp_path))
        assert again.returncode == 1 and "running already" in again.stderr
    finally:
        down = _ccus("cluster", "down", "--dir", str(tmp_path))
    assert down.returncode == 0 and "stopped 3 node(s)" in down.stdout, down.stderr
    assert not any(c._ours(n) for n in c.nodes)
    # started again, every Raft group elects from its old term: the longer wait (CI once
    # saw more than START_S; test_store_ha starts one folder again)
    assert NatsCluster(tmp_path).start_timeout() == RESTART_S > START_S
    missing = _ccus("cluster", "down", "--dir", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no cluster.json" in missing.stderr


def test_a_node_gets_its_share_of_the_cpus_unless_gomaxprocs_is_set() -> None:
    assert node_env({}, cpus=2)["GOMAXPROCS"] == "1"
    assert node_env({}, cpus=1)["GOMAXPROCS"] == "1"
    assert node_env({}, cpus=8)["GOMAXPROCS"] == "2"
    assert node_env({"GOMAXPROCS": "4", "X": "y"}, cpus=2) == {"GOMAXPROCS": "4", "X": "y"}
    assert node_env({"GOMAXPROCS": ""}, cpus=6)["GOMAXPROCS"] == "2"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats") as c:
        yield c


def _stream_leader(c: NatsCluster) -> str:
    import nats

    async def ask() -> str:
        nc = await nats.connect(servers=c.urls)
        try:
            info = await nc.jetstream().stream_info(topics.TOUCH_STREAM)
            return str(info.cluster.leader)  # type: ignore[union-attr]
        finally:
            await nc.close()
    return asyncio.run(ask())


def _seqs(store_url: Path) -> dict[str, list[int]]:
    import sqlite3

    with sqlite3.connect(store_url) as db:
        out: dict[str, list[int]] = {}
        for dev, seq in db.execute("SELECT device, seq FROM touches ORDER BY device, seq"):
            out.setdefault(dev, []).append(seq)
        return out


@pytest.mark.e2e
def test_a_311_device_on_one_node_is_stored_and_acknowledged_through_another(
        cluster: NatsCluster, tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.sqlite")
    sink = JetStreamSink(store, cluster.urls[2:])        # the sink only knows node 3
    sink.start()
    try:
        assert sink.subscribed.wait(20), sink.error
        dev = Device311("gate-01", cluster.mqtt_ports[:1])   # the device only knows node 1
        dev.connect()
        for _ in range(50):
            dev.tap()
        wait_until(lambda: dev.acked == 50, 20, "the end-to-end ack of touch 50")
        assert dev.pending == 0
        assert _seqs(tmp_path / "store.sqlite") == {"gate-01": list(range(1, 51))}
        assert sink.totals.stored == 50
        dev.close()
    finally:
        sink.stop()
        store.close()


@pytest.mark.e2e
def test_kill_9_of_a_nats_node_under_load_loses_and_doubles_nothing(
        cluster: NatsCluster, tmp_path: Path) -> None:
    devices_n, per_device, rate = 6, 500, 100.0       # 3,000 touches, 600/s in all
    store = open_store(tmp_path / "store.sqlite")
    commits: list[tuple[float, int]] = []
    sink = JetStreamSink(store, cluster.urls,
                         on_batch=lambda r: commits.append((time.monotonic(), r.stored)))
    sink.start()
    devices = [Device311(f"gate-{i:02d}", cluster.mqtt_ports, first=i) for i in range(devices_n)]
    stop = threading.Event()
    errors: list[BaseException] = []
    connected, go = threading.Semaphore(0), threading.Event()

    def run(dev: Device311) -> None:
        try:
            # the first MQTT session on a loaded machine can take seconds (NATS creates its
            # session state in JetStream): the kill must find every device connected and sending
            dev.connect(timeout=FAILOVER_S)
            connected.release()
            go.wait()
            t0 = time.monotonic()
            while not stop.is_set():
                if dev.next_seq <= per_device and time.monotonic() >= t0 + dev.next_seq / rate:
                    dev.tap()
                dev.tend()
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    try:
        assert sink.subscribed.wait(20), sink.error
        victim = _stream_leader(cluster)
        threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in devices]
        for t in threads:
            t.start()
        for _ in devices:
            assert connected.acquire(timeout=2 * FAILOVER_S) and not errors, errors
        go.set()
        time.sleep(per_device / rate / 2)             # mid-load
        killed_at = time.monotonic()
        cluster.kill(victim)
        assert not cluster.healthy(cluster.node(victim))
        on_victim = [d.name for d in devices if d.ports[d.node] == cluster.node(victim).mqtt_port]
        done = poll_until(lambda: all(d.acked == per_device for d in devices) or errors, 60)
        state = [(d.name, d.acked, d.pending, d.connects, d.replays, d.ports[d.node])
                 for d in devices]
        assert done, (f"not all acknowledged: (device, acked, pending, connects, replays, port) "
                      f"{state}; sink {sink.totals}, error {sink.error}, killed {victim}")
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors
        # ingest gap: from the kill to the first commit of new touches after it
        after = [t for t, n in commits if t > killed_at and n]
        before = [t for t, n in commits if t <= killed_at and n]
        gap = (after[0] - killed_at) if after else float("inf")
        longest = max(b - a for a, b in zip([t for t, n in commits if n],
                                            [t for t, n in commits if n][1:], strict=False))
        print(f"\nkill -9 of stream leader {victim}: first new commit {gap:.2f} s after the "
              f"kill; longest pause between commits {longest:.2f} s; last commit before "
              f"the kill {killed_at - before[-1]:.2f} s earlier; "
              f"{sink.totals.stored} stored, {sink.totals.repeated} repeats, "
              f"reconnects {sum(d.connects for d in devices) - devices_n}, "
              f"replays {sum(d.replays for d in devices)}; on the victim {on_victim}, connects "
              f"{[d.connects for d in devices]}, disconnects {[d.disconnects for d in devices]}")
        for d in devices:
            print(d.name, [(round(t - killed_at, 2), w, cur) for t, w, cur in d.events],
                  "finished", round(d.finished_at - killed_at, 2))
        seqs = _seqs(tmp_path / "store.sqlite")
        assert seqs == {d.name: list(range(1, per_device + 1)) for d in devices}
        assert sink.totals.stored == devices_n * per_device     # each stored once
    finally:
        stop.set()
        go.set()
        for d in devices:
            d.close()
        sink.stop()
        store.close()



def _consumer_state(c: NatsCluster, durable: str) -> tuple[int, int]:
    """(touches not yet delivered, delivered but not acked) of the sinks' durable consumer."""
    import nats

    async def ask() -> tuple[int, int]:
        nc = await nats.connect(servers=c.urls)
        try:
            info = await nc.jetstream().consumer_info(topics.TOUCH_STREAM, durable)
            return int(info.num_pending or 0), int(info.num_ack_pending or 0)
        finally:
            await nc.close()
    return asyncio.run(ask())


@pytest.mark.e2e
def test_two_sinks_one_from_the_cli_share_the_durable_consumer_and_ack_everything(
        cluster: NatsCluster, tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    store = open_store(db)
    inproc = JetStreamSink(store, cluster.urls[:1], client_id="sink-1")
    inproc.start()
    ready, mport = tmp_path / "ready", free_port()
    cli = subprocess.Popen([sys.executable, "-m", "ccus.cli", "sink", "run", "--store", str(db),
                            "--nats", ",".join(cluster.urls[1:]), "--client-id", "sink-2",
                            "--batch", "20", "--ready-file", str(ready),
                            "--metrics", f"127.0.0.1:{mport}"], cwd=ROOT,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert inproc.subscribed.wait(20), inproc.error
        wait_until(lambda: ready.exists() or cli.poll() is not None, 30, "the CLI sink subscribed")
        assert cli.poll() is None
        devs = [Device311(f"gate-{i}", cluster.mqtt_ports, first=i) for i in range(3)]
        for d in devs:
            d.connect()
        for _ in range(200):
            for d in devs:
                d.tap()
            time.sleep(0.005)
        def tended() -> bool:  # a device replays when its ack stalls (two sinks: each sees half)
            for d in devs:
                d.tend()
            return all(d.acked == 200 for d in devs)
        done = poll_until(tended, 30)
        assert done, (f"acked {[(d.acked, d.pending, d.replays) for d in devs]}; stored "
                      f"{ {k: len(v) for k, v in _seqs(db).items()} }, in-process sink "
                      f"{inproc.totals}, CLI sink alive {cli.poll() is None}")
        assert _seqs(db) == {d.name: list(range(1, 201)) for d in devs}
        assert 0 < inproc.totals.stored < 600       # the CLI sink took its share
        # the CLI sink's metrics count its share (a touch may still be with its writer)
        assert 0 < _scrape(mport)["ccus_sink_touches_stored_total"] <= 600 - inproc.totals.stored
        # nothing left unacked in JetStream (a last replay's repeats may still be in flight)
        assert poll_until(lambda: _consumer_state(cluster, "sink") == (0, 0), 20, 0.5), \
            _consumer_state(cluster, "sink")
        for d in devs:
            d.close()
    finally:
        cli.terminate()
        _, err = cli.communicate(timeout=20)
        inproc.stop()
        store.close()
    assert cli.returncode == 0, err
    assert "stopped:" in err and "stored" in err


def test_an_idle_sink_logs_no_warning_and_stops_at_once(cluster: NatsCluster, tmp_path: Path) -> None:
    """An empty stream is the normal state between touches, not a fault: nats-py 2.16 ends an
    empty fetch with a bare asyncio.TimeoutError now and then, which the sink logged as
    "WARNING sink: fetch failed (); retrying" about once a second."""
    ready = tmp_path / "ready"
    cli = subprocess.Popen([sys.executable, "-m", "ccus.cli", "sink", "run", "--store",
                            str(tmp_path / "store.sqlite"), "--nats", ",".join(cluster.urls),
                            "--ready-file", str(ready), "--log-format", "text",
                            "--metrics", "off"], cwd=ROOT,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: ready.exists() or cli.poll() is not None, 30, "the sink subscribed")
        time.sleep(8)
    finally:
        cli.terminate()
        asked = time.monotonic()
        _, err = cli.communicate(timeout=30)
    stopping_s = time.monotonic() - asked
    assert cli.returncode == 0, err
    assert [line for line in err.splitlines() if "WARNING" in line] == []
    # systemd's stop: the sink used to sit out nats-py's drain (15 s, stop()'s join)
    assert stopping_s < 8, f"stopped {stopping_s:.1f} s after SIGTERM"


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


@pytest.mark.e2e
def test_sink_run_nats_serves_metrics_and_counts_a_writer_restart(
        cluster: NatsCluster, tmp_path: Path) -> None:
    """`--metrics` was ignored with `--nats` (nothing listened): the JetStream sink now fills
    the MQTT sink's registry."""
    port, ready = free_port(), tmp_path / "ready"
    cli = subprocess.Popen([sys.executable, "-m", "ccus.cli", "sink", "run", "--store",
                            str(tmp_path / "store.sqlite"), "--nats", ",".join(cluster.urls),
                            "--ready-file", str(ready), "--metrics", f"127.0.0.1:{port}"],
                           cwd=ROOT, stderr=subprocess.PIPE, text=True)
    dev = Device311("gate-m", cluster.mqtt_ports)
    try:
        wait_until(lambda: ready.exists() or cli.poll() is not None, 30, "the sink subscribed")
        assert _scrape(port)["ccus_sink_touches_stored_total"] == 0
        dev.connect()

        def taps(n: int, stored: float) -> None:
            for _ in range(n):
                dev.tap()
            assert poll_until(lambda: (dev.tend(), _scrape(port))[1].get(
                "ccus_sink_touches_stored_total") == stored, 20, 0.2), _scrape(port)
        taps(20, 20)
        m = _scrape(port)
        assert m["ccus_sink_batches_total"] >= 1 and m["ccus_sink_batch_seconds_count"] >= 1
        assert m["ccus_sink_batch_seconds_sum"] > 0 and m["ccus_sink_fetched_waiting"] == 0
        writer = int(Path(f"/proc/{cli.pid}/task/{cli.pid}/children").read_text().split()[0])
        os.kill(writer, signal.SIGKILL)
        time.sleep(0.3)
        taps(20, 40)       # the batch after the kill goes to the writer started again
        assert _scrape(port)["ccus_sink_writer_restarts_total"] == 1
        dev.close()
    finally:
        cli.terminate()
        _, err = cli.communicate(timeout=30)
    assert cli.returncode == 0, err


@pytest.mark.parametrize("where", [["--nats", "nats://127.0.0.1:4222"],
                                   ["--broker", "127.0.0.1:8883"]])
def test_sink_run_names_a_missing_tls_file_and_exits(tmp_path: Path, where: list[str]) -> None:
    """It used to start and its consumer died on FileNotFoundError with a traceback (the
    relative paths `ccus cluster up --secure` passed to a sink started in another folder)."""
    r = _ccus("sink", "run", "--store", str(tmp_path / "s.sqlite"), *where, "--metrics", "off",
              "--ca", "bundle/ca.crt", "--cert", "pki/sinks/sink-1/sink.crt",
              "--key", "pki/sinks/sink-1/sink.key")
    assert r.returncode == 2, r.stderr
    assert "--ca bundle/ca.crt: cannot read" in r.stderr and "Traceback" not in r.stderr


def test_sink_run_refuses_an_empty_nats_list(tmp_path: Path) -> None:
    r = _ccus("sink", "run", "--store", str(tmp_path / "s.sqlite"), "--nats", ",")
    assert r.returncode == 2 and "--nats needs at least one URL" in r.stderr
