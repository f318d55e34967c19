"""End to end over real ptys: the VMC simulator (sim/vmc.py) on the MDB pty, the real firmware
(firmware/vend_mdb.py + mdb.py) under the MicroPython unix port, and the host MDB channel
(vending/mdb.py) on the frame-link pty with the real SQLite journal."""

from __future__ import annotations

import os
import threading
import time
import tty
from collections.abc import Callable

import pytest

from edge.board import BoardLink
from firmware import mdb
from sim.board import BoardProcess
from sim.vmc import PtyWire, Vmc
from vending import transaction as tx
from vending.controller import VendController
from vending.journal import VendJournal
from vending.mdb import MdbChannel
from vending.period import PeriodSpec

pytestmark = pytest.mark.e2e

TECH = "12345678901234"


@pytest.fixture
def rig(tmp_path):
    yield from _rig(tmp_path, "standard")


@pytest.fixture
def fast_rig(tmp_path):
    yield from _rig(tmp_path, "fast")


def _rig(tmp_path, profile: str):
    vm, vs = os.openpty()
    tty.setraw(vm)
    tty.setraw(vs)
    board = BoardProcess(tmp_path, uarts={"1": os.ttyname(vs)}, mdb_uart=1, mdb_session_ms=3000,
                         wdt_ms=3000)
    parts: dict[str, object] = {}
    try:
        board.start()
        link = BoardLink(board.port, ack_timeout=0.2, retries=3)
        parts["link"] = link
        assert link.wait_boot(5) is not None, board.log()
        journal = VendJournal(str(tmp_path / "vend.db"))
        parts["journal"] = journal
        ctl = VendController(journal, link, scope="machine:VM02", limit=1,
                             period=PeriodSpec("day", cut_hour=5))
        ch = MdbChannel(ctl, link, price_ceiling=150)
        vmc = Vmc(PtyWire(vm), profile=profile, reply_timeout=0.2)
        vmc.setup()
        yield board, vmc, ch, ctl
    finally:
        if "link" in parts:
            parts["link"].close()  # type: ignore[attr-defined]
        if "journal" in parts:
            parts["journal"].close()  # type: ignore[attr-defined]
        board.close()
        for fd in (vm, vs):
            os.close(fd)
    for i in range(len(board.logs)):
        assert "Traceback" not in board.log(i), board.log(i)
        assert "WDT RESET" not in board.log(i), board.log(i)


def _run(vmc: Vmc, vmc_script: Callable[[Vmc], object], ch: MdbChannel, ctl: VendController,
         wait: float = 8.0) -> tuple:
    """The VMC in a thread (a machine runs on its own), the host serving one tap."""
    result: dict[str, object] = {}

    def machine() -> None:
        try:
            vmc.poll_until((mdb.P_BEGIN_SESSION,), polls=400)
            result["vmc"] = vmc_script(vmc)
        except Exception as e:  # reported by the assertion below
            result["error"] = repr(e)

    th = threading.Thread(target=machine, daemon=True)
    res = ctl.reserve(TECH)
    th.start()
    out = ch.serve(res, wait)
    th.join(10)
    assert "error" not in result, result
    return res, out, result.get("vmc")


def test_cfg_from_the_board_is_yen(rig):
    board, vmc, ch, ctl = rig
    cfg = vmc.send([0x11, 0x00, 0x01, 0x00, 0x00, 0x00])
    assert cfg.data == bytes((0x01, 1, 0x13, 0x92, 1, 0, 5, 0))


@pytest.mark.parametrize("dispense, final, result", [(True, tx.COMMITTED, "dispensed"),
                                                     (False, tx.RELEASED, "not_dispensed")])
def test_dispense_and_failure(rig, dispense, final, result):
    board, vmc, ch, ctl = rig
    res, out, got = _run(vmc, lambda v: v.select(7, 120, dispense=dispense), ch, ctl)
    assert got == ("dispensed" if dispense else "failed")
    assert ctl.journal.get(res.vend_id).state == final
    assert out.outcome.result == result and (out.item, out.price) == (7, 120)
    assert out.touch_facts()["item"] == 7
    assert len(ctl.billable()) == (1 if dispense else 0)
    assert ctl.remaining(TECH) == (0 if dispense else 1)


def _cancel_after_request(v: Vmc) -> object:
    """The VMC cancels right after its VEND REQUEST, before any approval."""
    v.vend_request(3, 100)
    r = v.vend_cancel()
    v.session_complete()
    return r.code


def test_cancel_before_approval_releases(rig):
    board, vmc, ch, ctl = rig
    res, out, got = _run(vmc, _cancel_after_request, ch, ctl)
    assert got == mdb.P_VEND_DENIED
    assert ctl.journal.get(res.vend_id).state == tx.RELEASED and ctl.remaining(TECH) == 1


def test_vmc_reset_mid_vend_is_indeterminate(rig):
    board, vmc, ch, ctl = rig

    def reset(v: Vmc) -> object:
        v.vend_request(3, 100)
        v.poll_until((mdb.P_VEND_APPROVED,))
        return v.reset().ack

    res, out, got = _run(vmc, reset, ch, ctl)
    assert got is True
    assert ctl.journal.get(res.vend_id).state == tx.INDETERMINATE
    assert ctl.remaining(TECH) == 0 and ctl.billable() == []


def test_session_timeout_releases(rig):
    board, vmc, ch, ctl = rig

    def idle(v: Vmc) -> object:
        r = v.poll_until((mdb.P_SESSION_CANCEL,), polls=2000)
        v.session_complete()
        return r.code

    res, out, got = _run(vmc, idle, ch, ctl)
    assert got == mdb.P_SESSION_CANCEL
    assert ctl.journal.get(res.vend_id).state == tx.RELEASED


def test_board_killed_mid_vend_is_indeterminate_after_its_boot(rig):
    board, vmc, ch, ctl = rig

    def kill(v: Vmc) -> object:
        v.vend_request(3, 100)
        v.poll_until((mdb.P_VEND_APPROVED,))
        board.kill()
        board.start()
        return True

    res, out, got = _run(vmc, kill, ch, ctl, wait=6.0)
    assert ctl.journal.get(res.vend_id).state == tx.INDETERMINATE
    assert ctl.billable() == []


@pytest.mark.parametrize("dispense", [True, False])
def test_fast_machine_dispense_and_failure(fast_rig, dispense):
    """The fast profile: setup, then VEND REQUEST straight after BEGIN SESSION and POLLs back
    to back while the host journals START and approves; one commit or one release."""
    board, vmc, ch, ctl = fast_rig
    res, out, got = _run(vmc, lambda v: v.select(4, 110, dispense=dispense), ch, ctl)
    assert got == ("dispensed" if dispense else "failed")
    final = tx.COMMITTED if dispense else tx.RELEASED
    assert ctl.journal.get(res.vend_id).state == final and (out.item, out.price) == (4, 110)
    assert len(ctl.billable()) == (1 if dispense else 0) and ctl.anomalies == []
    assert vmc.wire.dec.skipped == 0  # type: ignore[union-attr]  (no word lost or split badly)


def test_fast_machine_cancel_disable_and_reset(fast_rig):
    """Back-to-back: a cancel right after the request; a disable in an idle session; a reset
    right after the approval. Each settles as on a standard machine."""
    board, vmc, ch, ctl = fast_rig
    res, out, got = _run(vmc, _cancel_after_request, ch, ctl)
    assert got == mdb.P_VEND_DENIED and ctl.journal.get(res.vend_id).state == tx.RELEASED

    def disable(v: Vmc) -> object:
        v.reader_disable()
        v.poll_until((mdb.P_SESSION_CANCEL,))
        r = v.session_complete()
        v.send([0x14, 0x01])  # enabled again for the next tap
        return r.code

    res, out, got = _run(vmc, disable, ch, ctl)
    assert got == mdb.P_END_SESSION and ctl.journal.get(res.vend_id).state == tx.RELEASED

    def reset(v: Vmc) -> object:
        v.vend_request(3, 100)
        v.poll_until((mdb.P_VEND_APPROVED,))
        return v.reset().ack

    res, out, got = _run(vmc, reset, ch, ctl)
    assert got is True and ctl.journal.get(res.vend_id).state == tx.INDETERMINATE
    assert ctl.billable() == []


@pytest.mark.parametrize("profile", ["setup_twice", "fast"])
def test_ccus_vmc_simulate_board_runs_every_scenario(profile):
    import subprocess
    import sys
    from pathlib import Path

    ccus = Path(sys.executable).parent / "ccus"
    p = subprocess.run([str(ccus), "vmc", "simulate", "--board", "--profile", profile],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for line in ("dispense: dispensed", "failure: failed", "cancel: denied",
                 "out of sequence: True", "disable in session: True", "host: disabled session",
                 "reset mid-vend: True", "reset_mid_vend session"):
        assert line in p.stdout, p.stdout


def _wait_journal_done(path, vend_id: int, timeout: float = 15.0) -> None:
    """Until the board's flash record (firmware/journal.py layout) is vend_id, done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = path.read_bytes() if path.exists() else b""
        if len(data) == 16 and int.from_bytes(data[5:9], "big") == vend_id and data[10] == 2:
            return
        time.sleep(0.02)
    raise AssertionError(f"board journal never recorded vend {vend_id} as done")


def test_board_killed_with_a_session_open_releases_it(rig):
    """The board resets after BEGIN SESSION, before any VEND REQUEST: its reader forgot the
    session; nothing was approved, so the reservation is given back (never indeterminate)."""
    board, vmc, ch, ctl = rig
    res = ctl.reserve(TECH)
    ch.open(res)
    vmc.poll_until((mdb.P_BEGIN_SESSION,))
    board.kill()
    board.start()
    vmc.setup()  # the VMC finds a reader that just reset
    ch.poll(0.5)
    assert ctl.journal.get(res.vend_id).state == tx.RESERVED  # a BOOT never releases by itself
    ch.revoke(res.vend_id)  # serve()'s wait is over: the reader refuses, the row is released
    for _ in range(50):
        ch.poll(0.05)
        if ctl.journal.get(res.vend_id).state != tx.RESERVED:
            break
    assert ctl.journal.get(res.vend_id).state == tx.RELEASED and ctl.remaining(TECH) == 1


@pytest.mark.parametrize("vmc_does, final", [("success", tx.COMMITTED),
                                             ("failure", tx.RELEASED),
                                             ("nothing", tx.INDETERMINATE)])
def test_agent_and_board_killed_mid_vend_settle_at_the_next_boot(rig, tmp_path, vmc_does, final):
    """The agent dies after VEND APPROVED; the VMC reports (or not) to the board alone; then the
    board is killed too. At the next start the host asks the board's journal (BOOT notice and
    query): a result the board saw settles the vend once; with no result the board reset mid-
    vend, which nobody can settle: indeterminate, never billed, the allowance held."""
    board, vmc, ch, ctl = rig
    res = ctl.reserve(TECH)
    ch.open(res)
    vmc.poll_until((mdb.P_BEGIN_SESSION,))
    vmc.vend_request(3, 100)
    for _ in range(100):
        ch.poll(0.02)
        if ctl.journal.get(res.vend_id).state == tx.VENDING:
            break
    vmc.poll_until((mdb.P_VEND_APPROVED,))
    # the agent is dead from here on: nobody reads the frame link
    if vmc_does == "success":
        assert vmc.vend_success(3).ack
        vmc.session_complete()
    elif vmc_does == "failure":
        assert vmc.vend_failure().ack
        vmc.session_complete()
    if vmc_does != "nothing":  # the board journals the result (then tells the dead host)
        _wait_journal_done(tmp_path / "board-flash" / "vend.jnl", res.vend_id)
    board.kill()
    board.start()
    ch.board.close()
    link = BoardLink(board.port, ack_timeout=0.2, retries=3)
    journal = VendJournal(str(tmp_path / "vend.db"))
    try:
        ctl2 = VendController(journal, link, scope="machine:VM02", limit=1,
                              period=PeriodSpec("day", cut_hour=5))
        ch2 = MdbChannel(ctl2, link, price_ceiling=150)
        assert link.wait_boot(5) is not None
        ctl2.recover()  # vending -> indeterminate, then the board's journal is asked
        ch2.start()
        ch2.poll(0.2)
        rec = ctl2.journal.get(res.vend_id)
        assert rec.state == final, (rec, ctl2.anomalies)
        assert len(ctl2.billable()) == (1 if final == tx.COMMITTED else 0)
        assert ctl2.remaining(TECH) == (1 if final == tx.RELEASED else 0)
    finally:
        link.close()
        journal.close()
