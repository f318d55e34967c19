"""The v1 list codec: round trips, lookups, and refusal of every kind of bad file."""

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.idlist import Entry, MemoryIdList, Status, build_list, load_list, open_list
from edge.idlist.codec import (
    HEADER_SIZE,
    MAX_CARDS_PER_ID,
    ListFormatError,
    build_rows,
    entry_of,
)

tids = st.integers(min_value=0, max_value=10**14 - 1).map(lambda t: f"{t:014d}")
cards = st.binary(min_size=4, max_size=10)


@st.composite
def entry_lists(draw, max_size=40):
    ids = draw(st.lists(tids, unique=True, max_size=max_size))
    pool = iter(draw(st.lists(cards, unique=True, min_size=len(ids) * 3,
                              max_size=len(ids) * 3)))
    out = []
    for tid in ids:
        n = draw(st.integers(min_value=0, max_value=3))
        out.append(Entry(tid, draw(st.sampled_from(list(Status))),
                         draw(st.integers(min_value=1, max_value=4)),
                         tuple(next(pool) for _ in range(n))))
    return out


def canonical(e: Entry) -> Entry:
    return Entry(e.tid, e.status, e.level, tuple(sorted(set(e.cards))))


def small_list(version=1, name="main"):
    entries = [Entry(f"{10**13 + i * 7:014d}", list(Status)[i % 3], i % 4 + 1,
                     (i.to_bytes(8, "big"),) if i % 2
                     else (i.to_bytes(4, "big"), bytes(9) + bytes([i])))
               for i in range(100)]
    return entries, build_list(entries, name=name, version=version, issued_ms=1_700_000_000_000)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(entry_lists(), st.integers(min_value=0, max_value=2**63 - 1),
       st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_round_trip_matches_a_dict(entries, version, issued):
    data = build_list(entries, name="site-42_a", version=version, issued_ms=issued)
    lst = load_list(data)
    ref = MemoryIdList([canonical(e) for e in entries])
    assert (lst.name, lst.version, lst.issued_ms, len(lst)) == ("site-42_a", version, issued,
                                                                len(entries))
    for e in entries:
        assert lst.by_tid(e.tid) == ref.by_tid(e.tid) == canonical(e)
        for c in e.cards:
            assert lst.by_card(c) == canonical(e)
    assert sorted(lst, key=lambda e: e.tid) == sorted(ref, key=lambda e: e.tid)
    # deterministic: the same rows give the same bytes (deltas rely on it)
    assert build_rows(lst.rows(), name="site-42_a", version=version, issued_ms=issued) == data


@settings(deadline=None)  # the machine is shared: time is not the property
@given(entry_lists(max_size=10), tids, cards)
def test_absent_keys_are_none(entries, tid, card):
    lst = load_list(build_list(entries, name="main", version=1, issued_ms=0))
    if tid not in {e.tid for e in entries}:
        assert lst.by_tid(tid) is None
    if card not in {c for e in entries for c in e.cards}:
        assert lst.by_card(card) is None


@pytest.mark.parametrize("tid", ["", "1234567890123", "123456789012345", "1234567890123a",
                                 "１２３４５６７８９０１２３４", " 2345678901234"])
def test_malformed_technician_ids_are_not_found(tid):
    _, data = small_list()
    assert load_list(data).by_tid(tid) is None


@pytest.mark.parametrize("card", [b"", b"abc", bytes(11), bytes(100)])
def test_card_identifiers_outside_4_to_10_bytes_are_not_found(card):
    _, data = small_list()
    assert load_list(data).by_card(card) is None


def test_open_list_maps_the_file(tmp_path):
    entries, data = small_list(version=9)
    path = tmp_path / "main.idl"
    path.write_bytes(data)
    lst = open_list(path)
    assert lst.version == 9 and len(lst) == 100
    assert lst.by_tid(entries[5].tid) == canonical(entries[5])
    assert lst.by_card(entries[6].cards[0]).tid == entries[6].tid
    lst.close()


@pytest.mark.parametrize("bad, match", [
    ([Entry("00000000000001", Status.ACTIVE), Entry("00000000000001", Status.REVOKED)],
     "duplicate"),
    ([Entry("00000000000001", Status.ACTIVE, cards=(b"abcd",)),
      Entry("00000000000002", Status.ACTIVE, cards=(b"abcd",))], "two technicians"),
])
def test_builder_refuses_ambiguous_lists(bad, match):
    with pytest.raises(ListFormatError, match=match):
        build_list(bad, name="main", version=1, issued_ms=0)


def test_builder_refuses_bad_names_and_too_many_cards():
    with pytest.raises(ListFormatError):
        build_list([], name="a/b", version=1, issued_ms=0)
    with pytest.raises(ListFormatError):
        build_rows([(1, 0, 1, tuple(i.to_bytes(4, "big") for i in range(MAX_CARDS_PER_ID + 1)))],
                   name="x", version=1, issued_ms=0)


def test_empty_list_is_valid():
    lst = load_list(build_list([], name="main", version=1, issued_ms=0))
    assert len(lst) == 0 and lst.by_tid("00000000000000") is None and lst.by_card(b"abcd") is None


@settings(deadline=None)  # the machine is shared: time is not the property
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_list_format_error(data):
    with pytest.raises(ListFormatError):
        load_list(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_corruption_of_a_valid_file_is_refused(data):
    _, good = small_list()
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    buf = bytearray(good)
    if kind == "flip":
        pos = data.draw(st.integers(min_value=0, max_value=len(buf) - 1))
        buf[pos] ^= data.draw(st.integers(min_value=1, max_value=255))
    elif kind == "truncate":
        del buf[data.draw(st.integers(min_value=0, max_value=len(buf) - 1)):]
    else:
        buf += data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(ListFormatError):
        load_list(bytes(buf))


def _reseal(buf: bytearray) -> bytes:
    """Recompute both hashes, as a forger who knows the format (but not the key) would."""
    struct.pack_into("32s", buf, 76, hashlib.sha256(buf[HEADER_SIZE:]).digest())
    buf[224:256] = hashlib.sha256(buf[:224]).digest()
    return bytes(buf)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_structurally_forged_bodies_fail_only_with_list_format_error(data):
    """Hashes fixed up, body garbage: lookups answer or raise ListFormatError, nothing else."""
    entries, good = small_list()
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
        pos = data.draw(st.integers(min_value=HEADER_SIZE, max_value=len(buf) - 1))
        buf[pos] = data.draw(st.integers(min_value=0, max_value=255))
    lst = load_list(_reseal(buf))
    probes = [e.tid for e in entries[:30]] + [c for e in entries[:30] for c in e.cards]
    for p in probes:
        try:
            got = lst.by_tid(p) if isinstance(p, str) else lst.by_card(p)
        except ListFormatError:
            continue
        assert got is None or isinstance(got, Entry)
    try:
        rows = lst.rows()
    except ListFormatError:
        return
    assert all(isinstance(entry_of(r), Entry) for r in rows)


def test_header_fields_are_protected_by_the_header_hash():
    _, good = small_list(version=5)
    buf = bytearray(good)
    struct.pack_into("<Q", buf, 16, 6)  # bump the version without fixing the header hash
    with pytest.raises(ListFormatError, match="header"):
        load_list(bytes(buf))


def test_verify_false_skips_only_the_body_hash():
    _, good = small_list()
    buf = bytearray(good)
    buf[-1] ^= 1
    with pytest.raises(ListFormatError, match="body hash"):
        load_list(bytes(buf))
    assert len(load_list(bytes(buf), verify=False)) == 100


# Cards that share their first 8 bytes (same head, different tails), so equal heads run
# across the TOP blocks of the two-step bisect.
shared_prefix = st.tuples(st.sampled_from([b"\x01" * 8, b"\x02" * 8]),
                          st.binary(min_size=1, max_size=2)).map(lambda t: t[0] + t[1])


@st.composite
def crowded_lists(draw):
    ids = draw(st.lists(tids, unique=True, max_size=60))
    pool = iter(draw(st.lists(st.one_of(cards, shared_prefix), unique=True,
                              min_size=len(ids) * 2, max_size=len(ids) * 2)))
    return [Entry(t, Status.ACTIVE, 1, (next(pool), next(pool))) for t in ids]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(crowded_lists(), st.sampled_from([1, 2, 3, 5]), tids,
       st.one_of(cards, shared_prefix))
def test_two_step_bisect_across_many_blocks(entries, stride, probe_tid, probe_card):
    from unittest import mock

    from edge.idlist import codec

    with mock.patch.object(codec, "STRIDE", stride):  # tiny blocks: every boundary case
        lst = load_list(build_list(entries, name="main", version=1, issued_ms=0))
        for e in entries:
            assert lst.by_tid(e.tid) == canonical(e)
            for c in e.cards:
                assert lst.by_card(c) == canonical(e)
        known = {e.tid for e in entries}, {c for e in entries for c in e.cards}
        assert (lst.by_tid(probe_tid) is None) == (probe_tid not in known[0])
        assert (lst.by_card(probe_card) is None) == (probe_card not in known[1])
