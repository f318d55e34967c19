"""The agent per role, without readers or a broker: training touches carry the current course,
and a stale or missing ID list is a reported condition in the state message."""

from pathlib import Path

from cloud_sink.workday import jst_ms
from edge.agent import Agent
from edge.clock import ManualClock
from edge.config import from_dict
from edge.decision import CardRead
from edge.idlist import Entry, MemoryIdList, Status
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision, Role, decode

SCHEDULE = """
[[course]]
id = "K-101"
name = "足場の組立て等作業主任者"
start = 2026-12-01T09:00:00+09:00
end = 2026-12-03T17:00:00+09:00
"""


def make_agent(tmp_path: Path, role: str, clock: ManualClock, idlist: MemoryIdList | None) -> Agent:
    (tmp_path / "schedule.toml").write_text(SCHEDULE)
    cfg = from_dict({
        "device": {"id": "station-1", "site": "13100000000009", "role": role,
                   "data_dir": str(tmp_path / "data")},
        "mqtt": {"tls": False, "port": 1},
        "training": {"schedule": str(tmp_path / "schedule.toml")},
        "idlist": {"max_age_h": 24.0},
        "readers": [{"name": "station", "path": "udp:127.0.0.1:50000"}],  # built, never started
    })
    return Agent(cfg, clock=clock, idlist=idlist, config_keys=[])


def test_training_touches_carry_the_current_course(tmp_path: Path) -> None:
    clock = ManualClock(jst_ms(2026, 12, 2, 10, 0))
    idlist = MemoryIdList([Entry("10000000000001", Status.ACTIVE, cards=(b"\x01" * 8,))],
                          version=3, issued_ms=jst_ms(2026, 12, 2, 0, 0))
    agent = make_agent(tmp_path, "training", clock, idlist)
    reader = agent.cfg.readers[0]
    try:
        t1 = agent.handle_read(reader, CardRead(b"\x01" * 8, CardTech.FELICA))
        t2 = agent.handle_read(reader, CardRead(b"\x02" * 8, CardTech.FELICA))
        clock.set(jst_ms(2026, 12, 4, 10, 0))  # after the course
        t3 = agent.handle_read(reader, CardRead(b"\x03" * 8, CardTech.FELICA))
        assert t1 and t2 and t3
        assert (t1.role, t1.decision, t1.reason, t1.facts["course"]) == (
            Role.TRAINING, Decision.ALLOW, Reason.REGISTERED, "K-101")
        assert (t2.reason, t2.tid, t2.facts["course"]) == (Reason.UNREGISTERED, None, "K-101")
        assert "course" not in t3.facts
        # what went into the outbox is what the agent returned
        stored = [decode(p) for _, p in agent.outbox.pending(0, 10)]
        assert stored == [t1, t2, t3]
        state = agent.state()
        assert state["list_stale"] is True and state["list_age_h"] == 58.0  # > max_age_h 24
    finally:
        agent.outbox.close()


def test_no_list_is_reported_stale(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, "gate", ManualClock(0), None)
    try:
        assert agent.state()["list_stale"] is True and agent.state()["list_age_h"] is None
    finally:
        agent.outbox.close()
