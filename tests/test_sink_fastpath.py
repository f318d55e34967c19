"""The sink writer's fast path (cloud_sink.ingest.fastpath.fast_row) against the full path
(cloud_sink.validate + derive.rows.touch_row): it may decline anything, but what it accepts the
full path accepts too, with the very same store row."""

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sink_support import NOW, SITE, touch

from cloud_sink.derive.rows import touch_row
from cloud_sink.ingest.fastpath import fast_row
from cloud_sink.model import DeadLetter, Policy
from cloud_sink.validate import validate
from protocol import topics
from protocol.touch import MAX_TS_MS, encode, to_map

POLICY = Policy()
KEYS = ["v", "dev", "site", "role", "seq", "ts", "tq", "card", "ct", "tid", "dec", "rsn", "lv",
        "cv", "x", "zz"]
FACT_KEYS = ["dir", "passage", "course", "contractor", "slot", "result", "reader", "Bad", "x" * 40,
             ""]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1]),
    st.text(max_size=70), st.binary(max_size=40),
    st.sampled_from(["gate", "vending", "training", "in", "out", "synced", "never_synced",
                     "felica", "iso14443a", "allow", "deny", "ok", "unknown_card", SITE,
                     "gate-01", "10000000000001", "1000000000000x", "x" * 65, "x" * 64,
                     "pending", "passed", "not_passed",
                     b"\x01" * 32, b"\x01" * 33, b""]))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.sampled_from(FACT_KEYS), scalars, max_size=4))


def base_maps() -> list[dict[str, object]]:
    return [to_map(touch(7)), to_map(touch(8, dir="out", who=None)),
            to_map(touch(9, role="training", facts={"course": "C-12"})),
            to_map(touch(10, role="vending", decision="deny",
                          facts={"slot": 3, "result": "dispensed", "contractor": "20000000000001",
                                 "paid": True}))]


def full_path(topic: str, payload: bytes) -> object:
    item = validate(topic, payload)
    return item if isinstance(item, DeadLetter) else touch_row(item, NOW, POLICY)


def test_well_formed_touches_take_the_fast_path_with_the_same_row() -> None:
    for m in base_maps():
        payload = cbor2.dumps(m)
        topic = topics.touch(str(m["site"]), str(m["dev"]))
        fast = fast_row(topic, payload, NOW, POLICY)
        assert fast is not None
        assert repr(fast) == repr(full_path(topic, payload))


@settings(max_examples=3000, deadline=None)
@given(base=st.sampled_from(range(4)),
       edits=st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(values, st.just("<del>"))),
                      max_size=3),
       fact_edits=st.lists(st.tuples(st.sampled_from(FACT_KEYS), st.one_of(scalars,
                                                                            st.just("<del>"))),
                           max_size=3),
       topic_kind=st.sampled_from(["same", "other-dev", "ack", "junk"]),
       trailing=st.sampled_from([b"", b"", b"", b"\x00", b"\xa0"]),
       top=st.sampled_from(["map", "map", "map", "list", "int"]))
def test_the_fast_path_accepts_only_what_the_full_path_accepts_and_agrees(
        base: int, edits: list[tuple[str, object]], fact_edits: list[tuple[str, object]],
        topic_kind: str, trailing: bytes, top: str) -> None:
    m = base_maps()[base]
    for k, val in edits:
        if val == "<del>":
            m.pop(k, None)
        else:
            m[k] = val
    if isinstance(m.get("x"), dict):
        x = dict(m["x"])  # type: ignore[call-overload]
        for k, val in fact_edits:
            if val == "<del>":
                x.pop(k, None)
            else:
                x[k] = val
        m["x"] = x
    obj: object = m if top == "map" else [m] if top == "list" else 5
    payload = cbor2.dumps(obj) + trailing
    topic = {"same": topics.touch(SITE, "gate-01"), "other-dev": topics.touch(SITE, "gate-07"),
             "ack": topics.touch_ack(SITE, "gate-01"), "junk": "ccus/v1/x/y/touch"}[topic_kind]
    fast = fast_row(topic, payload, NOW, POLICY)
    full = full_path(topic, payload)
    if fast is not None:
        assert not isinstance(full, DeadLetter), (full.reason, full.detail)
        assert repr(fast) == repr(full)


BOUNDARY_EDITS: list[tuple[str, object]] = [
    ("card", b"\x01" * 32), ("card", b"\x01" * 33), ("card", b""), ("card", "01"),
    ("tid", "1" * 14), ("tid", "1" * 13), ("tid", "1" * 15), ("tid", "１" * 14), ("tid", None),
    ("tid", 10000000000001), ("tid", ""),
    ("seq", 0), ("seq", 1), ("seq", 2**63 - 1), ("seq", 2**63), ("seq", True), ("seq", 1.0),
    ("ts", -1), ("ts", 0), ("ts", MAX_TS_MS), ("ts", MAX_TS_MS + 1), ("ts", 2**63),
    ("lv", -1), ("lv", True), ("cv", 2**63),
    ("v", True), ("v", 1.0), ("v", 2), ("role", "GATE"), ("role", "gate"), ("role", "training"),
    ("tq", "Synced"), ("ct", "felica "), ("dec", "ALLOW"), ("rsn", "nope"),
    ("dev", "gate-02"), ("site", "13100000000009"), ("dev", b"gate-01"),
    ("x", {"dir": "in", "a" * 32: 1}), ("x", {"dir": "in", "a" * 33: 1}),
    ("x", {"dir": "x" * 64}), ("x", {"dir": "in", "s": "x" * 64}),
    ("x", {"dir": "in", "s": "x" * 65}), ("x", {"dir": "in", "s": "a\x00b"}),
    ("x", {"dir": "in", **{f"k{i}": i for i in range(15)}}),
    ("x", {"dir": "in", **{f"k{i}": i for i in range(16)}}), ("x", {"dir": "in", "n": 2**63 - 1}),
    ("x", {"dir": "in", "n": 2**63}), ("x", {"dir": "in", "n": -(2**63)}),
    ("x", {"dir": "in", "n": -(2**63) - 1}), ("x", {"dir": "in", "f": 1.5}),
    ("x", {"dir": "in", 5: 1}), ("x", {"dir": "in", "b": True}), ("x", {"dir": "in", "l": [1]}),
    ("x", {"dir": "sideways"}), ("x", {}), ("x", []), ("zz", 1),
]


def test_boundaries_the_fast_path_declines_or_agrees() -> None:
    accepted = 0
    for m0 in base_maps():
        for key, val in BOUNDARY_EDITS:
            m = dict(m0, **{key: val})
            payload = cbor2.dumps(m)
            topic = topics.touch(SITE, str(m0["dev"]))
            fast = fast_row(topic, payload, NOW, POLICY)
            full = full_path(topic, payload)
            if fast is not None:
                accepted += 1
                assert not isinstance(full, DeadLetter), (key, val, full.reason, full.detail)
                assert repr(fast) == repr(full), (key, val)
            else:
                assert isinstance(full, DeadLetter), (key, val, "declined a valid touch")
    assert accepted > 50


def test_a_message_that_fails_unforeseen_is_dead_lettered_and_the_rest_are_mapped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's guard: a bug met by one message (here: touch_row raising for seq 8) makes
    that message an `internal_error` dead letter with its bytes; the batch goes on."""
    import cloud_sink.ingest.writer as sub

    real = sub.touch_row

    def fails_on_8(t, *a):  # type: ignore[no-untyped-def]
        if t.seq == 8:
            raise OverflowError("date value out of range")
        return real(t, *a)

    monkeypatch.setattr(sub, "touch_row", fails_on_8)
    items = [(topics.touch(SITE, "gate-01"), encode(touch(seq))) for seq in (7, 8, 9)]
    monkeypatch.setattr(sub, "fast_row", lambda *a: None)  # take the full path for every item
    rows, sources, dead = sub.map_items(items, NOW, POLICY, slow=False)
    assert [r[1] for r in rows] == [7, 9]
    assert sources == [items[0], items[2]]
    assert [(d.reason, d.payload) for d in dead] == [("internal_error", items[1][1])]
    assert "OverflowError" in dead[0].detail
