"""The vending role on an MDB machine in the production Agent, against the VMC simulator and the
real firmware under the unix port (two real ptys): the touch carries item, price and result;
an agent killed with SIGKILL mid-vend leaves an indeterminate vend at its restart, never a
second drink and never a bill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest

from firmware import mdb
from protocol.reasons import Reason
from protocol.touch import Decision
from sim.board import BoardProcess
from sim.vmc import PtyWire, Vmc
from vending import transaction as tx
from vending.role import VendingRole

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mdb_agent import CARD, TECH, build  # noqa: E402

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent


@pytest.fixture
def machine(tmp_path):
    vm, vs = os.openpty()
    tty.setraw(vm)
    tty.setraw(vs)
    board = BoardProcess(tmp_path, uarts={"1": os.ttyname(vs)}, mdb_uart=1, wdt_ms=3000)
    board.start()
    vmc = Vmc(PtyWire(vm), reply_timeout=0.2)
    vmc.setup()
    cfg = {
        "device": {"id": "vend-08", "site": "13100000000001", "role": "vending",
                   "data_dir": str(tmp_path / "data")},
        "mqtt": {"tls": False, "port": 1},
        "vending": {"serial": board.port, "contractor": "20000000000001", "channel": "mdb",
                    "price_ceiling": 150, "session_s": 8.0},
        "readers": [{"name": "vend", "path": "udp:127.0.0.1:50000"}],  # built, never started
    }
    try:
        yield board, vmc, cfg
    finally:
        board.close()
        os.close(vm)
        os.close(vs)
    for i in range(len(board.logs)):
        assert "Traceback" not in board.log(i), board.log(i)


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["r"] = fn()
        except Exception as e:
            out["error"] = repr(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def test_mdb_tap_is_one_touch_with_item_and_price(machine):
    board, vmc, cfg = machine
    agent = build(cfg)
    assert isinstance(agent.plugin, VendingRole) and agent.plugin.mdb is not None
    agent.plugin.start()
    reader = agent.cfg.readers[0]
    try:
        from edge.decision import CardRead
        from protocol.touch import CardTech

        th, got = _in_thread(lambda: (vmc.poll_until((mdb.P_BEGIN_SESSION,), 400),
                                      vmc.select(item=11, price=130)))
        first = agent.handle_read(reader, CardRead(CARD, CardTech.FELICA))
        th.join(10)
        assert "error" not in got, got
        assert vmc.funds is None or vmc.funds == 150
        assert first is not None and first.decision is Decision.ALLOW, first
        assert (first.facts["result"], first.facts["item"], first.facts["price"]) == ("dispensed",
                                                                                      11, 130)
        agent.clock.advance(60_000)  # type: ignore[attr-defined]  (past the repeat-tap window)
        second = agent.handle_read(reader, CardRead(CARD, CardTech.FELICA))
        assert second is not None
        assert (second.decision, second.reason) == (Decision.DENY, Reason.LIMIT_REACHED)
        assert len(agent.plugin.billable()) == 1
    finally:
        agent.plugin.stop()
        agent.outbox.close()


# where the agent dies (SIGKILL) -> what the VMC does while it is dead -> the books after the
# restart: the board's journal settles what it saw, only a truly unknown outcome stays open
KILL_POINTS = {
    "session_open": ("nothing", tx.RELEASED),  # no VEND REQUEST yet: never approved
    "approved_then_success": ("success", tx.COMMITTED),  # the board journaled VEND SUCCESS
    "approved_then_failure": ("failure", tx.RELEASED),  # the board journaled VEND FAILURE
    "approved_vmc_reset": ("reset", tx.INDETERMINATE),  # the VMC itself lost the outcome
    "approved_still_vending": ("later", tx.COMMITTED),  # result after the restart: late report
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_agent_killed_mid_vend_settled_from_the_board_journal(machine, tmp_path, point):
    """The agent is SIGKILLed at each point of a vend; at its restart the vend is settled as the
    pulse path settles one (the board's journal answers the query), never billed without the
    VMC's VEND SUCCESS, never a second drink on the allowance."""
    board, vmc, cfg = machine
    vmc_does, final = KILL_POINTS[point]
    cfile = tmp_path / "agent.json"
    cfile.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, str(HERE / "mdb_agent.py"), str(cfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        vmc.poll_until((mdb.P_BEGIN_SESSION,), polls=4000)
        if point != "session_open":
            vmc.vend_request(item=5, price=120)
            vmc.poll_until((mdb.P_VEND_APPROVED,))
        proc.send_signal(signal.SIGKILL)  # the agent dies (while the can falls)
        proc.wait(10)
        if vmc_does == "success":
            assert vmc.vend_success(5).ack  # the VMC vended and says so; no host hears it
            vmc.session_complete()
        elif vmc_does == "failure":
            assert vmc.vend_failure().ack
            vmc.session_complete()
        elif vmc_does == "reset":
            assert vmc.reset().ack
            vmc.setup()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    agent = build(cfg)  # the restart
    agent.plugin.start()  # recover(): journal.recover, then the board's journal is asked
    try:
        ctl = agent.plugin.ctl
        vid = 1
        if vmc_does == "later":
            assert ctl.journal.get(vid).state == tx.INDETERMINATE  # the board: still running
            assert vmc.vend_success(5).ack
            vmc.session_complete()
            deadline = time.monotonic() + 15
            while ctl.journal.get(vid).state != final and time.monotonic() < deadline:
                time.sleep(0.1)  # the role's idle poll takes the VMC's late report
        elif vmc_does == "nothing":  # the VMC selects in the stale session: the new agent denies
            vmc.vend_request(item=5, price=120)
            assert vmc.poll_until((mdb.P_VEND_APPROVED, mdb.P_VEND_DENIED),
                                  polls=2000).code == mdb.P_VEND_DENIED
            vmc.session_complete()
        rec = ctl.journal.get(vid)
        assert rec.state == final, (rec, ctl.anomalies)
        assert len(ctl.billable()) == (1 if final == tx.COMMITTED else 0)
        assert ctl.remaining(TECH) == (1 if final == tx.RELEASED else 0)
        assert [o.vend_id for o in ctl.unresolved()] == ([vid] if final == tx.INDETERMINATE else [])
        from edge.decision import CardRead
        from protocol.touch import CardTech

        if final != tx.RELEASED:  # held or used: no second drink on this allowance
            agent.clock.advance(60_000)  # type: ignore[attr-defined]
            again = agent.handle_read(agent.cfg.readers[0], CardRead(CARD, CardTech.FELICA))
            assert again is not None and again.reason == Reason.LIMIT_REACHED
    finally:
        agent.plugin.stop()
        agent.outbox.close()
