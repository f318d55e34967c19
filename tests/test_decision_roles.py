"""Vending and training decisions, the training schedule, and list age."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.decision import CardRead, decide_training, decide_vending, list_age_h
from edge.idlist import Entry, MemoryIdList, Status
from edge.roles.training import Course, Schedule
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision

ACTIVE = Entry("10000000000001", Status.ACTIVE, cards=(b"\x01",))
SUSPENDED = Entry("10000000000002", Status.SUSPENDED, cards=(b"\x02",))
IDLIST = MemoryIdList([ACTIVE, SUSPENDED], version=7, issued_ms=1_000)


@given(st.integers(-3, 5), st.sampled_from([b"\x01", b"\x02", b"\x03"]))
def test_vending_table(remaining: int, card: bytes) -> None:
    v = decide_vending(CardRead(card, CardTech.FELICA), IDLIST, remaining)
    expected = {
        b"\x01": (Decision.ALLOW, Reason.OK) if remaining > 0 else (Decision.DENY, Reason.LIMIT_REACHED),
        b"\x02": (Decision.DENY, Reason.SUSPENDED),
        b"\x03": (Decision.DENY, Reason.UNKNOWN_CARD),
    }[card]
    assert (v.decision, v.reason) == expected and v.list_version == 7


def test_training_counts_every_readable_card() -> None:
    assert decide_training(CardRead(b"\x01", CardTech.FELICA), IDLIST).reason is Reason.REGISTERED
    v = decide_training(CardRead(b"\x09", CardTech.FELICA), IDLIST)
    assert (v.decision, v.reason) == (Decision.ALLOW, Reason.UNREGISTERED)
    v = decide_training(CardRead(b"", CardTech.UNKNOWN, error=Reason.UNREADABLE), IDLIST)
    assert (v.decision, v.reason) == (Decision.DENY, Reason.UNREADABLE)
    assert decide_training(CardRead(b"\x01", CardTech.FELICA), None).reason is Reason.UNREGISTERED


def test_list_age() -> None:
    assert list_age_h(None, 10) is None
    assert list_age_h(IDLIST, 1_000 + 7_200_000) == pytest.approx(2.0)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 500)), max_size=10),
       st.integers(-10, 20_000))
def test_schedule_current_course(spans: list[tuple[int, int]], now: int) -> None:
    courses, t = [], 0
    for i, (gap, length) in enumerate(spans):  # build non-overlapping courses
        t += gap
        courses.append(Course(f"c{i}", f"course {i}", t, t + length))
        t += length
    s = Schedule(courses)
    cur = s.current(now)
    covering = [c for c in courses if c.start_ms <= now < c.end_ms]
    assert (cur is None and not covering) or (cur is not None and covering == [cur])


def test_schedule_refuses_overlaps_and_loads_toml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="overlap"):
        Schedule([Course("a", "A", 0, 10), Course("b", "B", 5, 20)])
    p = tmp_path / "schedule.toml"
    p.write_text('[[course]]\nid = "K-101"\nname = "足場の組立て"\n'
                 'start = 2026-12-01T09:00:00+09:00\nend = 2026-12-05T17:00:00+09:00\n')
    s = Schedule.load(p)
    assert s.current(s.courses[0].start_ms).name == "足場の組立て"
    p.write_text('[[course]]\nid = "K-101"\nname = "x"\nstart = 2026-12-01\n')
    with pytest.raises(ValueError, match="course\\[0\\]"):
        Schedule.load(p)
