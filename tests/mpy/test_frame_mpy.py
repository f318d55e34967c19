"""Codec, link and flash-journal tests that run under the real MicroPython unix port (and CPython).

Run: MICROPYPATH=firmware:tests/mpy:.frozen micropython -X heapsize=192K tests/mpy/test_frame_mpy.py
Prints one "PASS <name>" per test and "ALL OK <n>" at the end; any failure exits 1.
"""

import os

import frame
import journal
from mpy_runner import run


class Rng:
    """A tiny xorshift32: the same sequence on CPython and MicroPython."""

    def __init__(self, seed):
        self.s = seed or 1

    def next(self):
        x = self.s
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.s = x
        return x

    def below(self, n):
        return self.next() % n

    def bytes(self, n):
        return bytes(self.below(256) for _ in range(n))


def all_types_frames(rng, count):
    types = sorted(frame.PAYLOAD_LEN)
    out = []
    for i in range(count):
        t = types[i % len(types)]
        out.append(frame.Frame(t, i & 0xFF, 1 + rng.below(255), rng.bytes(frame.PAYLOAD_LEN[t])))
    return out


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def test_crc():
    check(frame.crc16(b"123456789") == 0x29B1, "crc check value")


def test_round_trip():
    rng = Rng(7)
    for f in all_types_frames(rng, 200):
        d = frame.Decoder()
        got = d.feed(frame.encode_frame(f))
        check(got == [f], "round trip " + repr(f))


def test_noise_between_frames():
    rng = Rng(11)
    fs = all_types_frames(rng, 60)
    stream = bytearray()
    for f in fs:
        stream += rng.bytes(rng.below(50))
        stream += frame.encode_frame(f)
    d = frame.Decoder()
    got = d.feed(stream)
    check(got == fs, "noise between frames lost or changed frames")
    check(d.skipped > 0, "noise not counted")


def test_noise_inside_frames():
    rng = Rng(23)
    fs = all_types_frames(rng, 80)
    stream = bytearray()
    touched = []
    for i, f in enumerate(fs):
        w = frame.encode_frame(f)
        if rng.below(2):
            at = rng.below(len(w) + 1)
            w = w[:at] + rng.bytes(1 + rng.below(20)) + w[at:]
            touched.append(i)
        stream += w
    d = frame.Decoder()
    got = d.feed(bytes(stream)) + d.feed(b"\x00")
    seqs = [g.seq for g in got]
    for g in got:
        check(g == fs[g.seq], "wrong frame " + repr(g))
    for i in range(len(fs)):
        if i not in touched:
            check(i in seqs, "untouched frame lost")
    check(seqs == sorted(seqs), "out of order")


def test_split_every_boundary():
    rng = Rng(5)
    fs = all_types_frames(rng, 11)
    w = b"".join(frame.encode_frame(f) for f in fs)
    for cut in range(len(w) + 1):
        d = frame.Decoder()
        got = d.feed(w[:cut]) + d.feed(w[cut:])
        check(got == fs, "split at " + str(cut))
    d = frame.Decoder()
    got = []
    for b in w:
        got += d.feed(bytes((b,)))
    check(got == fs, "byte at a time")


def test_overlong_and_noise_only():
    d = frame.Decoder()
    f = frame.Frame(frame.STATUS_REQ, 1, 1)
    check(d.feed(b"\x33" * 500 + frame.encode_frame(f)) == [f], "after overlong garbage")
    check(d.skipped == 500, "overlong skipped count")
    rng = Rng(99)
    for _ in range(50):
        d = frame.Decoder()
        noise = rng.bytes(rng.below(300))
        check(d.feed(noise) + d.feed(b"\x00") == [], "noise yielded a frame")
        check(d.skipped == sum(1 for b in noise if b), "skipped count")


def test_bit_flips():
    rng = Rng(3)
    for f in all_types_frames(rng, 40):
        w = frame.encode_frame(f)
        for i in range(1, len(w) - 1):
            bad = bytearray(w)
            bad[i] ^= 1 << rng.below(8)
            d = frame.Decoder()
            got = d.feed(bad) + d.feed(b"\x00")
            check(got == [], "bit flip accepted")
            check(d.crc_errors + d.bad_frames >= 1, "bit flip not counted")


def test_link_lossy():
    rng = Rng(1234)
    a = frame.Link(1, retries=3, ack_timeout_ms=50, max_queue=32)
    b = frame.Link(2, retries=3, ack_timeout_ms=50)
    da = frame.Decoder()
    db = frame.Decoder()
    for i in range(20):
        a.send(frame.GATE_PULSE, frame.gate_pulse(i, 100), 0)
    got = []
    verdicts = 0
    now = 0
    while a.busy() and now < 100000:
        for w in a.take_output():
            if rng.below(10) >= 3:
                for f in db.feed(w):
                    for ev in b.receive(f, now):
                        got.append(ev[1].payload[0])
        for w in b.take_output():
            if rng.below(10) >= 3:
                for f in da.feed(w):
                    verdicts += len(a.receive(f, now))
        verdicts += len(a.poll(now))
        now += 5
    check(not a.busy(), "link never concluded")
    check(verdicts == 20, "one verdict per message")
    check(got == sorted(set(got)), "doubled or out of order: " + repr(got))
    check(len(got) >= 10, "too little delivered at 30% loss")


def test_journal():
    path = (os.getenv("CCUS_TMP") or "/tmp") + "/journal-test.jnl"
    for p in (path, path + ".tmp"):
        if p.rsplit("/", 1)[-1] in os.listdir(p.rsplit("/", 1)[0] or "/"):
            os.remove(p)
    j = journal.Journal(path)
    j.load()
    check(j.state == frame.J_NONE and not j.corrupt, "fresh journal")
    j.booted()
    j.start(77, 2)
    k = journal.Journal(path)
    k.load()
    check((k.boot_count, k.vend_id, k.slot, k.state) == (1, 77, 2, frame.J_IN_PROGRESS), "start")
    k.finish(frame.R_DISPENSED)
    m = journal.Journal(path)
    m.load()
    check((m.state, m.result) == (frame.J_DONE, frame.R_DISPENSED), "finish")
    with open(path, "r+b") as f:
        f.seek(6)
        f.write(b"\xff")
    c = journal.Journal(path)
    c.load()
    check(c.corrupt and c.state == frame.J_NONE, "corruption detected")
    os.remove(path)


TESTS = [
    test_crc,
    test_round_trip,
    test_noise_between_frames,
    test_noise_inside_frames,
    test_split_every_boundary,
    test_overlong_and_noise_only,
    test_bit_flips,
    test_link_lossy,
    test_journal,
]


run(TESTS)
