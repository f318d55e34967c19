"""The device-side ListUpdater: every refusal reason, atomic installs, and a property test over
random orders of snapshots, deltas, chunks and corruptions."""

import dataclasses
import hashlib
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from edge.idlist import ListUpdater, UpdateReason, load_list, open_list
from edge.idlist.codec import build_rows
from edge.idlist.delta import Delta, diff
from edge.idlist.dist import (
    DELTA_PURPOSE,
    MANIFEST_PURPOSE,
    Message,
    chunk_topic,
    delta_messages,
    delta_topic,
    manifest_for,
    manifest_topic,
    snapshot_messages,
)
from edge.signing import generate_key, seal

KEY = generate_key()
ROGUE = generate_key()
CHUNK = 700  # small chunks so every snapshot has several


def make_versions(n: int = 5, size: int = 60, seed: int = 7) -> dict[int, bytes]:
    rnd = random.Random(seed)
    rows = {}
    for _ in range(size):
        t = rnd.randrange(10**14)
        rows[t] = (t, rnd.randrange(3), rnd.randrange(1, 5), (rnd.randbytes(8),))
    out = {}
    for v in range(1, n + 1):
        out[v] = build_rows(list(rows.values()), name="main", version=v, issued_ms=1000 * v)
        for t in rnd.sample(sorted(rows), 6):  # change some, remove some, add some
            if rnd.random() < 0.5:
                del rows[t]
            else:
                rows[t] = (t, rnd.randrange(3), rnd.randrange(1, 5), (rnd.randbytes(7),))
        for _ in range(4):
            t = rnd.randrange(10**14)
            rows[t] = (t, 0, 1, (rnd.randbytes(4), rnd.randbytes(10)))
    return out


VERSIONS = make_versions()
HASHES = {v: load_list(d).body_hash for v, d in VERSIONS.items()}


def snap(v: int, key=KEY) -> list[Message]:
    return snapshot_messages(VERSIONS[v], key, CHUNK)


def delta(a: int, b: int, key=KEY, part=400) -> list[Message]:
    return delta_messages(diff(load_list(VERSIONS[a]), load_list(VERSIONS[b])), key, part)


def make(directory, **kw) -> ListUpdater:
    """An updater whose clock is just after the test lists were issued (issued_ms 1000 * v)."""
    return ListUpdater(directory, "main", [KEY.public_key()], now_ms=lambda: 10_000, **kw)


def feed(u: ListUpdater, msgs):
    """Deliver `msgs` live, as a broker does, keeping the retained ones; when an outcome asks
    for a re-fetch (a SUBSCRIBE), the broker sends the retained messages under it again."""
    retained: dict[str, bytes] = u.__dict__.setdefault("_test_retained", {})
    out = []
    for m in msgs:
        if m.payload:
            retained[m.topic] = m.payload
        else:
            retained.pop(m.topic, None)
        got = u.handle(m.topic, m.payload)
        out += got
        for o in got:
            if o.fetch:
                for t, p in sorted(retained.items()):
                    if topic_matches_sub(o.fetch, t):
                        out += u.handle(t, p)
    return out


def reasons(outcomes):
    return [o.reason for o in outcomes if o.kind == "refused"]


@pytest.fixture
def updater(tmp_path):
    return make(tmp_path)


def test_snapshot_in_any_order_is_installed(updater):
    msgs = snap(3)
    random.Random(1).shuffle(msgs)
    out = feed(updater, msgs)
    assert [o.version for o in out if o.kind == "applied"] == [3]
    assert updater.applied_version == 3 and updater.current.body_hash == HASHES[3]
    assert open_list(updater.path).body_hash == HASHES[3]
    assert not list(updater.directory.glob(".*.part"))


def test_deltas_chain_and_catch_up_from_a_snapshot(updater):
    feed(updater, snap(1))
    out = feed(updater, delta(2, 3) + delta(1, 2))  # out of order: 2-3 waits for 1-2
    assert [(o.kind, o.reason) for o in out if o.reason] == [("pending", UpdateReason.DELTA_GAP)]
    assert [o.version for o in out if o.kind == "applied"] == [2, 3]
    assert updater.current.body_hash == HASHES[3]
    # the device then misses the 3-4 delta: the version-5 snapshot catches it up
    out = feed(updater, delta(4, 5) + snap(5))
    assert updater.applied_version == 5 and updater.current.body_hash == HASHES[5]


def test_previous_list_is_served_until_the_new_one_is_complete(updater):
    feed(updater, snap(1))
    old = updater.current
    msgs = snap(2)
    feed(updater, msgs[:-1][:2] + [msgs[-1]])  # manifest + some chunks
    assert updater.current is old and updater.applied_version == 1
    feed(updater, msgs[2:-1])
    assert updater.applied_version == 2
    tid = f"{load_list(VERSIONS[1]).rows()[0][0]:014d}"
    assert old.by_tid(tid) is not None  # the old mapping still answers whoever holds it


@pytest.mark.parametrize("mangle, reason", [
    (lambda d: d[:-1], UpdateReason.CHUNK_TRUNCATED),
    (lambda d: d + b"x", UpdateReason.CHUNK_LENGTH),
    (lambda d: bytes([d[0] ^ 1]) + d[1:], UpdateReason.CHUNK_HASH),
])
def test_bad_chunks_are_refused_and_good_ones_still_complete(updater, mangle, reason):
    msgs = snap(1)
    chunks, manifest = msgs[:-1], msgs[-1]
    out = feed(updater, [manifest, Message(chunks[1].topic, mangle(chunks[1].payload))])
    assert reasons(out) == [reason]
    feed(updater, chunks)
    assert updater.applied_version == 1


def test_early_bad_chunk_is_refused_when_its_manifest_arrives(updater):
    msgs = snap(1)
    bad = Message(msgs[0].topic, b"\x00" * len(msgs[0].payload))
    out = feed(updater, [bad] + msgs[1:])  # spooled, checked with the manifest
    assert UpdateReason.CHUNK_HASH in reasons(out) and updater.applied_version == 0
    feed(updater, msgs[:1])
    assert updater.applied_version == 1


def test_chunk_index_outside_the_manifest(updater):
    msgs = snap(1)
    out = feed(updater, [msgs[-1], Message(chunk_topic("main", 1, 999), b"x")])
    assert reasons(out) == [UpdateReason.CHUNK_UNKNOWN]


def _manifest(v: int, key=KEY, **changes) -> Message:
    m = dataclasses.replace(manifest_for(VERSIONS[v], CHUNK), **changes)
    return Message(manifest_topic(m.name), seal(key, MANIFEST_PURPOSE, m.to_doc()))


def test_manifest_refusals(updater):
    assert reasons(feed(updater, [_manifest(1, key=ROGUE)])) == [UpdateReason.UNKNOWN_KEY]
    forged = bytearray(_manifest(1).payload)
    forged[-5] ^= 1
    assert reasons(feed(updater, [Message(manifest_topic("main"), bytes(forged))])) in (
        [UpdateReason.BAD_SIGNATURE], [UpdateReason.MALFORMED])
    assert reasons(feed(updater, [Message(manifest_topic("main"), b"\xff garbage")])) == [
        UpdateReason.MALFORMED]
    assert reasons(feed(updater, [_manifest(1, name="other")])) == [UpdateReason.WRONG_LIST]
    assert reasons(feed(updater, [Message(manifest_topic("other"), _manifest(1).payload)])) == [
        UpdateReason.WRONG_LIST]
    feed(updater, snap(2))
    assert reasons(feed(updater, [_manifest(1)])) == [UpdateReason.STALE_VERSION]
    again = feed(updater, [snap(2)[-1]])
    assert [(o.kind, o.reason) for o in again] == [("ignored", UpdateReason.ALREADY_APPLIED)]
    assert updater.applied_version == 2


@pytest.mark.parametrize("changes, reason", [
    ({"issued_ms": 1}, UpdateReason.HEADER_MISMATCH),
    ({"sha256": bytes(32)}, UpdateReason.SNAPSHOT_HASH),
])
def test_signed_but_inconsistent_manifests_are_refused(updater, changes, reason):
    msgs = snap(1)
    out = feed(updater, [_manifest(1, **changes)] + msgs[:-1])
    assert reasons(out) == [reason] and updater.current is None
    assert not list(updater.directory.glob(".*.part"))


def test_signed_bytes_that_are_not_a_list_are_refused(updater):
    junk = b"not a list " * 100
    m = dataclasses.replace(manifest_for(VERSIONS[1], CHUNK), size=len(junk),
                            sha256=hashlib.sha256(junk).digest(),
                            chunks=(hashlib.sha256(junk).digest(),),
                            chunk_size=len(junk))
    out = feed(updater, [Message(manifest_topic("main"), seal(KEY, MANIFEST_PURPOSE, m.to_doc())),
                         Message(chunk_topic("main", 1, 0), junk)])
    assert reasons(out) == [UpdateReason.LIST_FORMAT] and updater.current is None


def _delta_msg(d: Delta, key=KEY, topic=None) -> Message:
    payload = seal(key, DELTA_PURPOSE, d.to_doc())
    return Message(topic or delta_topic(d.name, d.from_version, d.to_version), payload)


def test_delta_refusals(updater):
    d12 = diff(load_list(VERSIONS[1]), load_list(VERSIONS[2]))
    d23 = diff(load_list(VERSIONS[2]), load_list(VERSIONS[3]))
    feed(updater, snap(2))
    assert [(o.kind, o.reason) for o in feed(updater, [_delta_msg(d12)])] == [
        ("ignored", UpdateReason.STALE_VERSION)]
    d13 = dataclasses.replace(d23, from_version=1)  # claims an older base
    assert reasons(feed(updater, [_delta_msg(d13)])) == [UpdateReason.DELTA_BASE]
    other_base = dataclasses.replace(d23, base_hash=bytes(32))
    assert reasons(feed(updater, [_delta_msg(other_base)])) == [UpdateReason.DELTA_BASE]
    bad_result = dataclasses.replace(d23, result_hash=bytes(32))
    assert reasons(feed(updater, [_delta_msg(bad_result)])) == [UpdateReason.DELTA_RESULT_HASH]
    invalid = dataclasses.replace(d23, remove=(*d23.remove, 12345))
    assert reasons(feed(updater, [_delta_msg(invalid)])) == [UpdateReason.DELTA_INVALID]
    assert reasons(feed(updater, [_delta_msg(d23, key=ROGUE)])) == [UpdateReason.UNKNOWN_KEY]
    assert reasons(feed(updater, [_delta_msg(dataclasses.replace(d23, name="other"))])) == [
        UpdateReason.WRONG_LIST]
    assert reasons(feed(updater, [_delta_msg(d23, topic=delta_topic("main", 2, 4))])) == [
        UpdateReason.TOPIC_MISMATCH]
    parts = delta(2, 3)
    truncated = [Message(p.topic, p.payload[:-3]) for p in parts]
    assert reasons(feed(updater, truncated))[0] in (UpdateReason.MALFORMED,
                                                    UpdateReason.BAD_SIGNATURE)
    assert updater.applied_version == 2 and updater.current.body_hash == HASHES[2]
    assert [o.version for o in feed(updater, parts) if o.kind == "applied"] == [3]


def test_bounds_on_what_waits(tmp_path):
    u = make(tmp_path, max_pending_deltas=1)
    out = feed(u, delta(2, 3) + delta(3, 4))  # nothing applied yet: both would wait
    assert reasons(out) == [UpdateReason.PENDING_FULL]


def test_restart_serves_the_installed_list_and_drops_half_assemblies(tmp_path):
    u = make(tmp_path)
    feed(u, snap(1))
    feed(u, [snap(2)[-1], snap(2)[0]])  # half of version 2
    assert list(tmp_path.glob(".main.2.part"))
    u2 = make(tmp_path)
    assert u2.applied_version == 1 and not list(tmp_path.glob(".main.*.part"))
    (tmp_path / "main.idl").write_bytes(b"garbage")
    u3 = make(tmp_path)
    assert u3.current is None and u3.load_error
    feed(u3, snap(2))
    assert u3.applied_version == 2


def test_foreign_topics_and_cleared_retained_messages(updater):
    assert reasons(updater.handle("ccus/v1/list/main/bogus", b"x")) == [UpdateReason.MALFORMED]
    assert updater.handle(chunk_topic("main", 9, 0), b"")[0].kind == "ignored"
    assert updater.applied_version == 0


# -- property: any order, any corruption: only complete verified versions, never backwards --

def _corrupt(msg: Message, how: int) -> Message:
    p = msg.payload
    if how == 0:
        return Message(msg.topic, p[: len(p) // 2])
    if how == 1:
        return Message(msg.topic, bytes([p[0] ^ 0xFF]) + p[1:])
    if how == 2:
        return Message(msg.topic.replace("/main/", "/other/"), p)
    return Message(msg.topic, p[:-1] + bytes([p[-1] ^ 1]))


POOL: list[Message] = []
for _v in VERSIONS:
    POOL += snap(_v)
for _a, _b in [(1, 2), (2, 3), (3, 4), (4, 5), (1, 3), (2, 5)]:
    POOL += delta(_a, _b)
POOL += [m for m in snap(3, key=ROGUE) if "manifest" in m.topic] + delta(3, 4, key=ROGUE)
POOL += [Message(chunk_topic("main", v, 999), b"x") for v in (2, 4)]  # outside any manifest


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, 7)), max_size=120))
def test_served_list_is_always_a_complete_signed_version_and_never_goes_back(picks):
    with tempfile.TemporaryDirectory() as d:
        u = make(d)
        last = 0
        for i, how in picks:
            msg = POOL[i] if how >= 4 else _corrupt(POOL[i], how)
            for o in u.handle(msg.topic, msg.payload):
                assert o.kind in {"applied", "pending", "ignored", "refused"}
                if o.kind == "applied":
                    assert o.version > last
            cur = u.current
            if cur is not None:
                assert cur.body_hash == HASHES[cur.version]  # exactly what was signed
                assert open_list(Path(d) / "main.idl").body_hash == HASHES[cur.version]
            assert u.applied_version >= last
            last = u.applied_version
            held = sum(len(p) for _, ps in u._parts.values() for p in ps.values())
            assert u._parts_bytes == held  # the running budget never drifts
        feed(u, snap(5))  # the latest retained snapshot always catches a device up
        assert u.applied_version == 5 and u.current.body_hash == HASHES[5]


def test_snapshot_completing_from_the_spool_with_stray_chunks_left(updater):
    msgs = snap(1)
    stray = Message(chunk_topic("main", 1, 999), b"x")  # sorts after the real chunks
    out = feed(updater, msgs[:-1] + [stray, msgs[-1]])
    assert updater.applied_version == 1
    assert [o.kind for o in out].count("applied") == 1


def test_delta_overtaking_a_snapshot_assembly_of_the_same_version(updater):
    feed(updater, snap(1))
    msgs = snap(2)
    feed(updater, [msgs[-1], msgs[0]])  # assembling version 2
    out = feed(updater, delta(1, 2))  # ... when the delta to 2 arrives
    assert [o.version for o in out if o.kind == "applied"] == [2]
    late = feed(updater, msgs[1:-1])
    assert all(o.kind == "ignored" for o in late)
    assert open_list(updater.path).body_hash == HASHES[2] == updater.current.body_hash
    assert not list(updater.directory.glob(".*.part"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(range(len(snap(2)))),
       st.lists(st.tuples(st.integers(3, 10**6), st.integers(0, 50)), max_size=100),
       st.randoms(use_true_random=False))
def test_a_live_snapshot_in_any_order_among_junk_completes_through_one_refetch(order, junk, rnd):
    """Nothing but the verified version's chunks is kept; whatever the order, the snapshot is
    installed, with at most one re-fetch, and every junk chunk is counted as dropped."""
    msgs = snap(2)
    live = [msgs[i] for i in order]
    noise = [Message(chunk_topic("main", v, i), b"j" * 50) for v, i in junk]
    stream = live + noise
    rnd.shuffle(stream)
    with tempfile.TemporaryDirectory() as d:
        u = make(d)
        out = feed(u, stream)
        assert u.applied_version == 2 and u.current.body_hash == HASHES[2]
        assert sum(1 for o in out if o.fetch) <= 1
        assert u.dropped_chunks >= len(noise)
        assert sorted(p.name for p in Path(d).iterdir()) == ["main.idl"]
