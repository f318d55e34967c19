"""The sink's Prometheus endpoint, scraped over HTTP from a real `ccus sink run` (real
Mosquitto, SQLite): counters move with touches, dead letters by reason, gaps, writer restarts."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from sink_support import SITE, touch

from broker.launcher import PrivateBroker, free_port
from broker.procs import stop_process, wait_until
from cloud_sink.metrics import DEFAULT_LISTEN, MetricsError, parse_listen
from protocol import topics
from protocol.touch import encode

CCUS = str(Path(sys.executable).parent / "ccus")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def writer_pid(sink_pid: int) -> int:
    kids = Path(f"/proc/{sink_pid}/task/{sink_pid}/children").read_text().split()
    assert len(kids) == 1, kids
    return int(kids[0])


def test_parse_listen() -> None:
    assert parse_listen(DEFAULT_LISTEN) == ("127.0.0.1", 9464)
    assert parse_listen("off") is None and parse_listen("OFF") is None
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("9464", "host:", "host:http", "h:70000"):
        with pytest.raises(MetricsError):
            parse_listen(bad)


def test_the_metrics_endpoint_counts_touches_dead_letters_gaps_and_writer_restarts(
        broker: PrivateBroker, tmp_path: Path) -> None:
    port = free_port()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([CCUS, "sink", "run", "--store", str(tmp_path / "s.sqlite"),
                             "--broker", f"{broker.host}:{broker.port}", "--group", "metrics",
                             "--client-id", "sink-metrics", "--metrics", f"127.0.0.1:{port}",
                             "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub-metrics", protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    dev = "gate-metrics"
    try:
        wait_until(ready.exists, 15, "the sink subscribed")
        m0 = scrape(port)
        assert value(m0, "ccus_sink_touches_stored_total") == 0
        assert value(m0, "ccus_sink_epoch_ms") > 0
        for seq in (1, 2, 3, 5):   # 4 missing: one open gap
            pub.publish(topics.touch(SITE, dev), encode(touch(seq, device=dev)), qos=1)
        pub.publish(topics.touch(SITE, dev), b"\xff not cbor", qos=1)
        wait_until(lambda: value(scrape(port), "ccus_sink_touches_stored_total") == 4, 10,
                   "4 touches counted")
        wait_until(lambda: value(scrape(port), "ccus_sink_dead_letters_total",
                                 reason="malformed_cbor") == 1, 10, "the dead letter counted")
        m1 = scrape(port)
        assert value(m1, "ccus_sink_open_gaps") == 1
        assert value(m1, "ccus_sink_batch_seconds_count") >= 1
        assert value(m1, "ccus_sink_batch_seconds_sum") > 0
        pub.publish(topics.touch(SITE, dev), encode(touch(1, device=dev)), qos=1)  # a repeat
        wait_until(lambda: value(scrape(port), "ccus_sink_touches_repeated_total") == 1, 10,
                   "the repeat counted")
        os.kill(writer_pid(proc.pid), signal.SIGKILL)
        wait_until(lambda: value(scrape(port), "ccus_sink_writer_restarts_total") == 1, 10,
                   "the writer restart counted")
        time.sleep(0.5)
        pub.publish(topics.touch(SITE, dev), encode(touch(4, device=dev)), qos=1)  # fills the gap
        wait_until(lambda: value(scrape(port), "ccus_sink_touches_stored_total") == 5
                   and value(scrape(port), "ccus_sink_open_gaps") == 0, 10, "gap closed")
    finally:
        pub.loop_stop()
        pub.disconnect()
        stop_process(proc)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "Traceback" not in err.split("the writer process ended")[0], err


def test_metrics_off_serves_nothing_and_a_taken_port_is_one_line(
        broker: PrivateBroker, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([CCUS, "sink", "run", "--store", str(tmp_path / "s.sqlite"),
                            "--broker", f"{broker.host}:{broker.port}",
                            "--metrics", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in p.stderr
    port = free_port()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([CCUS, "sink", "run", "--store", str(tmp_path / "s.sqlite"),
                             "--broker", f"{broker.host}:{broker.port}", "--client-id", "sink-off",
                             "--metrics", "off", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(ready.exists, 15, "the sink subscribed")
        with pytest.raises(OSError):
            scrape(port)
    finally:
        stop_process(proc)


def test_the_default_is_on_at_9464_and_a_second_sink_on_the_host_runs_without(
        tmp_path: Path) -> None:
    """The parser's default; the default port taken (here by a plain socket, or another
    helper's sink) gives a warning and the sink runs; scraping 9464 itself is not asserted:
    other processes on this host may hold it."""
    import argparse
    import socket

    from cloud_sink.cli import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["sink", "run", "--store", "x.sqlite"])
    assert args.metrics is None  # -> DEFAULT_LISTEN
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 9464))
            s.listen()
        except OSError:
            pass  # someone holds it already: the same case
        ready = tmp_path / "ready"
        proc = subprocess.Popen([CCUS, "sink", "run", "--store", str(tmp_path / "s.sqlite"),
                                 "--broker", "127.0.0.1:1", "--ready-file", str(ready)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(2.5)
            assert proc.poll() is None  # still running (reconnecting to the absent broker)
        finally:
            stop_process(proc)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "running without metrics" in err and "Traceback" not in err
