"""The gate decision and the re-tap debouncer, exhaustively and by property."""

from hypothesis import given
from hypothesis import strategies as st

from edge.decision import AntiPassback, CardRead, Debouncer, decide_gate
from edge.idlist import Entry, MemoryIdList, Status
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision

digits14 = st.text("0123456789", min_size=14, max_size=14)
cards = st.binary(min_size=4, max_size=10)


@st.composite
def lists(draw: st.DrawFn) -> MemoryIdList:
    entries = draw(st.lists(st.builds(Entry, tid=digits14, status=st.sampled_from(Status),
                                      level=st.integers(1, 4),
                                      cards=st.lists(cards, max_size=2).map(tuple)),
                            max_size=20, unique_by=lambda e: e.tid))
    return MemoryIdList(entries, version=draw(st.integers(0, 10**6)))


@given(lists(), cards, st.sampled_from(["in", "out"]))
def test_gate_by_card(idlist: MemoryIdList, card: bytes, direction: str) -> None:
    v = decide_gate(CardRead(card, CardTech.FELICA), idlist, direction)
    entry = idlist.by_card(card)
    assert v.list_version == idlist.version
    if entry is None:
        assert (v.decision, v.reason, v.tid) == (Decision.DENY, Reason.UNKNOWN_CARD, None)
    else:
        expected = {Status.ACTIVE: Reason.OK, Status.SUSPENDED: Reason.SUSPENDED,
                    Status.REVOKED: Reason.REVOKED}[entry.status]
        assert v.reason == expected and v.tid == entry.tid
        assert (v.decision is Decision.ALLOW) == (entry.status is Status.ACTIVE)


@given(lists(), digits14)
def test_gate_by_technician_id_read_from_card(idlist: MemoryIdList, tid: str) -> None:
    v = decide_gate(CardRead(b"\x01", CardTech.FELICA, tid=tid), idlist, "in")
    entry = idlist.by_tid(tid)
    if entry is None:
        assert (v.decision, v.reason) == (Decision.DENY, Reason.UNKNOWN_TECHNICIAN)
    else:
        assert (v.decision is Decision.ALLOW) == (entry.status is Status.ACTIVE)


@given(st.sampled_from([Reason.UNREADABLE, Reason.BAD_CARD_DATA, Reason.FOREIGN_CARD]), lists())
def test_unreadable_cards_are_denied_with_their_reason(reason: Reason, idlist: MemoryIdList) -> None:
    v = decide_gate(CardRead(b"", CardTech.UNKNOWN, error=reason), idlist, "in")
    assert (v.decision, v.reason) == (Decision.DENY, reason)


def test_no_list_denies_everything() -> None:
    v = decide_gate(CardRead(b"\x01\x02", CardTech.FELICA), None, "in")
    assert (v.decision, v.reason, v.list_version) == (Decision.DENY, Reason.NO_LIST, 0)


def test_anti_passback_denies_the_same_direction_twice() -> None:
    e = Entry("10000000000001", Status.ACTIVE, cards=(b"\x01",))
    idlist, apb = MemoryIdList([e]), AntiPassback()
    read = CardRead(b"\x01", CardTech.FELICA)
    assert decide_gate(read, idlist, "in", apb).decision is Decision.ALLOW
    assert decide_gate(read, idlist, "in", apb).reason is Reason.ANTI_PASSBACK
    assert decide_gate(read, idlist, "out", apb).decision is Decision.ALLOW
    assert decide_gate(read, idlist, "in", apb).decision is Decision.ALLOW


@given(st.floats(0.1, 10.0), st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]),
                                                st.floats(0.0, 20.0)), max_size=60))
def test_debouncer_matches_its_definition(window: float, events: list[tuple[bytes, float]]) -> None:
    """A sighting is a new tap iff the same card was not seen within the window before it."""
    d = Debouncer(window)
    now, last_seen = 0.0, {}
    for card, gap in events:
        now += gap
        expected = card not in last_seen or now - last_seen[card] >= window
        assert d.is_new_tap(card, now) == expected
        last_seen[card] = now


def test_debouncer_forgets_old_cards_but_keeps_recent_ones() -> None:
    d = Debouncer(1.0)
    for i in range(1000):
        assert d.is_new_tap(i.to_bytes(4, "big"), float(i) * 2)
    assert len(d._seen) <= 257
    assert not d.is_new_tap((999).to_bytes(4, "big"), 1998.5)
