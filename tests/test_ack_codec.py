"""The end-to-end ack codec (protocol/ack.py) with its optional sink epoch: round trips, the
old decode_ack() unchanged, and the decoders raise only AckError whatever the bytes (random
bytes, random CBOR of any shape: big integers, deep nesting, tags, floats, booleans)."""

import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.ack import MAX_SEQ, AckError, AckMsg, decode_ack, decode_ack_msg, encode_ack


@given(st.integers(0, MAX_SEQ), st.one_of(st.none(), st.integers(0, 2**63 - 1)))
def test_round_trip_with_and_without_epoch(upto: int, epoch: int | None) -> None:
    data = encode_ack(upto, epoch)
    assert decode_ack_msg(data) == AckMsg(upto, epoch)
    assert decode_ack(data) == upto


def test_old_payload_and_old_decoder() -> None:
    old = cbor2.dumps({"v": 1, "upto": 42})  # what a sink without epochs sends
    assert decode_ack_msg(old) == AckMsg(42, None)
    assert encode_ack(42) == old
    assert decode_ack(cbor2.dumps({"v": 1, "upto": 7, "ep": 9, "new": "key"})) == 7


def _cbor_values() -> st.SearchStrategy[Any]:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                     st.text(max_size=5), st.binary(max_size=5))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["v", "upto", "ep", "x"]), inner, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 3, 4, 5, 30, 258, 260, 55799, 99]),
                  inner)), max_leaves=8)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["v", "upto", "ep", "x"]), _cbor_values(), max_size=4))
def test_decode_maps_of_anything_raises_only_ack_error(m: dict[str, Any]) -> None:
    try:
        data = cbor2.dumps(m)
    except Exception:  # noqa: BLE001 - some generated tags cannot even be encoded
        return
    with contextlib.suppress(AckError):
        msg = decode_ack_msg(data)
        assert type(msg.upto) is int and 0 <= msg.upto <= MAX_SEQ
        assert msg.epoch is None or type(msg.epoch) is int


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_decode_random_bytes_raises_only_ack_error(data: bytes) -> None:
    with contextlib.suppress(AckError):
        decode_ack_msg(data)
    with contextlib.suppress(AckError):
        decode_ack(data)


@pytest.mark.parametrize("bad", [
    cbor2.dumps({"v": 1, "upto": 1, "ep": -1}),
    cbor2.dumps({"v": 1, "upto": 1, "ep": 2**63}),          # a bignum
    cbor2.dumps({"v": 1, "upto": 1, "ep": True}),
    cbor2.dumps({"v": 1, "upto": 1, "ep": 1.0}),
    cbor2.dumps({"v": 1.0, "upto": 1}),
    cbor2.dumps({"v": True, "upto": 1}),
    cbor2.dumps({"v": 1, "upto": 2**64}),
    cbor2.dumps({"v": 1, "upto": cbor2.CBORTag(3, b"\x00")}),  # bignum -1
    b"\x81" * 60 + b"\x00",                                   # 60 nested arrays
    b"\xd9\xd9\xf7" * 20,                                     # self-described CBOR tags, no value
    b"\xc1\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",              # epoch datetime of infinity
    b"\xff", b"",
])
def test_decode_refuses(bad: bytes) -> None:
    with pytest.raises(AckError):
        decode_ack_msg(bad)


@pytest.mark.parametrize("args", [(-1, None), (1, -1), (True, None), (1, 2**63), (1.0, None)])
def test_encode_refuses(args: tuple[Any, Any]) -> None:
    with pytest.raises(AckError):
        encode_ack(*args)
