"""A vending agent on an MDB machine as its own process, for the agent-killed-mid-vend test:
builds the production Agent from a JSON config, taps one card and prints the touch's facts.

    python tests/mdb_agent.py CONFIG.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_sink.workday import jst_ms  # noqa: E402
from edge.agent import Agent  # noqa: E402
from edge.clock import ManualClock  # noqa: E402
from edge.config import from_dict  # noqa: E402
from edge.decision import CardRead  # noqa: E402
from edge.idlist import Entry, MemoryIdList, Status  # noqa: E402
from protocol.touch import CardTech  # noqa: E402

CARD = b"\x01\x2e\x4c\xd3\x00\x00\x00\x01"
TECH = "10000000000001"


def build(cfg_dict: dict) -> Agent:
    cfg = from_dict(cfg_dict)
    clock = ManualClock(jst_ms(2026, 11, 26, 12, 0))
    idlist = MemoryIdList([Entry(TECH, Status.ACTIVE, cards=(CARD,))])
    return Agent(cfg, clock=clock, idlist=idlist, config_keys=[])


def main() -> None:
    agent = build(json.loads(Path(sys.argv[1]).read_text()))
    agent.plugin.start()
    print("AGENT START", flush=True)
    t = agent.handle_read(agent.cfg.readers[0], CardRead(CARD, CardTech.FELICA))
    print(json.dumps(None if t is None else t.facts), flush=True)
    agent.plugin.stop()


if __name__ == "__main__":
    main()
