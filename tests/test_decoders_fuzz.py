"""Every decoder on the path raises only its own error type, whatever the bytes (issue 14).

One hypothesis test per decoder: touch, end-to-end ack, state message (fleet view), config
envelope, signed envelope, list manifest, list chunk, list delta, serial frame. The inputs are
hostile CBOR built byte by byte, so that they reach past the CBOR layer into validation:
integers far past 64 bits (bignum tags), deep nesting, arbitrary tags (shared references,
dates, regexes, sets...), indefinite lengths (terminated or not), declared lengths far past
the payload, raw noise; alone, or spliced into one or more fields of a valid document (and,
for signed documents, correctly signed, so the checks behind the signature are reached too).
"""

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud_sink.model import DeadLetter
from cloud_sink.validate import validate
from edge import config_apply as ca
from edge.idlist import ListUpdater
from edge.idlist.codec import build_rows
from edge.idlist.delta import DeltaError
from edge.idlist.dist import (
    DELTA_PURPOSE,
    MANIFEST_PURPOSE,
    ManifestError,
    chunk_topic,
    delta_topic,
    manifest_topic,
    open_delta,
    open_manifest,
    snapshot_messages,
)
from edge.signing import SignatureError, generate_key, key_id, open_sealed
from firmware import frame
from ops import fleet
from protocol import topics
from protocol.ack import AckError, decode_ack
from protocol.touch import TouchError
from protocol.touch import decode as decode_touch

KEY = generate_key()
KEYS = [KEY.public_key()]
SITE, DEV = "12345678901234", "gate-01"
FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- hostile CBOR, byte by byte ---------------------------------------------------------------
def head(major: int, n: int) -> bytes:
    """A CBOR initial byte (+ argument) for major type `major` and argument `n` < 2**64."""
    if n < 24:
        return bytes([major << 5 | n])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | ai]) + n.to_bytes(size, "big")
    raise ValueError(n)


def bignum(n: int) -> bytes:
    """Tag 2 (or 3, negative) around the integer's bytes: any size at all."""
    m = -1 - n if n < 0 else n
    b = m.to_bytes(max(1, (m.bit_length() + 7) // 8), "big")
    return head(6, 3 if n < 0 else 2) + head(2, len(b)) + b


big_ints = st.builds(lambda bits, neg: (-1 if neg else 1) * (2**bits - 1),
                     st.integers(63, 8 * 4000), st.booleans())
leaves = st.one_of(st.none(), st.booleans(), st.integers(), big_ints, st.floats(),
                   st.binary(max_size=40), st.text(max_size=20))
TAGS = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 32,
                                  33, 34, 35, 36, 37, 38, 256, 258, 260, 261, 262, 263, 55799]),
                 st.integers(0, 2**64 - 1))
raw_leaf = st.one_of(
    st.builds(cbor2.dumps, leaves),
    st.builds(bignum, big_ints),
    st.builds(cbor2.dumps, st.integers(-2**70, 2**70)),  # around the 64-bit edges
    st.builds(lambda n: b"\x81" * n + b"\x00", st.integers(1, 2000)),  # deep arrays
    st.builds(lambda n: b"\xa1\x00" * n + b"\x00", st.integers(1, 2000)),  # deep maps
    st.builds(head, st.sampled_from([2, 3, 4, 5]), st.integers(2**16, 2**64 - 1)),  # huge lengths
    st.sampled_from([b"\x5f\x41a\xff", b"\x7f\x61a\xff", b"\x9f\x01\x02\xff", b"\xbf\x01\x02\xff",
                     b"\x9f", b"\xbf\x01", b"\x5f\x01\xff", b"\xff", b"\xf8\x00", b"\x1c",
                     b"\xfc", b"\xd8\x1d\x00", b"\xd8\x1c\x81\xd8\x1d\x00"]),  # indefinite, refs
    st.binary(max_size=12),  # noise
)
raw_item = st.recursive(raw_leaf, lambda ch: st.one_of(
    st.builds(lambda tag, x: head(6, tag) + x, TAGS, ch),
    st.builds(lambda xs: head(4, len(xs)) + b"".join(xs), st.lists(ch, max_size=3)),
    st.builds(lambda xs: b"\x9f" + b"".join(xs) + b"\xff", st.lists(ch, max_size=3)),
    st.builds(lambda kv: head(5, len(kv)) + b"".join(k + v for k, v in kv),
              st.lists(st.tuples(ch, ch), max_size=3)),
    st.builds(lambda kv: head(5, len(kv)) + b"".join(cbor2.dumps(k) + v for k, v in kv),
              st.lists(st.tuples(st.sampled_from(["a", "dir", "entry", "site", "x"]), ch),
                       max_size=3)),  # text keys, as the documents have, with hostile values
), max_leaves=6)


def map_with(base: dict[str, Any], raws: dict[str, bytes]) -> bytes:
    """`base` as a CBOR map with the values of `raws`' keys replaced by raw CBOR items."""
    keys = list(base) + [k for k in raws if k not in base]
    body = b"".join(cbor2.dumps(k) + (raws[k] if k in raws else cbor2.dumps(base[k]))
                    for k in keys)
    return head(5, len(keys)) + body


def hostile(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Anything at all, or `base` with hostile values in one or more of its fields."""
    fields = st.sampled_from(sorted(base) + ["zz"])
    return st.one_of(raw_item, st.builds(map_with, st.just(base),
                                         st.dictionaries(fields, raw_item, min_size=1,
                                                         max_size=3)))


def signed(purpose: str, body: bytes) -> bytes:
    """An envelope whose signature over `body` (any bytes) verifies: what is behind it is
    what an operator signed, and must still never crash the device."""
    sig = KEY.sign(b"ccus-touch/v1/" + purpose.encode() + b"\x00" + body)
    return cbor2.dumps({"v": 1, "kid": key_id(KEY.public_key()), "sig": sig, "body": body})


# -- touch ------------------------------------------------------------------------------------
TOUCH = {"v": 1, "dev": DEV, "site": SITE, "role": "gate", "seq": 1, "ts": 1, "tq": "synced",
         "card": b"\x01" * 8, "ct": "felica", "tid": None, "dec": "allow", "rsn": "ok",
         "lv": 0, "cv": 0, "x": {"dir": "in"}}


def test_touch_with_a_3800_byte_bignum_seq_is_a_touch_error() -> None:
    for key in ("seq", "v", "ts"):
        payload = map_with(TOUCH, {key: bignum(2 ** (8 * 3800) - 1)})
        with pytest.raises(TouchError) as exc:
            decode_touch(payload)
        assert exc.value.reason in ("bad_field", "unknown_schema")
    with pytest.raises(TouchError):  # a bignum as a fact key
        decode_touch(map_with(TOUCH, {"x": head(5, 1) + bignum(2**20000) + b"\x01"}))
    # the sink dead-letters it with its reason, not as an internal error with a traceback
    dl = validate(topics.touch(SITE, DEV), map_with(TOUCH, {"seq": bignum(2 ** (8 * 3800) - 1)}))
    assert isinstance(dl, DeadLetter) and dl.reason == "bad_field" and "bit integer" in dl.detail


HUGE = bignum(2 ** (8 * 3800) - 1)


@FUZZ
@given(hostile(TOUCH))
@example(map_with(TOUCH, {"seq": HUGE}))
@example(map_with(TOUCH, {"x": head(5, 1) + cbor2.dumps("n") + HUGE}))
@example(map_with(TOUCH, {"rsn": cbor2.dumps("x" * 3000)}))
def test_touch_decoder(payload: bytes) -> None:
    try:
        decode_touch(payload)
    except TouchError as exc:
        assert exc.reason and str(exc)


# -- end-to-end ack -------------------------------------------------------------------------
@FUZZ
@given(hostile({"v": 1, "upto": 5}))
def test_ack_decoder(payload: bytes) -> None:
    try:
        decode_ack(payload)  # what it returns is the ack's own business (an epoch may join)
    except AckError as exc:
        assert str(exc)


# -- state message (the fleet view) ------------------------------------------------------------
STATE = {"v": 1, "dev": DEV, "site": SITE, "role": "gate", "online": True, "ts": 1, "tq": "synced",
         "sw": "1", "lv": 3, "cv": 4, "backlog": 0, "oldest_ms": None, "readers": {"entry": "ok"}}


@FUZZ
@given(hostile(STATE))
@example(map_with(STATE, {"readers": head(5, 1) + cbor2.dumps("entry") + HUGE}))
@example(map_with(STATE, {"ts": cbor2.dumps(2**62), "lv": HUGE, "cv": b"\x81" * 300 + b"\x00"}))
@example(map_with(STATE, {"readers": head(5, 1) + HUGE + cbor2.dumps("ok")}))
def test_state_parser(payload: bytes) -> None:
    row = fleet.parse(topics.state(SITE, DEV), payload)
    assert row is not None
    rows = [fleet.diagnose(row, 10**12)]
    assert fleet.render(rows, 10**12) and fleet.as_json(rows)


# -- signed envelope, config envelope ---------------------------------------------------------
ENVELOPE = {"v": 1, "kid": key_id(KEY.public_key()), "sig": b"\x00" * 64, "body": b"\xa0"}


@FUZZ
@given(hostile(ENVELOPE), st.sampled_from(["config", MANIFEST_PURPOSE, DELTA_PURPOSE]))
def test_signed_envelope_decoder(payload: bytes, purpose: str) -> None:
    for p in (payload, signed(purpose, payload)):
        try:
            doc = open_sealed(KEYS, purpose, p)
        except SignatureError as exc:
            assert exc.reason in ("malformed", "unknown_key", "bad_signature")
        else:
            assert isinstance(doc, dict)


CONFIG = {"version": 5, "target": {"site": SITE, "dev": DEV}, "issued_ms": 1,
          "body": {"gate": {"anti_passback": True}}}
BASE = {"device": {"id": DEV, "site": SITE, "data_dir": "/nonexistent"}, "mqtt": {"tls": False}}


@FUZZ
@given(hostile(CONFIG))
@example(map_with(CONFIG, {"version": cbor2.dumps(2**64)}))
@example(map_with(CONFIG, {"body": head(5, 1) + cbor2.dumps("gate") + b"\xa1\x00" * 390 + b"\x00"}))
@example(map_with(CONFIG, {"body": cbor2.dumps({"readers": [{"name": 2**70}]})}))
def test_config_envelope_decoder(doc: bytes) -> None:
    for payload in (doc, signed("config", doc)):
        try:
            d = ca.decode(KEYS, payload)
        except ca.ConfigRefused as exc:
            assert exc.reason
            continue
        # past the checks, the decision must not crash either (merge, schema, versions)
        out = ca.decide(ca.Applied(), d, BASE, SITE, DEV, now_ms=2)
        assert out.result in ("applied", "unchanged", "refused")
        if out.config is not None:
            assert 0 <= out.config.version < 2**63


# -- the ID list: manifest, chunk, delta (decoders, and the updater that is fed them) ----------
LIST = build_rows([(10_000_000_000_001, 0, 1, (b"\x05" * 8,))], name="main", version=3,
                  issued_ms=1)
MANIFEST = cbor2.loads(cbor2.loads(snapshot_messages(LIST, KEY, 128)[-1].payload)["body"])
DELTA = {"kind": "delta", "name": "main", "from": 3, "to": 4, "issued_ms": 1,
         "base_hash": b"\x00" * 32, "result_hash": b"\x00" * 32,
         "upsert": [[10_000_000_000_002, 0, 1, [b"\x06" * 8]]], "remove": [10_000_000_000_001]}


def feed_all(messages: list[tuple[str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        u = ListUpdater(Path(d), "main", KEYS, now_ms=lambda: 2)
        for topic, payload in messages:
            for o in u.handle(topic, payload):
                assert o.kind in ("applied", "pending", "ignored", "refused")
        assert isinstance(u.state(), dict)


@FUZZ
@given(hostile(MANIFEST))
def test_manifest_decoder(doc: bytes) -> None:
    for payload in (doc, signed(MANIFEST_PURPOSE, doc)):
        try:
            m = open_manifest(KEYS, payload)
        except (SignatureError, ManifestError):
            continue
        assert m.size <= 4 << 30 and 0 <= m.version < 2**63
    feed_all([(manifest_topic("main"), signed(MANIFEST_PURPOSE, doc)),
              (manifest_topic("main"), doc)])


@FUZZ
@given(st.text(max_size=30), st.binary(max_size=300), st.booleans())
def test_chunk_handling(tail: str, data: bytes, with_manifest: bool) -> None:
    """Chunks on any topic under the list, with or without a manifest being assembled."""
    real = snapshot_messages(LIST, KEY, 128)
    first = [(real[-1].topic, real[-1].payload)] if with_manifest else []
    feed_all(first + [(f"ccus/v1/list/main/snapshot/{tail}", data),
                      (chunk_topic("main", 3, 0), data), (chunk_topic("main", 2**64, 1), data)]
             + [(m.topic, m.payload) for m in real])


@FUZZ
@given(hostile(DELTA), st.integers(1, 3))
def test_delta_decoder(doc: bytes, parts: int) -> None:
    for payload in (doc, signed(DELTA_PURPOSE, doc)):
        try:
            d = open_delta(KEYS, payload)
        except (SignatureError, DeltaError):
            continue
        assert 0 <= d.from_version < d.to_version < 2**63 and d.issued_ms >= 0
    env = signed(DELTA_PURPOSE, doc)
    n = -(-len(env) // parts)
    feed_all([(m.topic, m.payload) for m in snapshot_messages(LIST, KEY, 128)]
             + [(delta_topic("main", 3, 4, parts, i), env[i * n:(i + 1) * n])
                for i in range(parts)])


# -- serial frame (firmware/frame.py, MicroPython-safe: never raises on line noise) ------------
def raw_frame(ver: int, mtype: int, seq: int, epoch: int, payload: bytes,
              plen: int | None) -> bytes:
    """A frame whose COBS and CRC are right but whose header may say anything (the length
    byte is the payload's unless given)."""
    raw = bytes([ver, mtype, seq, epoch, len(payload) if plen is None else plen]) + payload
    c = frame.crc16(raw)
    out = bytearray(b"\x00")
    frame._cobs_encode(raw + bytes([c >> 8, c & 0xFF]), out)
    return bytes(out) + b"\x00"


PARSERS = {frame.BOOT: frame.parse_boot, frame.STATUS: frame.parse_status,
           frame.VEND_REQ: frame.parse_vend_req, frame.VEND_RESULT: frame.parse_vend_result,
           frame.GATE_PULSE: frame.parse_gate_pulse, frame.SENSOR: frame.parse_sensor,
           frame.FEEDBACK: frame.parse_feedback, frame.ERROR: frame.parse_error}
# the link below has epoch 7 and seq 1 in flight: ACK / NAK frames for it are likely
header_byte = st.one_of(st.integers(0, 255), st.sampled_from([1, 7, *frame.PAYLOAD_LEN]))
frame_payload = st.one_of(st.binary(max_size=40), st.sampled_from(
    sorted(set(frame.PAYLOAD_LEN.values()))).flatmap(lambda n: st.binary(min_size=n, max_size=n)))


@FUZZ
@given(st.lists(st.one_of(
    st.binary(max_size=60),
    st.builds(raw_frame, st.one_of(st.just(1), header_byte), header_byte, header_byte,
              header_byte, frame_payload, st.one_of(st.none(), st.integers(0, 255)))),
    max_size=8),
    st.sampled_from([None, frame.HOST_ACCEPTS, frame.BOARD_ACCEPTS]))
@example([raw_frame(1, frame.NAK, 1, 7, b"\x04", None)], None)  # the frame in flight, refused
@example([raw_frame(1, frame.ACK, 1, 7, b"", None), raw_frame(1, frame.STATUS, 3, 9,
                                                            bytes(14), None)], None)
def test_frame_decoder_and_link(chunks: list[bytes], accept: Any) -> None:
    d = frame.Decoder()
    link = frame.Link(7, accept=accept)
    link.send(frame.STATUS_REQ, b"", 0)  # a message in flight: ACK and NAK paths are live
    seen = set()
    for i, c in enumerate(chunks):
        for f in d.feed(c):
            assert len(f.payload) <= frame.MAX_PAYLOAD
            for ev in link.receive(f, i):
                seen.add(ev[0])
                assert ev[0] in (frame.EV_MESSAGE, frame.EV_ACKED, frame.EV_FAILED,
                                 frame.EV_ERROR)
                if ev[0] == frame.EV_MESSAGE and ev[1].type in PARSERS:
                    PARSERS[ev[1].type](ev[1].payload)
            link.poll(i * 300)
    assert d.pending() <= frame.MAX_ENCODED and seen <= {frame.EV_MESSAGE, frame.EV_ACKED,
                                                          frame.EV_FAILED, frame.EV_ERROR}


def test_hostile_cbor_reaches_validation() -> None:
    """The strategies are not all rejected by the CBOR layer: spliced maps decode."""
    payload = map_with(TOUCH, {"seq": bignum(2**100)})
    assert cbor2.loads(payload)["seq"] == 2**100
    assert hashlib.sha256(signed("config", b"\xa0")).digest()
