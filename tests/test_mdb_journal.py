"""The board's MDB channel (firmware/vend_mdb.py MdbPort) and its flash journal
(firmware/journal.py), under CPython with the firmware's own modules: the vend is journaled
before VEND APPROVED can leave the board, the VMC's result before the host hears of it, and a
journal that cannot be written means no approval."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIRMWARE = Path(__file__).resolve().parents[1] / "firmware"
sys.path.insert(0, str(FIRMWARE))  # the firmware imports its modules by their own names

import frame  # noqa: E402
import journal  # noqa: E402
import mdb  # noqa: E402
import vend_mdb  # noqa: E402


class Words:
    """A word port: the test puts the VMC's words in, takes the reader's replies out."""

    def __init__(self) -> None:
        self.inbox: list[int] = []
        self.out: list[int] = []

    def any(self) -> int:
        return len(self.inbox)

    def read_words(self, now: int) -> list[int]:
        w, self.inbox = self.inbox, []
        return w

    def write_words(self, words: list[int], now: int) -> None:
        self.out.extend(words)


class Rig:
    def __init__(self, path: Path, jr: journal.Journal) -> None:
        self.words = Words()
        self.sent: list[tuple[int, bytes, int, int]] = []  # (type, payload, j.state, j.result)
        self.j = jr
        self.port = vend_mdb.MdbPort({}, self._send, jr, port=self.words)
        for cmd in ([0x10], [0x12], [0x11, 0, 1, 0, 0, 0], [0x14, 1]):  # JUST RESET polled
            self.vmc(cmd)

    def _send(self, mtype: int, payload: bytes) -> None:
        self.sent.append((mtype, payload, self.j.state, self.j.result))

    def vmc(self, cmd: list[int]) -> list[int]:
        self.words.inbox.extend(mdb.command_words(cmd))
        self.port.step(0)
        out, self.words.out = self.words.out, []
        if len(out) > 1:
            self.words.inbox.append(mdb.ACK)
            self.port.step(0)
        return out

    def host(self, op: int, session: int, funds: int = 0) -> None:
        self.port.host(frame.mdb_host(op, session, funds), 0)

    def events(self) -> list[tuple[int, int, int]]:
        """(kind, journal state, journal result) of each MDB_EVENT when it was sent."""
        return [(frame.parse_mdb_event(p)[0], st, res) for t, p, st, res in self.sent
                if t == frame.MDB_EVENT]


def _session(rig: Rig, vid: int) -> None:
    rig.host(vend_mdb.OP_CREDIT, vid, 150)
    assert rig.vmc([0x12])[0] == mdb.P_BEGIN_SESSION
    rig.vmc([0x13, 0, 0, 120, 0, 9])  # VEND REQUEST 120 yen, item 9


@pytest.mark.parametrize("how, result", [("success", frame.R_DISPENSED),
                                         ("failure", frame.R_NO_DROP),
                                         ("cancel", frame.R_NO_DROP),
                                         ("reset", frame.R_INTERRUPTED)])
def test_vend_journaled_before_approval_and_result_before_the_host_hears(tmp_path, how, result):
    path = str(tmp_path / "journal.bin")
    rig = Rig(tmp_path, journal.Journal(path))
    _session(rig, 41)
    assert rig.j.state == frame.J_NONE
    rig.host(vend_mdb.OP_APPROVE, 41)
    assert (rig.j.vend_id, rig.j.state, rig.j.slot) == (41, frame.J_IN_PROGRESS, 9)
    assert rig.vmc([0x12])[0] == mdb.P_VEND_APPROVED  # only now can the VMC vend
    cmd = {"success": [0x13, 2, 0, 9], "failure": [0x13, 3], "cancel": [0x13, 1],
           "reset": [0x10]}[how]
    rig.vmc(cmd)
    assert (rig.j.state, rig.j.result) == (frame.J_DONE, result)
    kind = {"success": mdb.EV_VEND_SUCCESS, "failure": mdb.EV_VEND_FAILURE,
            "cancel": mdb.EV_VEND_FAILURE, "reset": mdb.EV_RESET_MID_VEND}[how]
    assert (kind, frame.J_DONE, result) in rig.events()  # journaled before it was sent
    again = journal.Journal(path)  # the power goes: what the next boot reads
    again.load()
    assert (again.vend_id, again.state, again.result) == (41, frame.J_DONE, result)


def test_power_loss_between_approval_and_result_reads_in_progress(tmp_path):
    path = str(tmp_path / "journal.bin")
    rig = Rig(tmp_path, journal.Journal(path))
    _session(rig, 7)
    rig.host(vend_mdb.OP_APPROVE, 7)
    rig.vmc([0x12])
    again = journal.Journal(path)
    again.load()
    assert (again.vend_id, again.state) == (7, frame.J_IN_PROGRESS)  # app.py: interrupted


class BrokenJournal(journal.Journal):
    def _write(self) -> None:
        raise journal.JournalError("flash full")


def test_a_journal_that_cannot_be_written_means_no_approval(tmp_path):
    rig = Rig(tmp_path, BrokenJournal(str(tmp_path / "journal.bin")))
    _session(rig, 3)
    rig.host(vend_mdb.OP_APPROVE, 3)
    assert rig.vmc([0x12])[0] == mdb.P_VEND_DENIED
    assert rig.port.reader.approvals == 0
    errors = [frame.parse_error(p) for t, p, *_ in rig.sent if t == frame.ERROR]
    assert (frame.E_JOURNAL, 3) in errors


def test_an_approval_the_reader_refuses_is_not_journaled(tmp_path):
    rig = Rig(tmp_path, journal.Journal(str(tmp_path / "journal.bin")))
    rig.host(vend_mdb.OP_CREDIT, 5, 150)
    rig.vmc([0x12])
    rig.host(vend_mdb.OP_APPROVE, 5)  # no VEND REQUEST pending
    assert rig.j.state == frame.J_NONE
    assert (mdb.EV_REFUSED, frame.J_NONE, frame.R_NONE) in rig.events()
