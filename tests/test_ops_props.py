"""Property tests of the operator tools' pure parts: the fleet view's state parser and merge,
config-ack attribution by topic, device specs and broker addresses. Never raise anything but
their own errors; a field from a payload never overrides what its topic says."""

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ops import fleet
from ops.configpush import attribute
from ops.mqttc import parse_broker
from ops.pki import PkiError
from ops.provision import DIRECTIONS, ROLES, parse_device_spec
from protocol import topics

SITE = "12345678901234"
IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.text(max_size=20) | st.binary(max_size=20) | st.floats(allow_nan=True),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
STATE_KEYS = ["v", "dev", "site", "role", "online", "ts", "tq", "sw", "lv", "cv", "backlog",
              "oldest_ms", "oldest_age_s", "disk", "board", "readers"]
states = st.dictionaries(st.sampled_from(STATE_KEYS), cbor_values, max_size=len(STATE_KEYS))


@given(st.binary(max_size=200) | states.map(cbor2.dumps), st.integers(0, 2**45))
@settings(max_examples=150, deadline=None)
def test_fleet_never_raises_and_always_diagnoses(payload: bytes, now: int) -> None:
    rows = fleet.fleet({topics.state(SITE, "gate-01"): payload}, now)
    assert len(rows) == 1 and rows[0].dev == "gate-01"
    fleet.render(rows, now)
    fleet.as_json(rows)
    if not rows[0].online:
        assert "offline" in rows[0].problems
        assert not any(p.startswith(("clock", "disk", "board", "reader")) for p in rows[0].problems)


@given(states, states)
@settings(max_examples=100, deadline=None)
def test_merge_fills_only_what_the_newest_message_lacks(old: dict, new: dict) -> None:
    t = topics.state(SITE, "gate-01")
    first = fleet.fleet({t: cbor2.dumps(old)}, 0)
    known = fleet.remembered(first)
    fresh = fleet.parse(t, cbor2.dumps(new))
    assert fresh is not None
    merged = fleet.merge(fleet.parse(t, cbor2.dumps(new)), known[t])  # type: ignore[arg-type]
    for key in fleet.REMEMBERED:
        if getattr(fresh, key) not in (None, ""):
            assert getattr(merged, key) == getattr(fresh, key)   # the newest message wins
        else:
            assert getattr(merged, key) == known[t].get(key, getattr(fresh, key))
    for key in ("online", "backlog", "disk", "board", "readers", "tq"):  # never borrowed
        assert getattr(merged, key) == getattr(fresh, key)


@given(IDS, cbor_values, st.integers(1, 2**40))
@settings(max_examples=150, deadline=None)
def test_an_ack_counts_only_for_its_topic(topic_dev: str, payload_dev: object,
                                          version: int) -> None:
    ack = {"v": 1, "site": SITE, "dev": payload_dev, "version": version, "result": "applied"}
    kind, who, got = attribute(topics.config_ack(SITE, topic_dev), cbor2.dumps(ack), SITE,
                               version)
    assert who == topic_dev
    if payload_dev == topic_dev:
        assert kind == "ack" and got == ack
    else:
        assert kind == "mismatch"


@given(st.binary(max_size=100), st.text(max_size=60))
@settings(max_examples=150, deadline=None)
def test_attribute_never_raises(payload: bytes, topic: str) -> None:
    kind, _who, _ = attribute(topic, payload, SITE, 1)
    assert kind in ("ack", "mismatch", "ignore")


@given(IDS, st.sampled_from(ROLES), st.sampled_from(DIRECTIONS))
def test_device_spec_round_trip(dev: str, role: str, direction: str) -> None:
    if role != "gate" and direction == "out":
        with pytest.raises(PkiError):
            parse_device_spec(f"{dev}:{role}:{direction}")
        return
    spec = parse_device_spec(f"{dev}:{role}:{direction}")
    assert (spec.id, spec.role, spec.direction) == (dev, role, direction)
    assert parse_device_spec(dev, role).role == role


@given(st.text(max_size=40))
def test_device_spec_refuses_with_its_own_error(text: str) -> None:
    with contextlib.suppress(PkiError):
        parse_device_spec(text)


@given(st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True), st.integers(1, 65535))
def test_parse_broker_round_trip(host: str, port: int) -> None:
    assert parse_broker(f"{host}:{port}") == (host, port)
    assert parse_broker(host) == (host, 8883)


@given(st.text(max_size=40))
def test_parse_broker_raises_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_broker(text)


@given(st.dictionaries(st.sampled_from(list(fleet.REMEMBERED) + ["x"]), cbor_values.filter(
    lambda v: not isinstance(v, bytes | float)), max_size=6))
@settings(max_examples=100, deadline=None)
def test_a_hand_edited_cache_cannot_break_the_view(known: dict) -> None:
    t = topics.state(SITE, "gate-01")
    rows = fleet.fleet({t: cbor2.dumps({"online": False})}, 10**12, {t: known})
    fleet.render(rows, 10**12)
    fleet.as_json(rows)
