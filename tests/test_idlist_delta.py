"""Deltas: diff/apply round trips, the fast array merge against the reference rebuild, and
refusals of deltas that do not fit."""

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.idlist.codec import build_rows, load_list
from edge.idlist.delta import Delta, DeltaError, apply_delta, diff, rebuild
from edge.idlist.merge import MergeConflict, merge

CARD = st.binary(min_size=4, max_size=10)


@st.composite
def list_pair(draw):
    """Two versions of a list over a shared pool of IDs and cards (so cards move around)."""
    tids = draw(st.lists(st.integers(0, 10**14 - 1), unique=True, max_size=60))
    pool = draw(st.lists(CARD, unique=True, max_size=80))

    def version(present):
        free = list(pool)
        rows = []
        for t in tids:
            if not draw(present):
                continue
            n = draw(st.integers(0, 3))
            cards, free = tuple(free[:n]), free[n:]
            rows.append((t, draw(st.integers(0, 2)), draw(st.integers(1, 4)), cards))
        draw(st.randoms()).shuffle(pool)
        return rows

    a = version(st.booleans())
    b = version(st.booleans())
    return a, b


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(list_pair())
def test_diff_then_apply_gives_the_new_file_byte_for_byte(pair):
    a_rows, b_rows = pair
    a = build_rows(list(a_rows), name="main", version=1, issued_ms=10)
    b = build_rows(list(b_rows), name="main", version=2, issued_ms=20)
    d = diff(load_list(a), load_list(b))
    fast = merge(load_list(a), d.upsert, d.remove, version=2, issued_ms=20)
    assert fast == rebuild(load_list(a), d) == b  # merge is exactly the reference
    assert apply_delta(load_list(a), d) == b
    assert Delta.from_doc(d.to_doc()) == d


def _pair():
    rows = [(10**13 + i, 0, 1, (i.to_bytes(4, "big"),)) for i in range(50)]
    a = build_rows(list(rows), name="main", version=1, issued_ms=1)
    b = build_rows(rows[5:] + [(1, 2, 3, (b"\x99" * 8,))], name="main", version=2, issued_ms=2)
    return load_list(a), load_list(b), diff(load_list(a), load_list(b))


def test_delta_that_does_not_fit_is_refused():
    a, b, d = _pair()
    assert len(d) == 6
    with pytest.raises(DeltaError) as exc:
        apply_delta(b, d)
    assert exc.value.reason == "delta_base"
    steal = dataclasses.replace(d, upsert=((2, 0, 1, ((10).to_bytes(4, "big"),)),))
    with pytest.raises(DeltaError) as exc:  # card 10 still belongs to someone else
        apply_delta(a, steal)
    assert exc.value.reason == "delta_invalid"
    with pytest.raises(MergeConflict):
        merge(a, (), (12345,), version=2, issued_ms=2)
    forged = dataclasses.replace(d, result_hash=bytes(32))
    with pytest.raises(DeltaError) as exc:
        apply_delta(a, forged)
    assert exc.value.reason == "delta_result_hash"


@pytest.mark.parametrize("field, value", [
    ("upsert", [[1, 3, 1, []]]), ("upsert", [[1, 0, 5, []]]), ("upsert", [[10**14, 0, 1, []]]),
    ("upsert", [[1, 0, 1, [b"abc"]]]), ("remove", [-1]), ("remove", ["1"]), ("from", 2),
    ("base_hash", b"short"), ("kind", "snapshot"), ("upsert", [[1, 0, 1, []], [1, 0, 2, []]]),
])
def test_malformed_delta_documents_are_refused(field, value):
    _, _, d = _pair()
    doc = d.to_doc() | {field: value}
    with pytest.raises(DeltaError):
        Delta.from_doc(doc)


def test_diff_needs_same_list_and_a_newer_version():
    a, b, _ = _pair()
    with pytest.raises(DeltaError):
        diff(b, a)
