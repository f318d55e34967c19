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
from mdb_agent import CARD, build  # noqa: E402

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


def test_agent_killed_mid_vend_is_indeterminate_never_billed_never_twice(machine, tmp_path):
    board, vmc, cfg = machine
    cfile = tmp_path / "agent.json"
    cfile.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, str(HERE / "mdb_agent.py"), str(cfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        vmc.poll_until((mdb.P_BEGIN_SESSION,), polls=4000)
        vmc.vend_request(item=5, price=120)
        vmc.poll_until((mdb.P_VEND_APPROVED,))
        proc.send_signal(signal.SIGKILL)  # the agent dies while the can falls
        proc.wait(10)
        assert vmc.vend_success(5).ack  # the VMC vended and says so; nobody on the host hears
        vmc.session_complete()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    agent = build(cfg)  # the restart
    agent.plugin.start()  # recover(): the vending row becomes indeterminate
    try:
        ctl = agent.plugin.ctl
        assert [o.state for o in ctl.unresolved()] == [tx.INDETERMINATE]
        assert ctl.billable() == []  # nothing billed that nobody saw dispensed
        assert ctl.remaining("10000000000001") == 0  # and no second drink on this allowance
        from edge.decision import CardRead
        from protocol.touch import CardTech

        again = agent.handle_read(agent.cfg.readers[0], CardRead(CARD, CardTech.FELICA))
        assert again is not None and again.reason == Reason.LIMIT_REACHED
    finally:
        agent.plugin.stop()
        agent.outbox.close()
