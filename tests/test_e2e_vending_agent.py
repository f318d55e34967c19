"""The vending role in the agent against the real firmware (MicroPython unix port, pty): a vend
with no drop is a failed touch and gives the allowance back; a dispensed one uses it up."""

from pathlib import Path

import pytest

from cloud_sink.workday import jst_ms
from edge.agent import Agent
from edge.clock import ManualClock
from edge.config import from_dict
from edge.decision import CardRead
from edge.idlist import Entry, MemoryIdList, Status
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision
from sim.board import DROP, VEND_PIN, BoardProcess
from vending.role import VendingRole

CARD = b"\x01\x2e\x4c\xd3\x00\x00\x00\x01"


@pytest.mark.e2e
@pytest.mark.parametrize("drops", [False, True])
def test_vend_outcome_becomes_the_touch(tmp_path: Path, drops: bool) -> None:
    links = [{"out": VEND_PIN[1], "in": DROP, "delay_ms": 100, "hold_ms": 150, "level": 0}]
    board = BoardProcess(tmp_path, links=links if drops else [])
    board.start()
    cfg = from_dict({
        "device": {"id": "vend-07", "site": "13100000000001", "role": "vending",
                   "data_dir": str(tmp_path / "data")},
        "mqtt": {"tls": False, "port": 1},
        "vending": {"serial": board.port, "contractor": "20000000000001", "drop_timeout_ms": 800},
        "readers": [{"name": "vend", "path": "udp:127.0.0.1:50000"}],  # built, never started
    })
    clock = ManualClock(jst_ms(2026, 11, 26, 12, 0))
    idlist = MemoryIdList([Entry("10000000000001", Status.ACTIVE, cards=(CARD,))])
    agent = Agent(cfg, clock=clock, idlist=idlist, config_keys=[])
    assert isinstance(agent.plugin, VendingRole)
    agent.plugin.start()
    reader = cfg.readers[0]
    try:
        first = agent.handle_read(reader, CardRead(CARD, CardTech.FELICA))
        clock.advance(60_000)
        second = agent.handle_read(reader, CardRead(CARD, CardTech.FELICA))
        assert first is not None and second is not None
        assert first.decision is Decision.ALLOW and first.facts["contractor"] == "20000000000001"
        if drops:
            assert first.facts["result"] == "dispensed"
            assert (second.decision, second.reason) == (Decision.DENY, Reason.LIMIT_REACHED)
            assert "result" not in second.facts   # nothing was vended
        else:
            # no drop sensed: the vend failed and the allowance was released, so the next
            # tap is served again (and fails again on this board)
            assert first.facts["result"] == "failed"
            assert (second.decision, second.facts["result"]) == (Decision.ALLOW, "failed")
        assert len(agent.plugin.billable()) == (1 if drops else 0)
    finally:
        agent.plugin.stop()
        agent.outbox.close()
        board.close()
