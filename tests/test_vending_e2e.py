"""End to end over a real pty: vending/ (host, pyserial) <-> firmware under the MicroPython unix port."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from edge.board import BoardLink, BoardSilent
from firmware import frame
from sim.board import DOOR, DROP, GATE, VEND_PIN, BoardProcess
from vending import (
    DISPENSED,
    INDETERMINATE,
    NOT_DISPENSED,
    LimitReached,
    PeriodSpec,
    VendController,
    VendJournal,
)
from vending import transaction as tx

pytestmark = pytest.mark.e2e

TECH = "12345678901234"
TECH2 = "12345678901235"
DROP_LINK = {"out": VEND_PIN[2], "in": DROP, "delay_ms": 120, "hold_ms": 150, "level": 0}


@pytest.fixture
def rig(tmp_path):
    """A board process on a pty, a BoardLink on the host end, a journal and a controller."""
    board = BoardProcess(tmp_path, links=[DROP_LINK], wdt_ms=3000)
    parts: dict[str, object] = {}
    try:
        board.start()
        link = BoardLink(board.port, ack_timeout=0.2, retries=3)
        journal = VendJournal(str(tmp_path / "vend.db"))
        ctl = VendController(
            journal,
            link,
            scope="machine:VM01",
            limit=1,
            period=PeriodSpec("day", cut_hour=5),
            pulse_ms=150,
            drop_timeout_ms=800,
        )
        parts.update(board=board, link=link, journal=journal, ctl=ctl)
        boot = link.wait_boot(5)
        assert boot is not None, "no BOOT notice from the board:\n" + board.log()
        yield board, link, ctl
    finally:
        if "link" in parts:
            parts["link"].close()  # type: ignore[attr-defined]
        if "journal" in parts:
            parts["journal"].close()  # type: ignore[attr-defined]
        board.close()
        assert board.proc is None or board.proc.poll() is not None, "board process left behind"
    for i in range(len(board.logs)):
        text = board.log(i)
        assert "Traceback" not in text, text
        assert "WDT RESET" not in text, "the watchdog starved:\n" + text


def test_tap_vend_drop_commit_then_limit_reached(rig):
    board, link, ctl = rig
    assert link.boots[0].last_state == frame.J_NONE
    t0 = time.monotonic()
    r = ctl.reserve(TECH)
    out = ctl.vend(r, slot=2)
    took = time.monotonic() - t0
    assert out.result == DISPENSED and out.state == tx.COMMITTED, out
    assert out.board_result == frame.R_DISPENSED
    assert took < 2.0
    # the vend line really pulsed, for about pulse_ms, on slot 2's pin only
    vp = [(lvl, t) for pin, lvl, t in board.pins() if pin == VEND_PIN[2]]
    assert [lvl for lvl, _ in vp] == [0, 1, 0]
    assert 100 <= vp[2][1] - vp[1][1] <= 400
    assert all(pin not in (VEND_PIN[1], VEND_PIN[3]) for pin, lvl, _ in board.pins() if lvl == 1)
    # the allowance is used: a second tap the same day is refused
    with pytest.raises(LimitReached, match="used 1 of 1"):
        ctl.reserve(TECH)
    assert [b.vend_id for b in ctl.billable()] == [r.vend_id]
    assert out.touch_facts()["result"] == "dispensed"
    # a repeated request for the same vend never vends twice: the board reports the journal
    again = link.vend(r.vend_id, 2, 150, 800)
    assert again.result == frame.R_DISPENSED
    assert [lvl for pin, lvl, _ in board.pins() if pin == VEND_PIN[2]] == [0, 1, 0]
    st = link.status()
    assert st.last_vend_id == r.vend_id and not st.busy


def test_no_drop_confirmation_releases_the_allowance(rig):
    board, link, ctl = rig
    r = ctl.reserve(TECH)
    out = ctl.vend(r, slot=1)  # no drop link on slot 1: the sensor never fires
    assert out.result == NOT_DISPENSED and out.state == tx.RELEASED, out
    assert out.board_result == frame.R_NO_DROP
    assert ctl.remaining(TECH) == 1
    assert ctl.billable() == []
    r2 = ctl.reserve(TECH)
    assert ctl.vend(r2, slot=2).result == DISPENSED


def test_board_reboot_mid_vend_is_reported_and_marked_indeterminate(rig):
    board, link, ctl = rig
    board.kill()
    board.start(links=[dict(DROP_LINK, delay_ms=60000)])  # the can would fall far too late
    assert link.wait_boot(5) is not None
    ctl.drop_timeout_ms = 20000
    r = ctl.reserve(TECH)
    result = {}

    def drive():
        result["out"] = ctl.vend(r, slot=2, timeout=15)

    th = threading.Thread(target=drive, daemon=True)
    th.start()
    board.wait_log(rf"^PIN {VEND_PIN[2]} 1 ", 5)  # the vend line is driven: now pull the plug
    board.kill()
    time.sleep(0.1)
    board.start(links=[])
    th.join(10)
    assert not th.is_alive(), "host never concluded the interrupted vend"
    out = result["out"]
    assert out.result == INDETERMINATE and out.state == tx.INDETERMINATE, out
    boot = link.boots[-1]
    assert boot.interrupted_vend == r.vend_id and boot.last_slot == 2
    assert out.board_result == frame.R_INTERRUPTED
    assert (tx.INTERRUPTED, tx.VENDING, tx.INDETERMINATE) in ctl.journal.events(r.vend_id)
    assert ctl.remaining(TECH) == 0, "an indeterminate vend keeps its allowance held"
    assert [u.vend_id for u in ctl.unresolved()] == [r.vend_id]
    assert ctl.billable() == []
    # asking the board again does not guess: its journal says interrupted
    assert ctl.reconcile() == []
    assert link.query_vend(r.vend_id).result == frame.R_INTERRUPTED
    # a further reboot reports it as done-interrupted, not in progress again
    board.kill()
    board.start()
    b2 = link.wait_boot(5)
    assert b2 is not None and b2.interrupted_vend is None
    assert (b2.last_vend_id, b2.last_state, b2.last_result) == (
        r.vend_id,
        frame.J_DONE,
        frame.R_INTERRUPTED,
    )
    # an operator settles it
    assert ctl.resolve(r.vend_id, dispensed=True).result == DISPENSED
    assert [b.vend_id for b in ctl.billable()] == [r.vend_id]


def test_host_timeout_is_indeterminate_until_the_late_result_settles_it(rig):
    board, link, ctl = rig
    board.kill()
    board.start(links=[dict(DROP_LINK, delay_ms=1200)])
    assert link.wait_boot(5) is not None
    ctl.drop_timeout_ms = 3000
    r = ctl.reserve(TECH)
    out = ctl.vend(r, slot=2, timeout=0.4)  # the host stops waiting before the can falls
    assert out.result == INDETERMINATE and "no result within 0.4 s" in (out.reason or "")
    settled = []
    deadline = time.monotonic() + 5
    while not settled and time.monotonic() < deadline:
        settled = ctl.poll(0.05)
    assert [(o.vend_id, o.result) for o in settled] == [(r.vend_id, DISPENSED)], (
        settled,
        board.log(),
    )
    assert [b.vend_id for b in ctl.billable()] == [r.vend_id]


def test_garbage_on_the_line_is_skipped_and_vends_still_work(rig):
    board, link, ctl = rig
    rng = random.Random(6)
    stop = threading.Event()

    def noise():
        while not stop.is_set():
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
            board.inject_to_host(blob)
            board.inject_to_board(blob)
            time.sleep(0.01)

    board.inject_to_board(bytes(range(1, 256)) * 4)  # a long run with no delimiter
    th = threading.Thread(target=noise, daemon=True)
    th.start()
    try:
        r = ctl.reserve(TECH)
        out = ctl.vend(r, slot=2)
        r2 = ctl.reserve(TECH2)
        out2 = ctl.vend(r2, slot=2)
    finally:
        stop.set()
        th.join(5)
    assert (out.result, out2.result) == (DISPENSED, DISPENSED)
    assert link.decoder.skipped > 0
    st = link.status()
    assert st.skipped > 1000
    assert st.crc_errors + link.decoder.crc_errors + link.decoder.bad_frames > 0


def test_board_silent_host_gives_up_then_reconciles(rig):
    board, link, ctl = rig
    board.kill()
    r = ctl.reserve(TECH)
    t0 = time.monotonic()
    out = ctl.vend(r, slot=2)
    took = time.monotonic() - t0
    assert out.result == INDETERMINATE and out.state == tx.INDETERMINATE, out
    assert "board silent" in (out.reason or "") and "4 tries" in (out.reason or "")
    assert 0.6 <= took <= 3.0
    with pytest.raises(BoardSilent, match="STATUS_REQ not acknowledged"):
        link.status()
    # the board comes back (what was sent into the dead UART is lost); its journal proves
    # it never started this vend, so the allowance is released, not guessed
    assert board.drain() > 0
    board.start()
    assert link.wait_boot(5) is not None
    settled = ctl.reconcile()
    assert [(o.vend_id, o.result, o.board_result) for o in settled] == [
        (r.vend_id, NOT_DISPENSED, frame.R_NOT_STARTED)
    ]
    assert ctl.remaining(TECH) == 1
    assert VEND_PIN[2] not in [p for p, lvl, _ in board.pins() if lvl == 1]


def test_gate_pulse_door_sensor_and_feedback(rig):
    board, link, ctl = rig
    board.kill()
    board.start(links=[{"out": GATE, "in": DOOR, "delay_ms": 50, "hold_ms": 300, "level": 0}])
    assert link.wait_boot(5) is not None
    link.gate_pulse(pulse_ms=200)
    link.feedback(led=1, buzzer=1, duration_ms=100)
    deadline = time.monotonic() + 3
    while len(link.sensor_events) < 2 and time.monotonic() < deadline:
        link.pump(0.02)
    assert [(s, v) for s, v, _ in link.sensor_events] == [(frame.S_DOOR, 1), (frame.S_DOOR, 0)]
    gate = [lvl for p, lvl, _ in board.pins() if p == GATE]
    assert gate == [0, 1, 0]
    assert [lvl for p, lvl, _ in board.pins() if p == 9] == [0, 1, 0]  # green LED


def test_watchdog_reset_is_reported_on_boot(rig):
    board, link, ctl = rig
    board.kill()
    board.start(reset_cause=3)  # machine.WDT_RESET
    boot = link.wait_boot(5)
    assert boot is not None and boot.reset_cause == 3
    deadline = time.monotonic() + 2
    while not link.errors and time.monotonic() < deadline:
        link.pump(0.02)
    assert link.errors and link.errors[0][0] == frame.E_WATCHDOG_RESET


def test_host_restart_mid_vend_recovers_from_its_journal(rig, tmp_path):
    board, link, ctl = rig
    r = ctl.reserve(TECH)
    ctl.journal.apply(r.vend_id, tx.START, 1)  # journaled, then the host lost power
    ctl.journal.close()
    j2 = VendJournal(str(tmp_path / "vend.db"))
    ctl2 = VendController(j2, link, scope="machine:VM01", limit=1)
    changed = ctl2.recover()
    # host power loss -> indeterminate; the board, asked, proves it never started it
    assert [(o.vend_id, o.result) for o in changed] == [
        (r.vend_id, INDETERMINATE),
        (r.vend_id, NOT_DISPENSED),
    ]
    j2.close()
    ctl.journal = VendJournal(str(tmp_path / "vend.db"))  # for the fixture's close


def test_no_process_left_behind(tmp_path):
    b = BoardProcess(tmp_path)
    b.start()
    pid = b.proc.pid
    b.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
