"""The agent follows the operator's signed ID list over a real broker: a list signed by the
operator key is applied and decides taps; a forged one is refused and the old list still
serves; a newer delta is applied on top."""

from pathlib import Path

import pytest

from broker.launcher import PrivateBroker
from broker.procs import wait_until
from cloud_sink.workday import jst_ms
from demo.site_day import card_of, write_idlist_csv
from edge.agent import Agent
from edge.clock import ManualClock
from edge.config import from_dict
from edge.decision import CardRead
from edge.idlist import Entry, Status
from edge.signing import generate_key
from ops.list_publish import publish_list
from protocol.reasons import Reason
from protocol.touch import CardTech, Decision
from sim.nfc_card import free_udp_port

SITE = "13100000000003"


def wait(cond, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    wait_until(cond, timeout, "the condition")


@pytest.mark.e2e
def test_signed_list_forged_list_and_delta(broker: PrivateBroker, tmp_path: Path) -> None:
    operator, forger = generate_key(), generate_key()
    csv = tmp_path / "technicians.csv"
    one = Entry("10000000000001", Status.ACTIVE, cards=(card_of(1).ident,))
    two = Entry("10000000000002", Status.ACTIVE, cards=(card_of(2).ident,))
    write_idlist_csv(csv, [one])
    cfg = from_dict({
        "device": {"id": "gate-list", "site": SITE, "data_dir": str(tmp_path / "agent")},
        "mqtt": {"host": broker.host, "port": broker.port, "tls": False},
        "idlist": {"name": "site-list"},
        "readers": [{"name": "entry", "path": f"udp:127.0.0.1:{free_udp_port()}",
                     "targets": ["212F"]}],  # an empty field: the taps come in by hand
    })
    clock = ManualClock(jst_ms(2026, 11, 26, 7, 0))
    agent = Agent(cfg, clock=clock, config_keys=[operator.public_key()])
    agent.start()
    reader = cfg.readers[0]
    at = (broker.host, broker.port)
    try:
        assert agent.idlist is None
        first = agent.handle_read(reader, CardRead(card_of(1).ident, CardTech.FELICA))
        assert first is not None and first.reason is Reason.NO_LIST

        publish_list(csv, name="site-list", version=1, key=operator, broker=at, progress=False,
                     out_path=tmp_path / "v1.idl")
        wait(lambda: agent.idlist is not None and agent.idlist.version == 1)
        clock.advance(60_000)  # a minute between taps: never inside the re-tap window
        t = agent.handle_read(reader, CardRead(card_of(1).ident, CardTech.FELICA))
        assert t is not None and (t.decision, t.list_version) == (Decision.ALLOW, 1)

        # a forger adds technician 2: refused, version 1 still serves, the refusal is reported
        write_idlist_csv(csv, [one, two])
        publish_list(csv, name="site-list", version=2, key=forger, broker=at, progress=False,
                     out_path=tmp_path / "forged.idl")
        wait(lambda: agent.state()["idlist"]["refused"] >= 1)  # seen, and refused
        assert agent.state()["idlist"]["last_refusal"].endswith("unknown_key")  # not our operator
        assert agent.idlist is not None and agent.idlist.version == 1
        clock.advance(60_000)  # a minute between taps: never inside the re-tap window
        t = agent.handle_read(reader, CardRead(card_of(2).ident, CardTech.FELICA))
        assert t is not None and t.reason is Reason.UNKNOWN_CARD

        # the operator publishes version 3 with a delta from version 1
        publish_list(csv, name="site-list", version=3, key=operator, broker=at, progress=False,
                     prev_path=tmp_path / "v1.idl", out_path=tmp_path / "v3.idl")
        wait(lambda: agent.idlist is not None and agent.idlist.version == 3)
        clock.advance(60_000)  # a minute between taps: never inside the re-tap window
        t = agent.handle_read(reader, CardRead(card_of(2).ident, CardTech.FELICA))
        assert t is not None and (t.decision, t.tid, t.list_version) == (
            Decision.ALLOW, "10000000000002", 3)
        assert agent.state()["idlist"]["version"] == 3
    finally:
        agent.stop()
