"""The fleet view shows a gate's board health and alarms from its state message."""

import cbor2

from ops import fleet
from protocol import topics

SITE = "13100000000001"


def state(dev: str, gate: dict[str, object]) -> tuple[str, bytes]:
    return topics.state(SITE, dev), cbor2.dumps({
        "v": 1, "dev": dev, "site": SITE, "role": "gate", "online": True, "ts": 1000, "tq": "synced",
        "sw": "0.1.0", "lv": 1, "cv": 1, "backlog": 0, "oldest_ms": None, "readers": {"entry": "ok"},
        "gate": gate})


def test_gate_alarms_and_board_health_are_problems() -> None:
    msgs = dict([state("gate-01", {"board": "ok", "alarms": []}),
                 state("gate-02", {"board": "offline", "alarms": ["forced", "held_open"]})])
    rows = {r.dev: r for r in fleet.fleet(msgs, 2000)}
    assert rows["gate-01"].problems == []
    assert rows["gate-02"].problems == ["gate board offline", "gate forced", "gate held_open"]
    assert "gate forced" in fleet.render(list(rows.values()), 2000)
