"""The demo's path end to end: real Mosquitto, the sink as a process on SQLite, nfcpy's udp
reader reading emulated FeliCa cards, the production agents, and three controller boards (the
real firmware under MicroPython on ptys; one of them the MDB reader of a machine whose VMC is
sim/vmc.py). Asserts the exact rows."""

from pathlib import Path

import pytest

from cloud_sink.store import SqliteStore
from cloud_sink.workday import local_time
from demo.site_day import (
    CONTRACTOR,
    DEVICE,
    MDB_DEVICE,
    MDB_ITEM,
    MDB_PRICE,
    SITE,
    VEND_DEVICE,
    DemoRun,
    site_day,
)
from protocol.reasons import Reason
from protocol.touch import Decision
from sim.board import GATE, GATE_OUT
from vending.role import VendingRole

# (technician, entry, exit) for 2026-11-26, Asia/Tokyo; technician 12 forgot to tap out;
# technician 7's 07:44 tap opened the gate but they did not pass: the entry is 07:45.
EXPECTED = [
    ("10000000000001", "07:32", "17:08"),
    ("10000000000002", "07:34", "17:11"),
    ("10000000000003", "07:36", "17:14"),
    ("10000000000004", "07:38", "17:17"),
    ("10000000000005", "07:40", "17:20"),
    ("10000000000006", "07:42", "17:23"),
    ("10000000000007", "07:45", "17:26"),
    ("10000000000008", "07:46", "17:29"),
    ("10000000000009", "07:48", "17:32"),
    ("10000000000010", "07:50", "17:35"),
    ("10000000000011", "07:52", "17:38"),
    ("10000000000012", "07:54", None),
]


@pytest.mark.e2e
def test_site_day_end_to_end(tmp_path: Path) -> None:
    day = site_day()
    run = DemoRun(tmp_path / "demo")
    try:
        run.start(day)
        results = [run.tap(t) for t in day.taps]
        counts = run.wait_delivered()
        totals = run.counts()
        vend = run.agents[VEND_DEVICE].plugin
        assert isinstance(vend, VendingRole)
        drinks = [d.technician for d in vend.billable()]
        mdb_vend = run.agents[MDB_DEVICE].plugin
        assert isinstance(mdb_vend, VendingRole)
        mdb_drinks = [d.technician for d in mdb_vend.billable()]
    finally:
        run.stop()
    assert run.vmc is not None and run.vmc.error is None, run.vmc.error
    assert not run.vmc.is_alive()

    # every process the demo started is gone
    board = run.board.proc if run.board else None
    gate_board = run.gate_board.proc if run.gate_board else None
    mdb_board = run.mdb_board.proc if run.mdb_board else None
    for proc in (run.sink, run.emulator, run.broker.proc if run.broker else None, board,
                 gate_board, mdb_board):
        assert proc is not None and proc.poll() is not None

    # 25 gate taps (24 allowed: each followed by its passage record), 6 at the vending machine,
    # 3 at the MDB machine
    assert len(day.taps) == 35
    assert totals == {"taps": 34, "suppressed": 1, "allowed": 31, "denied": 3, "followups": 24}
    assert counts == {"touches": 58, "allowed": 55, "denied": 3, "dead_letters": 0}

    made = [t for t in results if t is not None]
    for device, n in ((DEVICE, 49), (VEND_DEVICE, 6), (MDB_DEVICE, 3)):  # seq per device starts at 1, no gaps
        assert sorted(t.seq for t in run.touches if t.device == device) == list(range(1, n + 1))
    assert {t.list_version for t in made} == {1}  # decided with the signed list the operator sent
    # the gate: every allowed tap opened it (the relay of its direction) and has its passage
    gate_taps = [t for t in made if t.device == DEVICE and t.decision is Decision.ALLOW]
    assert [t.facts["passage"] for t in gate_taps] == ["pending"] * 24
    outcomes = {t.tid: [] for t in gate_taps}  # type: dict[str | None, list[str]]
    for t in gate_taps:
        p = run.passages[t.seq]
        assert (p.tid, p.facts["dir"], p.facts["tap"], p.seq) == (t.tid, t.facts["dir"], t.seq,
                                                                  t.seq + 1)
        outcomes[t.tid].append(str(p.facts["passage"]))
    assert outcomes["10000000000007"] == ["not_passed", "passed", "passed"]
    assert all(o == ["passed"] * len(o) for tid, o in outcomes.items() if tid != "10000000000007")
    assert run.gate_board is not None
    relays = [(p, lvl) for p, lvl, _ in run.gate_board.pins() if p in (GATE, GATE_OUT) and lvl]
    assert relays.count((GATE, 1)) == 13 and relays.count((GATE_OUT, 1)) == 11
    repeat = day.taps.index(next(t for t in day.taps if t.note.startswith("repeat")))
    assert results[repeat] is None
    denied = [t for t in made if t.decision is Decision.DENY]
    assert [(t.device, t.reason, t.tid) for t in denied] == [
        (DEVICE, Reason.UNKNOWN_CARD, None), (VEND_DEVICE, Reason.LIMIT_REACHED, "10000000000002"),
        (MDB_DEVICE, Reason.LIMIT_REACHED, "10000000000006")]

    # the vending machine: five free drinks, the second one refused, the contractor billed
    vends = [t for t in made if t.device == VEND_DEVICE and t.decision is Decision.ALLOW]
    assert [(t.tid, t.facts["result"], t.facts["slot"]) for t in vends] == [
        (f"1000000000000{i}", "dispensed", 1) for i in range(1, 6)]
    assert drinks == [f"1000000000000{i}" for i in range(1, 6)]
    assert board is not None and run.board is not None
    vend_pulses = [p for p in run.board.pins() if p[0] == 2 and p[1] == 1]  # slot 1 line high
    assert len(vend_pulses) == 5

    # the MDB machine: two drinks chosen at the VMC, the refused one never got a session
    mdb_vends = [t for t in made if t.device == MDB_DEVICE and t.decision is Decision.ALLOW]
    assert [(t.tid, t.facts["result"], t.facts["item"], t.facts["price"]) for t in mdb_vends] == [
        (tid, "dispensed", MDB_ITEM, MDB_PRICE) for tid in ("10000000000006", "10000000000007")]
    assert mdb_drinks == ["10000000000006", "10000000000007"]
    assert run.vmc.vends == [(MDB_ITEM, MDB_PRICE, "dispensed")] * 2

    store = SqliteStore(run.store_path)
    rows = store.work_history()
    ledger = [(r.device, r.contractor, r.month, r.dispensed, r.failed, r.indeterminate)
              for r in store.vending_ledger()]
    store.close()
    assert ledger == [(VEND_DEVICE, CONTRACTOR, "2026-11", 5, 0, 0),
                      (MDB_DEVICE, CONTRACTOR, "2026-11", 2, 0, 0)]
    got = [(r.tid, local_time(r.first_in_ms) if r.first_in_ms else None,
            local_time(r.last_out_ms) if r.last_out_ms else None) for r in rows]
    assert got == EXPECTED
    assert {(r.site, r.work_day) for r in rows} == {(SITE, "2026-11-26")}
    assert [r.taps for r in rows] == [2] * 11 + [1]
    assert [r.exit_missing for r in rows] == [False] * 11 + [True]
