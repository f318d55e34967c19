"""Open gaps are derived from what is stored: a sink or writer restart can neither open a gap
again nor keep a filled one open (real Mosquitto, real SQLite; the ledger on the real store)."""

import random
from pathlib import Path

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from sink_support import NOW, SITE, touch

from broker.launcher import PrivateBroker
from broker.procs import wait_until
from cloud_sink.acks import AckLedger
from cloud_sink.ingest import Sink
from cloud_sink.store import open_store
from protocol import topics
from protocol.touch import encode


def missing(seqs: set[int]) -> list[tuple[int, int]]:
    """The missing ranges below the highest seq (the spec, by brute force)."""
    out, start = [], None
    for s in range(1, max(seqs, default=0) + 1):
        if s not in seqs and start is None:
            start = s
        if s in seqs and start is not None:
            out.append((start, s - 1))
            start = None
    return out


def open_gaps(store: object, dev: str) -> list[tuple[int, int]]:
    return [(int(g[2]), int(g[3])) for g in store.gaps() if g[0] == dev]  # type: ignore[attr-defined]


def test_a_gap_open_across_a_sink_restart_closes_when_it_is_filled(
        broker: PrivateBroker, tmp_path: Path) -> None:
    dev = "gate-gap-restart"
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub-gaps", protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    store = open_store(tmp_path / "s.sqlite")

    def send(*seqs: int) -> None:
        for s in seqs:
            pub.publish(topics.touch(SITE, dev), encode(touch(s, device=dev)), qos=1).wait_for_publish(5)

    def run_sink() -> Sink:
        sink = Sink(store, broker.host, broker.port, group="gaps", client_id="sink-gaps")
        sink.start()
        assert sink.subscribed.wait(10)
        return sink

    try:
        sink = run_sink()
        send(1, 2, 7, 8)
        wait_until(lambda: open_gaps(store, dev) == [(3, 6)], 10, "the gap 3..6 open")
        sink.stop()           # the sink and its writer process end mid-gap
        sink = run_sink()     # a new process: an empty ledger
        send(3, 4)
        wait_until(lambda: store.counts()["touches"] == 6, 10, "6 stored")
        wait_until(lambda: open_gaps(store, dev) == [(5, 6)], 10, "the gap shrank to 5..6")
        sink.stop()
        sink = run_sink()
        send(5, 6)
        wait_until(lambda: store.counts()["touches"] == 8, 10, "8 stored")
        wait_until(lambda: open_gaps(store, dev) == [], 10, "no open gap")
        sink.stop()
        rows = [g for g in store.gaps(include_closed=True) if g[0] == dev]  # type: ignore[attr-defined]
        assert rows[0][2:4] == (3, 6) and all(g[5] is not None for g in rows)  # all closed
        assert {g[4] for g in rows} == {rows[0][4]}  # a shrunk gap keeps its first-seen time
    finally:
        pub.loop_stop()
        pub.disconnect()
        store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 30), seed=st.integers(0, 2**32 - 1),
       batches=st.integers(1, 8), restarts=st.lists(st.booleans(), min_size=8, max_size=8),
       keep=st.floats(0.3, 1.0))
def test_open_gaps_are_the_missing_ranges_of_the_stored_seqs_whatever_the_order_and_restarts(
        tmp_path_factory: object, n: int, seed: int, batches: int, restarts: list[bool],
        keep: float) -> None:
    """Arbitrary arrival orders (repeats, holes that stay) in batches, the writer's ledger
    replaced by a fresh one (a restarted process, a new connection) between batches: after
    every batch the store's open gaps are exactly the missing ranges of what is stored."""
    rnd = random.Random(seed)
    arrivals = [s for s in range(1, n + 1) if rnd.random() < keep]
    arrivals += rnd.choices(arrivals, k=len(arrivals) // 3) if arrivals else []
    rnd.shuffle(arrivals)
    path = Path(tmp_path_factory.mktemp("gaps")) / "s.sqlite"  # type: ignore[attr-defined]
    store = open_store(path)
    ledger = AckLedger(store)  # type: ignore[arg-type]
    stored: set[int] = set()
    size = max(1, len(arrivals) // batches)
    try:
        for i in range(0, len(arrivals), size):
            chunk = arrivals[i:i + size]
            store.ingest([touch(s) for s in chunk], now_ms=NOW)
            stored |= set(chunk)
            if restarts[(i // size) % len(restarts)]:
                store.close()
                store = open_store(path)
                ledger = AckLedger(store)  # type: ignore[arg-type]
            acks = ledger.observe([(SITE, "gate-01", s) for s in chunk])
            assert open_gaps(store, "gate-01") == missing(stored)
            assert store.stored_gaps("gate-01") == missing(stored)  # type: ignore[attr-defined]
            upto = missing(stored)[0][0] - 1 if missing(stored) else max(stored, default=0)
            assert [a.upto for a in acks] == [upto] or not acks and ledger.upto("gate-01") == upto
    finally:
        store.close()
