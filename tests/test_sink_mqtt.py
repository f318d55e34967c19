"""The sink over a private Mosquitto into real SQLite and PostgreSQL: bad input never blocks good."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sink_support import SITE, fresh_store, touch

from broker.launcher import PrivateBroker
from broker.procs import wait_until
from cloud_sink.acks import SeqTracker
from cloud_sink.ingest import Sink
from cloud_sink.store import Store
from protocol import topics
from protocol.touch import MAX_TS_MS, encode, to_map


@pytest.fixture
def publisher(broker: PrivateBroker) -> Iterator[mqtt.Client]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub-test", protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    yield c
    c.disconnect()
    c.loop_stop()


def start_sinks(store: Store, broker: PrivateBroker, n: int, group: str) -> list[Sink]:
    sinks = [Sink(store, broker.host, broker.port, group=group, client_id=f"{group}-{i}")
             for i in range(n)]
    for s in sinks:
        s.start()
    for s in sinks:
        assert s.subscribed.wait(10), "sink did not subscribe"
    return sinks


def watch_acks(broker: PrivateBroker, dev: str) -> tuple[mqtt.Client, list[int]]:
    """A client collecting every end-to-end ack `upto` the sink publishes for `dev`."""
    acks: list[int] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acks-{dev}",
                          protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: acks.append(cbor2.loads(m.payload)["upto"])
    watcher.connect(broker.host, broker.port)
    watcher.subscribe(topics.touch_ack(SITE, dev), qos=1)
    watcher.loop_start()
    return watcher, acks


def bad_payloads() -> list[tuple[str, bytes, str]]:
    good = to_map(touch(99))
    wrong_type = dict(good, seq="99")
    missing = {k: v for k, v in good.items() if k != "ts"}
    future_schema = dict(good, v=2)
    return [
        (topics.touch(SITE, "gate-01"), cbor2.dumps(wrong_type), "bad_field"),
        (topics.touch(SITE, "gate-01"), cbor2.dumps(missing), "missing_field"),
        (topics.touch(SITE, "gate-01"), cbor2.dumps(future_schema), "unknown_schema"),
        (topics.touch(SITE, "gate-01"), b"\xff\xfe garbage", "malformed_cbor"),
        (topics.touch(SITE, "gate-07"), encode(touch(5)), "topic_mismatch"),
    ]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_bad_input_is_dead_lettered_and_the_good_touches_behind_it_are_stored(
        kind: str, broker: PrivateBroker, publisher: mqtt.Client, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    with fresh_store(kind, tmp_path, url) as store:
        [sink] = start_sinks(store, broker, 1, f"t-{kind}")
        try:
            bad = bad_payloads()
            for i in range(1, 41):
                if i % 8 == 0:
                    topic, payload, _ = bad[(i // 8) - 1]
                    publisher.publish(topic, payload, qos=1)
                publisher.publish(topics.touch(SITE, "gate-01"), encode(touch(i)), qos=1)
            wait_until(lambda: store.counts()["touches"] >= 40 and store.counts()["dead_letters"] >= 5,
                     15, "40 touches and 5 dead letters")
            counts = store.counts()
            assert (counts["touches"], counts["dead_letters"]) == (40, 5)
            assert sorted(r[3] for r in store.dead_letters()) == sorted(b[2] for b in bad)
            assert len(store.work_history()) == 1   # technician 1, one work day, 40 taps
            assert store.work_history()[0].taps == 40
        finally:
            sink.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_two_sinks_on_one_shared_subscription_split_the_load_without_loss_or_doubles(
        kind: str, broker: PrivateBroker, publisher: mqtt.Client, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    with fresh_store(kind, tmp_path, url) as store:
        sinks = start_sinks(store, broker, 2, f"pair-{kind}")
        try:
            n = 400
            done = threading.Event()
            for i in range(1, n + 1):
                info = publisher.publish(topics.touch(SITE, "gate-02"),
                                         encode(touch(i, device="gate-02", who=1 + i % 7)), qos=1)
                if i == n:
                    info.wait_for_publish(10)
                    done.set()
            assert done.is_set()
            wait_until(lambda: sum(s.totals.stored for s in sinks) >= n, 20, f"{n} stored")
            time.sleep(0.2)  # anything doubled would arrive now
            per_sink = [s.totals.stored + s.totals.repeated for s in sinks]
            assert sum(per_sink) == n, per_sink
            assert min(per_sink) > 0, f"the load did not split: {per_sink}"
            assert store.counts()["touches"] == n
            assert sum(r.taps for r in store.work_history()) == n
        finally:
            for s in sinks:
                s.stop()


def test_future_clock_is_flagged_not_dead_lettered(broker: PrivateBroker, publisher: mqtt.Client,
                                                   tmp_path: Path) -> None:
    with fresh_store("sqlite", tmp_path, None) as store:
        [sink] = start_sinks(store, broker, 1, "clock")
        try:
            now = int(time.time() * 1000)
            for seq, ts in ((1, now + 3 * 24 * 3600_000), (2, now)):
                publisher.publish(topics.touch(SITE, "gate-03"),
                                  encode(touch(seq, device="gate-03", ts=ts)), qos=1)
            wait_until(lambda: store.counts()["touches"] >= 2, 10, "2 touches")
            assert [(f[1], f[6]) for f in store.flagged()] == [(1, "ts_future")]
            assert [r.taps for r in store.work_history()] == [1]
        finally:
            sink.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_the_devices_outbox_empties_through_the_sinks_end_to_end_ack(
        kind: str, broker: PrivateBroker, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The production Link and Sink on either store: the sink commits, publishes the end-to-end
    acknowledgement, and the device forgets its touches (with PostgreSQL too)."""
    from edge.config import MqttConfig
    from edge.link import Link
    from edge.outbox import Outbox

    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    dev, n = f"gate-e2e-{kind[:2]}", 700
    with fresh_store(kind, tmp_path, url) as store:
        ob = Outbox(tmp_path / "outbox.sqlite", reserve_bytes=0)
        for _ in range(n):
            ob.append(lambda s: encode(touch(s, device=dev, who=1 + s % 5)), created_ms=0)
        cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, inflight=50,
                         state_interval_s=60)
        link = Link(cfg, SITE, dev, ob, lambda: {"v": 1, "dev": dev, "online": True},
                    backoff_min_s=0.1, backoff_max_s=0.5)
        [sink] = start_sinks(store, broker, 1, f"e2e-{kind}")
        link.start()
        try:
            wait_until(lambda: link.acked_upto == n, 30, f"the acknowledgement to cover {n}")
            assert ob.depth() == 0
            assert store.counts()["touches"] == n
            assert [g for g in store.gaps() if g[0] == dev] == []  # type: ignore[attr-defined]
        finally:
            link.stop()
            sink.stop()
            ob.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_gap_holds_the_ack_back_until_the_replay_fills_it(
        kind: str, broker: PrivateBroker, publisher: mqtt.Client, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """The ack covers only the contiguous prefix; the gap is kept in the store (either
    backend) and closed when the missing touch arrives."""
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    dev = f"gate-gap-{kind[:2]}"
    watcher, acks = watch_acks(broker, dev)
    with fresh_store(kind, tmp_path, url) as store:
        [sink] = start_sinks(store, broker, 1, f"gap-{kind}")
        try:
            for seq in (1, 2, 4, 5):
                publisher.publish(topics.touch(SITE, dev), encode(touch(seq, device=dev)), qos=1)
            def gaps(closed: bool = False) -> list[tuple[object, ...]]:
                return [(g[2], g[3], g[5] is None) for g in store.gaps(closed) if g[0] == dev]  # type: ignore[attr-defined]
            # the gap is recorded just after the commit that makes the count 4: wait for both
            wait_until(lambda: store.counts()["touches"] == 4 and 2 in acks
                       and gaps() == [(3, 3, True)], 10, "4 stored, ack 2, the gap 3..3 open")
            assert max(acks) == 2
            publisher.publish(topics.touch(SITE, dev), encode(touch(3, device=dev)), qos=1)
            wait_until(lambda: 5 in acks, 10, "the ack to jump to 5")
            assert gaps() == []
            assert gaps(closed=True) == [(3, 3, False)]
        finally:
            sink.stop()
            watcher.loop_stop()
            watcher.disconnect()
            publisher.publish(topics.touch_ack(SITE, dev), b"", qos=1, retain=True)


def test_a_killed_writer_process_is_started_again_and_nothing_is_lost(
        broker: PrivateBroker, publisher: mqtt.Client, tmp_path: Path) -> None:
    import os
    import signal

    dev = "gate-writer-kill"
    with fresh_store("sqlite", tmp_path, None) as store:
        [sink] = start_sinks(store, broker, 1, "writer-kill")
        try:
            for seq in range(1, 201):
                publisher.publish(topics.touch(SITE, dev), encode(touch(seq, device=dev)), qos=1)
                if seq == 100:
                    wait_until(lambda: store.counts()["touches"] >= 50, 10, "50 stored")
                    os.kill(sink._proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            wait_until(lambda: store.counts()["touches"] == 200, 20, "all 200 stored")
            assert sink.totals.stored <= 200
        finally:
            sink.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_touch_kept_as_a_dead_letter_does_not_hold_the_devices_ack_back(
        kind: str, broker: PrivateBroker, publisher: mqtt.Client, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """Seq 2 breaks a rule (a clock past 9999): it is dead-lettered with its bytes and counts
    as accounted for, so the ack reaches 3 and the device can forget everything. A touch of a
    newer schema (seq 4) is not: the device keeps it for a sink that can store it. A sink
    started afresh reads the same from the store."""
    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    dev = f"gate-dl-{kind[:2]}"
    watcher, acks = watch_acks(broker, dev)
    far = cbor2.dumps(dict(to_map(touch(2, device=dev)), ts=MAX_TS_MS + 1))
    newer = cbor2.dumps(dict(to_map(touch(4, device=dev)), v=2))
    try:
        with fresh_store(kind, tmp_path, url) as store:
            [sink] = start_sinks(store, broker, 1, f"dl-{kind}")
            try:
                for payload in (encode(touch(1, device=dev)), far, encode(touch(3, device=dev)),
                                newer, encode(touch(5, device=dev))):
                    publisher.publish(topics.touch(SITE, dev), payload, qos=1)
                wait_until(lambda: store.counts()["touches"] == 3 and store.counts()["dead_letters"] == 2,
                         10, "3 stored, 2 dead letters")
                wait_until(lambda: 3 in acks, 10, "the ack to pass the dead-lettered seq 2")
                time.sleep(0.3)
                assert max(acks) == 3   # seq 4 (schema v2) stays on the device
                assert sorted((r[3], r[5]) for r in store.dead_letters()) == [
                    ("bad_field", far), ("unknown_schema", newer)]
            finally:
                sink.stop()
            # what a sink started afresh loads: touches and accounting dead letters alike
            upto, above = store.device_prefix(dev)  # type: ignore[attr-defined]
            assert SeqTracker(upto, above).upto == 3
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        publisher.publish(topics.touch_ack(SITE, dev), b"", qos=1, retain=True)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_running_sink_cuts_with_the_registry_an_operator_changes_while_it_runs(
        kind: str, broker: PrivateBroker, publisher: mqtt.Client, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """Live: a night site not registered yet is cut at the default 04:00 (its night shift
    split in two); registering it at 12:00 from another process re-derives it, and the sink's
    writer process cuts the next night shift with the new rule."""
    from cloud_sink.registry import SiteRule
    from cloud_sink.store import open_store
    from cloud_sink.workday import jst_ms

    url = request.getfixturevalue("pg_url") if kind == "postgres" else None
    night, dev = "13100000000002", f"gate-night-{kind[:2]}"
    shift = lambda seq, day: [  # noqa: E731
        touch(seq, device=dev, site=night, ts=jst_ms(2026, 11, day, 21)),
        touch(seq + 1, device=dev, site=night, dir="out", ts=jst_ms(2026, 11, day + 1, 5, 30))]
    with fresh_store(kind, tmp_path, url) as store:
        [sink] = start_sinks(store, broker, 1, f"night-{kind}")
        try:
            for t in shift(1, 24):
                publisher.publish(topics.touch(night, dev), encode(t), qos=1)
            wait_until(lambda: store.counts()["touches"] == 2, 10, "the first shift stored")
            assert [(r.work_day, r.cut_hour) for r in store.work_history()] == [
                ("2026-11-24", 4), ("2026-11-25", 4)]
            operator = open_store(store.url)
            operator.import_sites([SiteRule(night, "夜間現場", "site", "東京都", "20000000000001",
                                            12, "2026-01-01")])
            operator.close()
            for t in shift(3, 25):
                publisher.publish(topics.touch(night, dev), encode(t), qos=1)
            wait_until(lambda: store.counts()["touches"] == 4, 10, "the second shift stored")
            assert [(r.work_day, r.taps, r.entry_missing, r.exit_missing, r.cut_hour)
                    for r in store.work_history()] == [("2026-11-24", 2, False, False, 12),
                                                       ("2026-11-25", 2, False, False, 12)]
        finally:
            sink.stop()
