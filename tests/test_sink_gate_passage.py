"""The sink and the gate's passage records (edge/roles/gate.py): the tap's own touch while its
passage is pending, and an opened gate nobody went through, are no entry in the work history;
the outcome record that says `passed` (or could not confirm either way) is."""

from pathlib import Path

from sink_support import fresh_store, touch

from cloud_sink.derive.rows import gate_dir
from cloud_sink.workday import jst_ms

NOW = jst_ms(2026, 11, 26, 20)


def at(h: int, m: int) -> int:
    return jst_ms(2026, 11, 26, h, m)


def test_only_passages_count(tmp_path: Path) -> None:
    touches = [
        # technician 1: taps in at 07:30, turns back (not_passed), taps again 07:40 and passes
        touch(1, ts=at(7, 30), who=1, facts={"passage": "pending"}),
        touch(2, ts=at(7, 30), who=1, facts={"passage": "not_passed", "tap": 1}),
        touch(3, ts=at(7, 40), who=1, facts={"passage": "pending"}),
        touch(4, ts=at(7, 41), who=1, facts={"passage": "passed", "tap": 3}),
        touch(5, ts=at(17, 0), who=1, dir="out", facts={"passage": "pending"}),
        touch(6, ts=at(17, 0), who=1, dir="out", facts={"passage": "passed", "tap": 5}),
        # technician 2: the board was offline (not_actuated, no passage fact) and then the
        # board went silent during a pulse (unconfirmed): both count
        touch(7, ts=at(8, 0), who=2),
        touch(8, ts=at(18, 0), who=2, dir="out", facts={"passage": "pending"}),
        touch(9, ts=at(18, 0), who=2, dir="out", facts={"passage": "unconfirmed", "tap": 8}),
        # technician 3: allowed, never went through: no work day at all
        touch(10, ts=at(9, 0), who=3, facts={"passage": "pending"}),
        touch(11, ts=at(9, 0), who=3, facts={"passage": "not_passed", "tap": 10}),
    ]
    with fresh_store("sqlite", tmp_path, None) as s:
        s.ingest(touches, now_ms=NOW)
        rows = [(r.tid, r.first_in_ms, r.last_out_ms, r.taps) for r in s.work_history()]
        s.rederive()
        again = [(r.tid, r.first_in_ms, r.last_out_ms, r.taps) for r in s.work_history()]
    assert rows == again == [
        ("10000000000001", at(7, 41), at(17, 0), 2),
        ("10000000000002", at(8, 0), at(18, 0), 2),
    ]
    assert {r[0] for r in rows} == {"10000000000001", "10000000000002"}


def test_gate_dir() -> None:
    assert gate_dir({"dir": "in"}) == "in"
    assert gate_dir({"dir": "out", "passage": "passed"}) == "out"
    assert gate_dir({"dir": "out", "passage": "unconfirmed"}) == "out"
    assert gate_dir({"dir": "in", "passage": "pending"}) is None
    assert gate_dir({"dir": "in", "passage": "not_passed"}) is None
