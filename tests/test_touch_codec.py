"""Touch schema v1 codec: round trips, and any bytes decode to a Touch or a TouchError."""

import dataclasses

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.reasons import Reason
from protocol.timequality import TimeQuality
from protocol.touch import (
    MAX_PAYLOAD,
    MAX_TS_MS,
    CardTech,
    Decision,
    Role,
    Touch,
    TouchError,
    decode,
    encode,
)

digits14 = st.text("0123456789", min_size=14, max_size=14)
fact_keys = st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True)
fact_values = st.one_of(st.text(st.characters(exclude_characters="\x00",  # no lone surrogates:
                                              exclude_categories=("Cs",)), max_size=64),  # no UTF-8
                        st.integers(-(2**63), 2**63 - 1), st.booleans())


@st.composite
def touches(draw: st.DrawFn) -> Touch:
    role = draw(st.sampled_from(Role))
    facts = draw(st.dictionaries(fact_keys, fact_values, max_size=8))
    if role is Role.GATE:
        facts["dir"] = draw(st.sampled_from(["in", "out"]))
    return Touch(
        device=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True)),
        site=draw(digits14),
        role=role,
        seq=draw(st.integers(1, 2**63 - 1)),
        ts_ms=draw(st.integers(0, MAX_TS_MS)),
        tq=draw(st.sampled_from(TimeQuality)),
        card=draw(st.binary(max_size=32)),
        card_tech=draw(st.sampled_from(CardTech)),
        tid=draw(st.none() | digits14),
        decision=draw(st.sampled_from(Decision)),
        reason=draw(st.sampled_from(Reason)),
        list_version=draw(st.integers(0, 2**63 - 1)),
        config_version=draw(st.integers(0, 2**63 - 1)),
        facts=facts,
    )


@given(touches())
def test_round_trip(t: Touch) -> None:
    assert decode(encode(t)) == t


@given(st.binary(max_size=600))
@settings(max_examples=2000)
def test_arbitrary_bytes_decode_or_raise_touch_error(data: bytes) -> None:
    try:
        t = decode(data)
    except TouchError as exc:
        assert exc.reason in {"malformed_cbor", "not_a_map", "missing_field", "bad_field",
                              "unknown_schema", "too_large"}
    else:
        assert decode(encode(t)) == t  # whatever decodes is a valid touch


@given(touches(), st.data())
@settings(max_examples=500)
def test_mutated_payloads_decode_or_raise_touch_error(t: Touch, data: st.DataObject) -> None:
    raw = bytearray(encode(t))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        decoded = decode(bytes(raw))
    except TouchError:
        return
    assert isinstance(decoded, Touch)


@given(touches(), st.sampled_from(["v", "dev", "site", "role", "seq", "ts", "tq", "card", "ct",
                                   "dec", "rsn", "lv", "cv", "x"]))
def test_missing_field_is_named(t: Touch, key: str) -> None:
    m = cbor2.loads(encode(t))
    del m[key]
    with pytest.raises(TouchError) as err:
        decode(cbor2.dumps(m))
    assert err.value.reason == "missing_field" or err.value.reason == "bad_field"
    assert key in str(err.value)


def _sample() -> Touch:
    return Touch("gate-01", "13100000000001", Role.GATE, 1, 1_700_000_000_000, TimeQuality.SYNCED,
                 b"\x01\x02", CardTech.FELICA, "10000000000001", Decision.ALLOW, Reason.OK, 3, 1,
                 {"dir": "in", "reader": "entry"})


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda m: m.update(v=2), "unknown_schema"),
    (lambda m: m.update(seq=0), "bad_field"),
    (lambda m: m.update(seq=True), "bad_field"),        # a bool is not a number
    (lambda m: m.update(ts="yesterday"), "bad_field"),
    (lambda m: m.update(ts=MAX_TS_MS + 1), "bad_field"),  # no calendar date: no work day
    (lambda m: m.update(x={"dir": "in", "reader": "a\x00b"}), "bad_field"),  # PostgreSQL text
    (lambda m: m.update(tid="1234"), "bad_field"),
    (lambda m: m.update(site="ABCDEFGHIJKLMN"), "bad_field"),
    (lambda m: m.update(rsn="because"), "bad_field"),
    (lambda m: m.update(x={"reader": "entry"}), "bad_field"),  # a gate touch needs a direction
    (lambda m: m.update(card=b"\0" * 33), "bad_field"),
])
def test_specific_bad_fields(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    m = cbor2.loads(encode(_sample()))
    mutate(m)
    with pytest.raises(TouchError) as err:
        decode(cbor2.dumps(m))
    assert err.value.reason == reason


def test_trailing_bytes_and_size_limit() -> None:
    good = encode(_sample())
    with pytest.raises(TouchError, match="trailing"):
        decode(good + b"\x00")
    with pytest.raises(TouchError) as err:
        decode(b"\xa0" * (MAX_PAYLOAD + 1))
    assert err.value.reason == "too_large"
    with pytest.raises(TouchError) as err:
        decode(cbor2.dumps([1, 2, 3]))
    assert err.value.reason == "not_a_map"


def test_encode_refuses_an_invalid_touch() -> None:
    bad = _sample()
    object.__setattr__(bad, "site", "not-a-site")
    with pytest.raises(TouchError):
        encode(bad)



def test_a_lone_surrogate_in_a_fact_is_a_touch_error_not_a_unicode_error() -> None:
    """Found by hypothesis: a fact text with no UTF-8 form made encode() raise
    UnicodeEncodeError (the tap lost on the device) instead of refusing the value."""
    t = _sample()
    with pytest.raises(TouchError) as exc:
        encode(dataclasses.replace(t, facts={**t.facts, "a": "\ud800"}))
    assert exc.value.reason == "bad_field"
