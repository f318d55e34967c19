"""The gate's pending-passage journal (edge/roles/gate_board.PendingJournal), a line parser:
any sequence of adds and removes, cut anywhere by a power failure, loads back as the model
says (what was complete before the cut), and a load compacts it."""

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.roles.gate_board import PendingJournal

ops = st.lists(st.tuples(st.booleans(), st.integers(1, 6), st.text(max_size=8)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(0, 10_000))
def test_load_is_what_was_written_up_to_a_cut(seq: list[tuple[bool, int, str]], cut: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gate-pending.log"
        j = PendingJournal(path)
        assert j.load() == {}
        model: dict[str, dict[str, object]] = {}
        added: list[tuple[str, dict[str, object]]] = []
        for add, n, text in seq:
            key = f"{n}:1700000000000:entry"
            if add:
                record = {"reader": "entry", "touch": text}
                j.add(key, record)
                model[key] = record
                added.append((key, record))
            else:
                j.remove(key)
                model.pop(key, None)
        j.close()
        data = path.read_bytes()
        # what survives the cut: the complete lines (a line cut just before its newline is
        # complete too)
        if cut >= len(data) or data[cut:cut + 1] == b"\n":
            whole = data[:cut]
        else:
            whole = data[:data.rfind(b"\n", 0, cut) + 1]
        state = PendingJournal(Path(tmp) / "replay.log")
        (Path(tmp) / "replay.log").write_bytes(whole)
        expect = state.load()
        state.close()
        path.write_bytes(data[:cut])           # the power failed here
        again = PendingJournal(path)
        got = again.load()
        again.close()
        assert got == expect
        if cut >= len(data):
            assert got == model
        # a torn line never invents a passage: each one loaded was added with that record
        assert all((k, v) in added for k, v in got.items())
        # compacted: one line per pending passage, loads the same
        assert len(path.read_text().splitlines()) == len(got)
        third = PendingJournal(path)
        assert third.load() == got
        third.close()
