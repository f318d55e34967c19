"""Moving a store: SQLite (filled by the real sink over Mosquitto) -> `ccus sink export` ->
`ccus sink import` into PostgreSQL -> a sink on PostgreSQL acknowledges exactly what the old
one did, for every device, and the derived tables are equal."""

import subprocess
import sys
import threading
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sink_support import SITE, derived, touch

from broker.launcher import PrivateBroker
from broker.procs import wait_until
from cloud_sink.ingest import Sink
from cloud_sink.store import open_store
from cloud_sink.workday import jst_ms
from protocol import topics
from protocol.ack import decode_ack_msg
from protocol.touch import encode, to_map

CCUS = str(Path(sys.executable).parent / "ccus")
DEVICES = {"gate-mv": ("gate", 30), "train-mv": ("training", 20), "vend-mv": ("vending", 12)}


def payloads() -> list[tuple[str, bytes]]:
    out = []
    for dev, (role, n) in DEVICES.items():
        facts = {"training": {"course": "C-1"},
                 "vending": {"slot": 1, "result": "dispensed", "contractor": "13100000000009"}
                 }.get(role, {})
        for seq in range(1, n + 1):
            t = touch(seq, device=dev, role=role, who=seq % 7, facts=facts,  # type: ignore[arg-type]
                      ts=jst_ms(2020, 1, 1, 8) if seq == 5 else 0)         # one flagged (ts_past)
            out.append((topics.touch(SITE, dev), encode(t)))
    # the gate's last seq as a dead letter of its own that accounts for it (a bad field)
    bad = dict(to_map(touch(31, device="gate-mv")), tid=12345)
    out.append((topics.touch(SITE, "gate-mv"), cbor2.dumps(bad)))
    return out


def acks_seen(broker: PrivateBroker, name: str) -> tuple[mqtt.Client, dict[str, int]]:
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        where = topics.parse_device_topic(m.topic)
        if where and m.payload:
            with lock:
                seen[where[1]] = decode_ack_msg(m.payload).upto
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.subscribe(topics.touch_ack(SITE, "+"), qos=1)
    c.loop_start()
    return c, seen


@pytest.mark.parametrize("fmt", ["jsonl", "cbor"])
def test_a_store_moved_from_sqlite_to_postgresql_keeps_every_devices_acknowledgement(
        fmt: str, broker: PrivateBroker, pg_url: str, tmp_path: Path) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as db:  # the module's database, emptied
        db.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    want = {"gate-mv": 31, "train-mv": 20, "vend-mv": 12}
    src = open_store(tmp_path / "old.sqlite")
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-mv-{fmt}", protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    sink = Sink(src, broker.host, broker.port, group=f"mv-old-{fmt}", client_id=f"mv-old-{fmt}")
    sink.start()
    watcher, seen = acks_seen(broker, f"acks-old-{fmt}")
    try:
        assert sink.subscribed.wait(10)
        for topic, payload in payloads():
            pub.publish(topic, payload, qos=1)
        wait_until(lambda: seen == want, 15, f"the old store's acks {want}")
    finally:
        sink.stop()
        watcher.loop_stop()
        watcher.disconnect()
    before = derived(src)
    counts = src.counts()
    src.close()
    out = tmp_path / f"store.{fmt}"
    p = subprocess.run([CCUS, "sink", "export", "--store", str(tmp_path / "old.sqlite"),
                        "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "62 touches, 1 dead letters" in p.stdout
    p = subprocess.run([CCUS, "sink", "import", "--store", pg_url, str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "62 stored" in p.stdout and "carried over: 1 dead letters" in p.stdout
    assert "it/s" in p.stderr or "B/s" in p.stderr  # the progress bar
    # again: nothing doubles
    p = subprocess.run([CCUS, "sink", "import", "--store", pg_url, "--no-progress", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert "0 stored, 62 already stored" in p.stdout and "carried over: 0 dead letters" in p.stdout

    dst = open_store(pg_url)
    for dev in want:  # forget the old sink's retained acks: the new sink must say them itself
        pub.publish(topics.touch_ack(SITE, dev), b"", qos=1, retain=True).wait_for_publish(5)
    sink = Sink(dst, broker.host, broker.port, group=f"mv-new-{fmt}", client_id=f"mv-new-{fmt}")
    sink.start()
    try:
        assert sink.announced.wait(10)
        watcher, seen = acks_seen(broker, f"acks-new-{fmt}")
        wait_until(lambda: seen == want, 10, f"the new store's acks {want}")
        assert derived(dst) == before
        assert dst.counts() == counts
        assert dst.gaps() == []  # type: ignore[attr-defined]
        watcher.loop_stop()
        watcher.disconnect()
    finally:
        sink.stop()
        dst.close()
        for dev in want:
            pub.publish(topics.touch_ack(SITE, dev), b"", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()


def test_postgresql_to_sqlite_in_chunks_keeps_touches_dead_letters_devices_courses(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other direction, in process, with the export's chunks tiny (keyset pages across
    devices), the device registry, a course, the site registry (a 06:00 cut: a 05:00 touch is
    the day before) with a contractor link and a technician: the new store equals the old."""
    import psycopg
    from sink_support import NOW, tid

    from cloud_sink import export
    from cloud_sink.importer import import_file
    from cloud_sink.model import Course, DeadLetter, Device
    from cloud_sink.registry import ChainLink, SiteRule, Technician

    monkeypatch.setattr(export, "CHUNK", 3)
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    src = open_store(pg_url)
    src.register_devices([Device("gate-a", SITE, "gate")])
    src.import_courses([Course("C-1", "足場", "2026-11-01", "2026-11-30", 12, SITE)])
    src.import_sites([SiteRule(SITE, "現場A", "site", "東京都", "13100000000009", 6,  # type: ignore[attr-defined]
                               "2026-01-01")])
    src.import_chain([ChainLink(SITE, "13100000000009", "", "元請")])  # type: ignore[attr-defined]
    src.import_technicians([Technician(tid(1), "13100000000009", "山田")])  # type: ignore[attr-defined]
    bad = dict(to_map(touch(4, device="gate-b")), tid=1)
    early = jst_ms(2026, 11, 26, 5)
    src.ingest([touch(s, device=d, ts=early if s == 5 else 0)
                for d in ("gate-a", "gate-b") for s in (1, 2, 3, 5)],
               [DeadLetter(topics.touch(SITE, "gate-b"), cbor2.dumps(bad), "bad_field", "tid")],
               now_ms=NOW)
    before, counts, devices, courses = derived(src), src.counts(), src.devices(), src.courses()
    registry = (src.sites(), src.chain(), src.technicians())  # type: ignore[attr-defined]
    assert {r[2] for r in before["work_history"]} == {"2026-11-25", "2026-11-26"}  # the cut
    n = export.export_store(src, tmp_path / "pg.cbor", progress=False)
    src.close()
    assert n == {"touch": 8, "_dead": 1, "_device": 1, "_course": 1, "_site": 1, "_chain": 1,
                 "_employer": 1}
    dst = open_store(tmp_path / "new.sqlite")
    try:
        carried: dict[str, int] = {}
        res = import_file(dst, tmp_path / "pg.cbor", progress=False, carried=carried)
        assert (res.stored, carried) == (8, {"devices": 1, "courses": 1, "dead_letters": 1,
                                             "sites": 1, "chain": 1, "employers": 1})
        assert derived(dst) == before and dst.counts() == counts
        assert dst.devices() == devices and dst.courses() == courses
        assert (dst.sites(), dst.chain(), dst.technicians()) == registry  # type: ignore[attr-defined]
        # gate-a misses 4; gate-b's 4 is its dead letter: only gate-a has a gap
        assert [(g[0], g[2], g[3]) for g in dst.gaps()] == [("gate-a", 4, 4)]  # type: ignore[attr-defined]
    finally:
        dst.close()
