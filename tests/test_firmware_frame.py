"""Property tests (hypothesis, CPython) for firmware/frame.py: codec round trip, noise, splits, link."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware import frame

TYPES = sorted(frame.PAYLOAD_LEN)


@st.composite
def frames(draw, seq=None):
    t = draw(st.sampled_from(TYPES))
    n = frame.PAYLOAD_LEN[t]
    payload = draw(st.binary(min_size=n, max_size=n))
    s = draw(st.integers(0, 255)) if seq is None else seq
    return frame.Frame(t, s, draw(st.integers(1, 255)), payload)


@st.composite
def frame_lists(draw, max_size=8):
    n = draw(st.integers(0, max_size))
    return [draw(frames(seq=i)) for i in range(n)]  # distinct seqs: frames are told apart


def wire(fs):
    return b"".join(frame.encode_frame(f) for f in fs)


def test_crc_check_value():
    assert frame.crc16(b"123456789") == 0x29B1
    assert frame.crc16(b"") == 0xFFFF


@given(frames())
def test_round_trip(f):
    d = frame.Decoder()
    w = frame.encode_frame(f)
    assert w[0] == 0 and w[-1] == 0 and 0 not in w[1:-1]
    assert len(w) <= frame.MAX_ENCODED + 2
    assert d.feed(w) == [f]
    assert (d.frames, d.skipped, d.crc_errors, d.bad_frames) == (1, 0, 0, 0)


@given(frame_lists(), st.lists(st.binary(max_size=80), min_size=9, max_size=9))
def test_noise_between_frames_loses_nothing(fs, noises):
    stream = b""
    for i, f in enumerate(fs):
        stream += noises[i] + frame.encode_frame(f)
    stream += noises[-1]
    d = frame.Decoder()
    assert d.feed(stream) + d.feed(b"\x00") == fs


@given(st.binary(max_size=600))
def test_noise_alone_yields_nothing_and_is_counted(noise):
    d = frame.Decoder()
    got = d.feed(noise) + d.feed(b"\x00")
    assert got == []
    assert d.skipped == sum(1 for b in noise if b)
    assert d.pending() == 0


@given(frame_lists(), st.data())
def test_noise_inside_frames_never_yields_a_wrong_frame(fs, data):
    chunks = []
    touched = set()
    for i, f in enumerate(fs):
        w = frame.encode_frame(f)
        if data.draw(st.booleans()):
            at = data.draw(st.integers(0, len(w)))
            noise = data.draw(st.binary(min_size=1, max_size=40))
            w = w[:at] + noise + w[at:]
            touched.add(i)
        chunks.append(w)
    d = frame.Decoder()
    got = d.feed(b"".join(chunks)) + d.feed(b"\x00")
    seqs = [g.seq for g in got]
    assert seqs == sorted(set(seqs)), "out of order or doubled"
    for g in got:
        assert g == fs[g.seq], f"wrong frame {g}"
    for i in range(len(fs)):
        if i not in touched:
            assert i in seqs, f"untouched frame {i} lost"


@given(frame_lists(), st.data())
def test_split_anywhere_decodes_the_same(fs, data):
    w = wire(fs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(w)), max_size=12)))
    d = frame.Decoder()
    got = []
    last = 0
    for c in [*cuts, len(w)]:
        got += d.feed(w[last:c])
        last = c
    assert got == fs


@given(frames(), st.integers(0, 200), st.integers(0, 7))
def test_bit_flip_never_yields_another_frame(f, pos, bit):
    w = bytearray(frame.encode_frame(f))
    i = 1 + pos % (len(w) - 2)
    w[i] ^= 1 << bit
    d = frame.Decoder()
    got = d.feed(bytes(w)) + d.feed(b"\x00")
    assert all(g == f for g in got)
    if got == []:
        assert d.crc_errors + d.bad_frames >= 1


def test_overlong_garbage_then_frame():
    f = frame.Frame(frame.STATUS_REQ, 3, 4)
    d = frame.Decoder()
    assert d.feed(b"\x55" * 1000 + frame.encode_frame(f)) == [f]
    assert d.skipped == 1000


def test_encode_rejects_bad_input():
    with pytest.raises(frame.FrameError, match="VEND_REQ payload must be 9 bytes"):
        frame.encode(frame.VEND_REQ, 1, 1, b"\x00")
    with pytest.raises(frame.FrameError, match="unknown message type"):
        frame.encode(0x99, 1, 1, b"")
    with pytest.raises(frame.FrameError, match="seq out of range"):
        frame.encode(frame.ACK, 256, 1, b"")


def test_other_version_is_returned_and_counted():
    w = frame.encode(0x42, 1, 1, b"xyz", ver=2)
    d = frame.Decoder()
    (g,) = d.feed(w)
    assert g.ver == 2 and d.bad_version == 1


@given(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 65535), st.integers(0, 65535))
def test_payload_helpers_round_trip(a, b, c, e):
    assert frame.parse_vend_req(frame.vend_req(a, b, c, e)) == (a, b, c, e)
    assert frame.parse_vend_result(frame.vend_result(a, b, b, c)) == (a, b, b, c)
    assert frame.parse_boot(frame.boot(b, b, c, a, b, b, b)) == (b, b, c, a, b, b, b)
    assert frame.parse_status(frame.status(1, 0, a, c, e, a)) == (1, 0, a, c, e, a)
    assert frame.parse_sensor(frame.sensor(b, 1, a)) == (b, 1, a)
    assert frame.parse_error(frame.error(b, a)) == (b, a)
    assert frame.parse_feedback(frame.feedback(b, b, c)) == (b, b, c)
    assert frame.parse_gate_pulse(frame.gate_pulse(b, c)) == (b, c)


# ---------------------------------------------------------------- link


class Wire:
    """A lossy, duplicating byte channel between two links, driven by a seeded RNG."""

    def __init__(self, rng: random.Random, loss: float, dup: float) -> None:
        self.rng = rng
        self.loss = loss
        self.dup = dup
        self.decoder = frame.Decoder()

    def carry(self, chunks):
        out = []
        for c in chunks:
            if self.rng.random() < self.loss:
                continue
            out += self.decoder.feed(c)
            if self.rng.random() < self.dup:
                out += self.decoder.feed(c)
        return out


def run_pair(n_msgs, seed, loss, dup, retries=3, steps=4000):
    rng = random.Random(seed)
    a = frame.Link(1, retries=retries, ack_timeout_ms=100, max_queue=32)
    b = frame.Link(2, retries=retries, ack_timeout_ms=100)
    ab = Wire(rng, loss, dup)
    ba = Wire(rng, loss, dup)
    sent = {}
    verdict = {}
    delivered = []
    now = 0
    for i in range(n_msgs):
        payload = frame.u32(i) + b"\x01" + frame.u16(10) + frame.u16(20)
        sent[a.send(frame.VEND_REQ, payload, now)] = i
    for _ in range(steps):
        for f in ab.carry(a.take_output()):
            for ev in b.receive(f, now):
                assert ev[0] == frame.EV_MESSAGE
                delivered.append(frame.get_u32(ev[1].payload, 0))
        for f in ba.carry(b.take_output()):
            for ev in a.receive(f, now):
                assert ev[0] in (frame.EV_ACKED, frame.EV_FAILED)
                assert ev[2] not in verdict, "two verdicts for one message"
                verdict[ev[2]] = ev[0]
        for ev in a.poll(now):
            assert ev[0] == frame.EV_FAILED and ev[4] == frame.FAIL_NO_ACK
            assert ev[2] not in verdict
            verdict[ev[2]] = ev[0]
        if not a.busy():
            break
        now += 10
    return a, sent, verdict, delivered


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.integers(1, 20),
    st.integers(0, 2**32),
    st.sampled_from([0.0, 0.1, 0.3, 0.6]),
    st.sampled_from([0.0, 0.2]),
)
def test_link_delivers_in_order_at_most_once_and_always_concludes(n, seed, loss, dup):
    a, sent, verdict, delivered = run_pair(n, seed, loss, dup)
    assert not a.busy(), "a message never concluded"
    assert set(verdict) == set(sent)
    assert delivered == sorted(set(delivered)), "doubled or out of order"
    for seq, v in verdict.items():
        if v == frame.EV_ACKED:
            assert sent[seq] in delivered, "acked but never delivered"
    if loss == 0.0:
        assert delivered == list(range(n))
        assert all(v == frame.EV_ACKED for v in verdict.values())


def test_link_gives_up_after_retries_on_a_dead_line():
    a = frame.Link(7, retries=3, ack_timeout_ms=100)
    a.send(frame.STATUS_REQ, b"", 0)
    tx = len(a.take_output())
    events = []
    for now in range(0, 1000, 10):
        events += a.poll(now)
        tx += len(a.take_output())
    assert tx == 4  # first try + 3 retries
    assert len(events) == 1
    ev = events[0]
    assert ev[0] == frame.EV_FAILED and ev[1] == frame.STATUS_REQ and ev[4] == frame.FAIL_NO_ACK
    assert not a.busy()


def test_link_duplicate_is_acked_not_delivered_and_new_epoch_is_new():
    b = frame.Link(2)
    f = frame.Frame(frame.STATUS_REQ, 1, 9)
    assert b.receive(f, 0) == [(frame.EV_MESSAGE, f)]
    assert b.receive(f, 0) == []
    assert b.duplicates == 1
    acks = [frame.Decoder().feed(w)[0] for w in b.take_output()]
    assert [(x.type, x.seq, x.epoch) for x in acks] == [(frame.ACK, 1, 9)] * 2
    g = frame.Frame(frame.STATUS_REQ, 1, 10)  # peer rebooted: same seq, new epoch
    assert b.receive(g, 0) == [(frame.EV_MESSAGE, g)]


def test_link_naks_unknown_version_and_unaccepted_type():
    a = frame.Link(1)
    b = frame.Link(2, accept=frame.BOARD_ACCEPTS)
    seq = a.send(frame.STATUS, frame.status(0, 0, 0, 0, 0, 0), 0)  # a board->host type
    (f,) = frame.Decoder().feed(a.take_output()[0])
    (ev,) = b.receive(f, 0)
    assert ev[0] == frame.EV_ERROR and ev[1] == frame.NAK_TYPE
    (nak,) = frame.Decoder().feed(b.take_output()[0])
    assert a.receive(nak, 0) == [
        (frame.EV_FAILED, frame.STATUS, seq, frame.status(0, 0, 0, 0, 0, 0), frame.NAK_TYPE)
    ]
    (v2,) = frame.Decoder().feed(frame.encode(0x20, 5, 5, b"", ver=2))
    (ev,) = b.receive(v2, 0)
    assert ev[0] == frame.EV_ERROR and ev[1] == frame.NAK_VERSION


def test_link_ignores_stale_ack_from_other_epoch():
    a = frame.Link(3)
    seq = a.send(frame.STATUS_REQ, b"", 0)
    assert a.receive(frame.Frame(frame.ACK, seq, 4), 0) == []
    assert a.busy()
    assert a.receive(frame.Frame(frame.ACK, seq, 3), 0) == [(frame.EV_ACKED, frame.STATUS_REQ, seq)]


def test_link_queue_bound_and_bad_payload():
    a = frame.Link(1, max_queue=2)
    a.send(frame.STATUS_REQ, b"", 0)
    a.send(frame.STATUS_REQ, b"", 0)
    with pytest.raises(frame.LinkError, match="queue full"):
        a.send(frame.STATUS_REQ, b"", 0)
    with pytest.raises(frame.FrameError):
        frame.Link(1).send(frame.VEND_REQ, b"short", 0)
