"""MDB cashless reader (firmware/mdb.py) and the host MDB channel (vending/mdb.py), in process:
word encoding, command framing, the state table under arbitrary VMC and host inputs
(hypothesis), and the books through the real SQLite journal."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from firmware import frame, mdb
from sim.vmc import InProcess, Vmc
from vending import transaction as tx
from vending.controller import VendController
from vending.journal import VendJournal
from vending.mdb import OP_APPROVE, OP_CREDIT, OP_DENY, OP_REVOKE, MdbChannel
from vending.period import PeriodSpec

# ---------------------------------------------------------------- words


@given(st.lists(st.integers(0, 0x1FF), max_size=60))
def test_words_round_trip(words):
    assert mdb.WordDecoder().feed(mdb.encode_words(words)) == words


@given(st.lists(st.integers(0, 0x1FF), min_size=1, max_size=40), st.data())
def test_words_any_split(words, data):
    raw = mdb.encode_words(words)
    cut = data.draw(st.integers(0, len(raw)))
    d = mdb.WordDecoder()
    assert d.feed(raw[:cut]) + d.feed(raw[cut:]) == words


def test_word_decoder_resyncs_after_a_flag_it_cannot_take():
    d = mdb.WordDecoder()
    # a lost flag byte leaves data 0x12 where a flag should be: skipped, next pair decodes
    assert d.feed(bytes((0x12,)) + mdb.encode_words([0x112])) == [0x112]
    assert d.skipped == 1


def test_encode_rejects_a_word_out_of_range():
    with pytest.raises(mdb.MdbError):
        mdb.encode_words([0x200])


def test_checksum_and_command_words():
    assert mdb.command_words([0x13, 0x00, 0x00, 0x78, 0x00, 0x03]) == [0x113, 0, 0, 0x78, 0, 3, 0x8E]
    assert mdb.block((0x05, 0x00, 0x78)) == [5, 0, 0x78, 0x17D]


# ---------------------------------------------------------------- the reader, by example


def _ready(profile: str = "standard") -> tuple[mdb.Reader, Vmc, list[int]]:
    t = [0]
    r = mdb.Reader(country=0x1392)
    v = Vmc(InProcess(r, lambda: t[0]), profile=profile)
    cfg = v.setup(max_price=500)
    assert cfg.data == bytes((0x01, 1, 0x13, 0x92, 1, 0, 5, 0))  # yen: scale 1, 0 decimals
    assert r.state == mdb.ENABLED and r.max_price == 500
    return r, v, t


@pytest.mark.parametrize("profile", ["standard", "setup_twice"])
def test_setup_then_a_vend_is_approved_and_reported(profile):
    r, v, t = _ready(profile)
    assert r.credit(7, 150, 0)
    assert v.poll_until((mdb.P_BEGIN_SESSION,)).data == bytes((3, 0, 150))
    assert v.vend_request(item=12, price=120).ack
    assert r.take_events() == [(mdb.EV_VEND_REQUEST, 7, 12, 120)]
    assert v.poll().ack  # the host has not decided yet: the VMC keeps polling
    assert r.approve(7, 1)
    assert v.poll().data == bytes((5, 0, 120))
    assert v.vend_success(12).ack
    assert v.vend_success(12).ack  # a repeat (our ACK lost): ACKed, not reported twice
    assert v.session_complete().code == mdb.P_END_SESSION
    assert r.take_events() == [(mdb.EV_VEND_SUCCESS, 7, 12, 120), (mdb.EV_SESSION_END, 7, 12, 120)]
    assert r.state == mdb.ENABLED


def test_price_above_the_funds_is_denied_by_the_reader():
    r, v, _ = _ready()
    r.credit(1, 100, 0)
    v.poll_until((mdb.P_BEGIN_SESSION,))
    assert v.select(3, 130) == "denied"
    assert [e[0] for e in r.take_events()] == [mdb.EV_DENIED, mdb.EV_SESSION_END]


def test_revoked_reservation_denies_the_pending_request():
    r, v, _ = _ready()
    r.credit(1, 100, 0)
    v.poll_until((mdb.P_BEGIN_SESSION,))
    v.vend_request(3, 90)
    r.revoke(1, 5)
    assert v.poll().code == mdb.P_VEND_DENIED
    assert not r.approve(1, 6)  # too late: nothing pending
    assert r.approvals == 0


def test_out_of_sequence_and_reset_mid_vend():
    r, v, _ = _ready()
    assert v.vend_success(1).code == mdb.P_OUT_OF_SEQUENCE  # no session
    r.credit(4, 100, 0)
    v.poll_until((mdb.P_BEGIN_SESSION,))
    v.vend_request(2, 100)
    r.approve(4, 0)
    v.poll_until((mdb.P_VEND_APPROVED,))
    r.take_events()
    assert v.reset().ack
    assert r.take_events() == [(mdb.EV_RESET_MID_VEND, 4, 2, 100)]
    assert r.state == mdb.INACTIVE and v.poll().code == mdb.P_JUST_RESET


def test_session_timeout_asks_the_vmc_to_cancel():
    r, v, t = _ready()
    r.credit(9, 100, 0)
    v.poll_until((mdb.P_BEGIN_SESSION,))
    r.tick(r.session_timeout_ms)
    assert v.poll().code == mdb.P_SESSION_CANCEL
    assert v.session_complete().code == mdb.P_END_SESSION
    assert [e[0] for e in r.take_events()] == [mdb.EV_TIMEOUT, mdb.EV_SESSION_END]


def test_ret_resends_the_same_reply_and_bad_checksum_is_naked():
    r, v, _ = _ready()
    r.credit(2, 100, 0)
    first = r.word(mdb.MODE | 0x12, 0) + r.word(0x12, 0)  # POLL: BEGIN SESSION
    assert first[0] == mdb.P_BEGIN_SESSION
    assert r.word(mdb.RET, 0) == first
    assert r.word(mdb.ACK, 0) == []
    assert r.word(mdb.MODE | 0x12, 0) + r.word(0x13, 0) == [mdb.NAK]  # checksum wrong
    assert r.bad_checksums == 1


def test_unacked_poll_reply_is_sent_again_at_the_next_poll():
    r, v, _ = _ready()
    r.credit(2, 100, 0)
    first = r.word(mdb.MODE | 0x12, 0) + r.word(0x12, 0)
    again = r.word(mdb.MODE | 0x12, 0) + r.word(0x12, 0)  # the VMC never ACKed: it is repeated
    assert again == first


def test_reader_disable_in_an_idle_session_ends_it_and_leaves_the_reader_disabled():
    """MDB 4.2 7.4.12: READER DISABLE is a no-data command (ACK); the reader takes no more
    payment: an idle session gets SESSION CANCEL REQUEST, a VEND REQUEST in it is denied, and
    SESSION COMPLETE ends it in DISABLED (7.2.4: "enable/disable itself appropriately")."""
    r, v, _ = _ready()
    r.credit(3, 150, 0)
    v.poll_until((mdb.P_BEGIN_SESSION,))
    r.take_events()
    assert v.reader_disable().ack  # was OUT OF SEQUENCE
    assert r.take_events() == [(mdb.EV_DISABLED, 3, 0, 0)]
    assert v.poll().code == mdb.P_SESSION_CANCEL
    assert v.vend_request(1, 100).ack  # a VMC that selects anyway
    assert v.poll().code == mdb.P_VEND_DENIED and r.approvals == 0
    assert v.session_complete().code == mdb.P_END_SESSION
    assert r.state == mdb.DISABLED and r.session == 0
    assert not r.credit(4, 150, 0)  # disabled: no new session until READER ENABLE
    assert v.send([0x14, 0x01]).ack and r.state == mdb.ENABLED


@pytest.mark.parametrize("result", ["success", "failure"])
def test_reader_disable_during_an_approved_vend_lets_it_finish_once(result):
    """The vend in progress is not affected (7.4.12 NOTE): its one result is reported, then the
    session is cancelled and ends in DISABLED; no second vend, no second result."""
    r, v, _ = _ready()
    r.credit(5, 150, 0)
    v.poll_until((mdb.P_BEGIN_SESSION,))
    v.vend_request(2, 120)
    assert r.approve(5, 0)
    assert v.reader_disable().ack  # before the VMC even polled the approval
    assert v.poll().code == mdb.P_VEND_APPROVED
    assert (v.vend_success(2) if result == "success" else v.vend_failure()).ack
    assert v.poll().code == mdb.P_SESSION_CANCEL
    assert v.vend_request(2, 120).ack and v.poll().code == mdb.P_VEND_DENIED
    assert v.session_complete().code == mdb.P_END_SESSION and r.state == mdb.DISABLED
    kinds = [e[0] for e in r.take_events()]
    done = mdb.EV_VEND_SUCCESS if result == "success" else mdb.EV_VEND_FAILURE
    assert kinds.count(mdb.EV_VEND_SUCCESS) + kinds.count(mdb.EV_VEND_FAILURE) == 1
    assert done in kinds and r.approvals == 1


def test_reader_disable_while_a_request_waits_for_the_host():
    """A request the host has not decided is a transaction in progress: the host's decision
    still counts; then the session is cancelled."""
    r, v, _ = _ready()
    r.credit(6, 150, 0)
    v.poll_until((mdb.P_BEGIN_SESSION,))
    v.vend_request(2, 120)
    assert v.reader_disable().ack
    assert r.deny(6, 0)
    assert v.poll().code == mdb.P_VEND_DENIED
    assert v.poll().code == mdb.P_SESSION_CANCEL
    assert v.session_complete().code == mdb.P_END_SESSION and r.state == mdb.DISABLED


def test_reader_enable_in_a_disabled_session_ends_it_enabled():
    r, v, _ = _ready()
    r.credit(7, 150, 0)
    v.poll_until((mdb.P_BEGIN_SESSION,))
    assert v.reader_disable().ack and v.send([0x14, 0x01]).ack
    v.poll_until((mdb.P_SESSION_CANCEL,))
    assert v.session_complete().code == mdb.P_END_SESSION and r.state == mdb.ENABLED


def test_foreign_addresses_get_no_answer():
    r, _, _ = _ready()
    assert r.word(mdb.MODE | 0x08, 0) == [] and r.word(0x08, 0) == []  # coin changer POLL
    assert r.foreign == 1


# ---------------------------------------------------------------- the reader, by hypothesis

VMC_CMDS = st.sampled_from(
    [
        [0x10], [0x12], [0x11, 0, 1, 0, 0, 0], [0x11, 1, 0, 200, 0, 0], [0x14, 0], [0x14, 1],
        [0x14, 2], [0x13, 1], [0x13, 3], [0x13, 4], [0x13, 2, 0, 1], [0x13, 0, 0, 100, 0, 1],
        [0x13, 0, 1, 0, 0, 2], [0x17, 0, *range(29)], [0x13, 5, 0, 100, 0, 1],
    ]
)  # fmt: skip
READY = [[0x11, 0, 1, 0, 0, 0], [0x14, 1]]  # config data, enable: a reader a session can open on
STEP = st.one_of(
    st.tuples(st.just("vmc"), VMC_CMDS),
    st.tuples(st.just("ready"), st.just(0)),
    st.tuples(st.just("sale"), st.integers(50, 200)),  # VEND REQUEST at a price
    st.tuples(st.just("ctl"), st.sampled_from([mdb.ACK, mdb.RET, mdb.NAK])),
    st.tuples(st.just("host"), st.sampled_from(["credit", "approve", "deny", "revoke"])),
    st.tuples(st.just("tick"), st.integers(0, 70000)),
    st.tuples(st.just("raw"), st.integers(0, 0x1FF)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(STEP, max_size=80))
def test_reader_never_crashes_never_approves_unasked_never_reports_twice(steps):
    r = mdb.Reader()
    now = 0
    session = 0
    credits: set[int] = set()
    approvals_asked = 0
    approved_seen = 0
    for kind, arg in steps:
        if kind in ("vmc", "ready", "sale"):
            if kind == "vmc":
                cmds = [arg]
            elif kind == "ready":
                cmds = READY
            else:
                cmds = [[0x13, 0, *mdb.u16(arg), 0, 1], [0x12]]
            # READER DISABLE came in this session, and this request is a new one
            disabled_before = r.disable_at_end and r.state == mdb.SESSION_IDLE
            for c in cmds:
                reply: list[int] = []
                for w in mdb.command_words(c):
                    reply = r.word(w, now)
                assert reply == [mdb.NAK] or reply[-1] & mdb.MODE
                if len(reply) > 1:
                    assert mdb.checksum(bytes(w & 0xFF for w in reply[:-1])) == reply[-1] & 0xFF
                    if reply[0] == mdb.P_VEND_APPROVED:
                        # only for a session the host credited, after the host approved
                        assert r.session in credits and approvals_asked > 0
                        assert (reply[1] << 8 | reply[2]) <= 150  # never above the funds
                        approved_seen += 1
            if kind == "sale" and disabled_before:
                assert not r.pending and not r.approved  # asked after a disable: denied
        elif kind in ("ctl", "raw"):
            r.word(arg, now)
        elif kind == "host":
            if arg == "credit":
                session += 1
                if r.credit(session, 150, now):
                    credits.add(session)
            elif arg == "approve":
                if r.approve(session, now):
                    approvals_asked += 1
                    assert session in credits
            elif arg == "deny":
                r.deny(session, now)
            else:
                r.revoke(session, now)
        else:
            now += arg
            r.tick(now)
        assert r.approvals == approvals_asked
        assert r.state in (mdb.INACTIVE, mdb.DISABLED, mdb.ENABLED, mdb.SESSION_IDLE, mdb.VEND)
    event("approved" if approved_seen else "none approved")
    # never two results for one session
    results: dict[int, int] = {}
    for ev in r.events:  # events kept at most 16: enough for these runs' tails
        if ev[0] in (mdb.EV_VEND_SUCCESS, mdb.EV_VEND_FAILURE):
            results[ev[1]] = results.get(ev[1], 0) + 1
    assert all(n <= 1 for n in results.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0x1FF), max_size=200))
def test_reader_takes_any_word_stream(words):
    r = mdb.Reader()
    for i, w in enumerate(words):
        out = r.word(w, i)
        assert all(0 <= x <= 0x1FF for x in out)
    r.tick(10**6)
    assert r.approvals == 0  # nobody approved: nothing is approved


# ---------------------------------------------------------------- host + reader + journal


class FakeBoard:
    """BoardLink's surface the MDB channel uses, wired straight into a Reader (no pty)."""

    def __init__(self, reader: mdb.Reader) -> None:
        self.reader = reader
        self.on_boot = None
        self.now = 0
        self.silent = False

    def request(self, mtype: int, payload: bytes) -> int:
        from edge.board import BoardSilent

        if self.silent:
            raise BoardSilent("board silent")
        assert mtype == frame.MDB_HOST
        op, session, funds = frame.parse_mdb_host(payload)
        {OP_CREDIT: lambda: self.reader.credit(session, funds, self.now),
         OP_APPROVE: lambda: self.reader.approve(session, self.now),
         OP_DENY: lambda: self.reader.deny(session, self.now),
         OP_REVOKE: lambda: self.reader.revoke(session, self.now)}[op]()
        return 1

    def pump(self, wait: float = 0.0) -> None:
        return None

    def take_mdb_events(self):
        return [(*e, self.reader.state) for e in self.reader.take_events()]


def _host(tmp_path: Path, limit: int = 1):
    r = mdb.Reader()
    t = [0]
    vmc = Vmc(InProcess(r, lambda: t[0]))
    vmc.setup()
    board = FakeBoard(r)
    ctl = VendController(VendJournal(str(tmp_path / "vend.sqlite")), None, "machine:VM02",
                         limit=limit, period=PeriodSpec("day", 4), clock_ms=lambda: 1_700_000_000_000)
    ch = MdbChannel(ctl, board, price_ceiling=150)  # type: ignore[arg-type]
    return r, vmc, ch, ctl


def test_host_dispense_commits_once_with_item_and_price(tmp_path):
    r, vmc, ch, ctl = _host(tmp_path)
    res = ctl.reserve("T1")
    ch.open(res)
    vmc.poll_until((mdb.P_BEGIN_SESSION,))
    assert vmc.funds == 150
    vmc.vend_request(item=4, price=130)
    ch.poll()
    assert ctl.journal.get(res.vend_id).state == tx.VENDING  # START on disk before the approval
    assert vmc.poll_until((mdb.P_VEND_APPROVED,)).data == bytes((5, 0, 130))
    vmc.vend_success(4)
    vmc.session_complete()
    ch.poll()
    rec = ctl.journal.get(res.vend_id)
    assert rec.state == tx.COMMITTED and rec.slot == 4 and rec.reason == "mdb vend_success"
    assert ch.items[res.vend_id] == (4, 130)
    assert len(ctl.billable()) == 1


@pytest.mark.parametrize(
    "how, final",
    [("failure", tx.RELEASED), ("cancel", tx.RELEASED), ("timeout", tx.RELEASED),
     ("reset_mid_vend", tx.INDETERMINATE), ("board_boot", tx.INDETERMINATE)],
)
def test_host_failure_cancel_timeout_reset(tmp_path, how, final):
    r, vmc, ch, ctl = _host(tmp_path)
    res = ctl.reserve("T1")
    ch.open(res)
    vmc.poll_until((mdb.P_BEGIN_SESSION,))
    if how == "timeout":
        r.tick(r.session_timeout_ms + 1)
        vmc.poll_until((mdb.P_SESSION_CANCEL,))
        vmc.session_complete()
    else:
        vmc.vend_request(item=2, price=100)
        ch.poll()
        if how == "cancel":
            vmc.vend_cancel()
        else:
            vmc.poll_until((mdb.P_VEND_APPROVED,))
            if how == "failure":
                vmc.vend_failure()
            elif how == "reset_mid_vend":
                vmc.reset()
            else:
                ch._on_boot(None)  # type: ignore[arg-type]
        vmc.session_complete()
    ch.poll()
    assert ctl.journal.get(res.vend_id).state == final
    assert ctl.remaining("T1") == (1 if final == tx.RELEASED else 0)


@pytest.mark.parametrize("when", ["idle", "approved_success", "approved_failure"])
def test_host_reader_disable_in_a_session(tmp_path, when):
    """Idle session: the reservation is released at once (nothing can be approved in it any
    more). Approved vend: its own result settles it (commit once / release), never both."""
    r, vmc, ch, ctl = _host(tmp_path)
    res = ctl.reserve("T1")
    ch.open(res)
    vmc.poll_until((mdb.P_BEGIN_SESSION,))
    if when == "idle":
        vmc.reader_disable()
        ch.poll()
        assert ctl.journal.get(res.vend_id).state == tx.RELEASED and ctl.remaining("T1") == 1
        vmc.poll_until((mdb.P_SESSION_CANCEL,))
        vmc.session_complete()
    else:
        vmc.vend_request(item=2, price=100)
        ch.poll()
        vmc.reader_disable()
        vmc.poll_until((mdb.P_VEND_APPROVED,))
        ch.poll()
        assert ctl.journal.get(res.vend_id).state == tx.VENDING  # the disable changed nothing
        vmc.vend_success(2) if when == "approved_success" else vmc.vend_failure()
        vmc.poll_until((mdb.P_SESSION_CANCEL,))
        vmc.session_complete()
    ch.poll()
    final = tx.COMMITTED if when == "approved_success" else tx.RELEASED
    assert ctl.journal.get(res.vend_id).state == final and r.state == mdb.DISABLED
    assert len(ctl.billable()) == (1 if final == tx.COMMITTED else 0)
    assert ctl.anomalies == []


@pytest.mark.parametrize("state, result, same, final", [
    (frame.J_DONE, frame.R_DISPENSED, True, tx.COMMITTED),  # the board saw VEND SUCCESS
    (frame.J_DONE, frame.R_NO_DROP, True, tx.RELEASED),  # VEND FAILURE / CANCEL after approval
    (frame.J_DONE, frame.R_INTERRUPTED, True, tx.INDETERMINATE),  # the VMC reset mid-vend
    (frame.J_IN_PROGRESS, frame.R_NONE, True, tx.INDETERMINATE),  # the board reset mid-vend
    (frame.J_DONE, frame.R_DISPENSED, False, tx.INDETERMINATE),  # another vend: ask the board
])  # fmt: skip
def test_host_board_boot_settles_from_the_boards_journal(tmp_path, state, result, same, final):
    from edge.board import BootNotice

    r, vmc, ch, ctl = _host(tmp_path)
    res = ctl.reserve("T1")
    ch.open(res)
    vmc.poll_until((mdb.P_BEGIN_SESSION,))
    vmc.vend_request(item=2, price=100)
    ch.poll()
    assert ctl.journal.get(res.vend_id).state == tx.VENDING
    vid = res.vend_id if same else res.vend_id + 7
    ch._on_boot(BootNotice(0, 1, 2, vid, 2, state, result, 0.0))
    assert ctl.journal.get(res.vend_id).state == final
    assert ch._reconcile_due == (final == tx.INDETERMINATE)
    assert len(ctl.billable()) == (1 if final == tx.COMMITTED else 0)


def test_host_denies_a_request_whose_reservation_is_gone(tmp_path):
    r, vmc, ch, ctl = _host(tmp_path)
    res = ctl.reserve("T1")
    ch.open(res)
    vmc.poll_until((mdb.P_BEGIN_SESSION,))
    ctl.cancel(res)  # released (an operator, a second tap elsewhere...)
    vmc.vend_request(item=2, price=100)
    ch.poll()
    assert vmc.poll_until((mdb.P_VEND_APPROVED, mdb.P_VEND_DENIED)).code == mdb.P_VEND_DENIED
    assert r.approvals == 0 and ctl.journal.get(res.vend_id).state == tx.RELEASED


def test_host_power_loss_mid_vend_is_indeterminate_at_next_boot(tmp_path):
    r, vmc, ch, ctl = _host(tmp_path)
    res = ctl.reserve("T1")
    ch.open(res)
    vmc.poll_until((mdb.P_BEGIN_SESSION,))
    vmc.vend_request(item=2, price=100)
    ch.poll()  # START journaled, approval sent; then the host dies
    ctl2 = VendController(VendJournal(str(tmp_path / "vend.sqlite")), None, "machine:VM02",
                          clock_ms=lambda: 1_700_000_000_000)
    out = ctl2.recover(ask_board=False)
    assert [o.result for o in out] == ["indeterminate"]
    assert ctl2.remaining("T1") == 0 and ctl2.billable() == []


def test_silent_board_releases_the_reservation(tmp_path):
    from vending.mdb import MdbError

    r, vmc, ch, ctl = _host(tmp_path)
    ch.board.silent = True  # type: ignore[attr-defined]
    res = ctl.reserve("T1")
    with pytest.raises(MdbError):
        ch.open(res)
    assert ctl.journal.get(res.vend_id).state == tx.RELEASED


HOST_STEP = st.one_of(
    st.tuples(st.just("tap"), st.just(0)),
    st.tuples(st.just("vmc"), st.sampled_from(
        ["poll", "req", "req_dear", "success", "failure", "cancel", "complete", "reset", "setup",
         "disable", "enable"])),
    st.tuples(st.just("tick"), st.integers(0, 70000)),
    st.tuples(st.just("host"), st.just(0)),
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.lists(HOST_STEP, max_size=40))
def test_host_books_never_commit_without_a_vend_success_and_never_twice(tmp_path_factory, steps):
    tmp = tmp_path_factory.mktemp("mdbh")
    r, vmc, ch, ctl = _host(tmp, limit=2)
    from sim.vmc import VmcError
    from vending.ledger import LimitReached

    successes = 0
    now = 0
    for kind, arg in steps:
        try:
            if kind == "tap":
                with contextlib.suppress(LimitReached):
                    ch.open(ctl.reserve("T1"))
            elif kind == "vmc":
                if arg == "poll":
                    vmc.poll()
                elif arg == "req":
                    vmc.vend_request(1, 100)
                elif arg == "req_dear":
                    vmc.vend_request(1, 900)
                elif arg == "success":
                    before = r.last_result
                    if vmc.vend_success(1).ack and before != mdb.VEND_SUCCESS:
                        successes += 1
                elif arg == "failure":
                    vmc.vend_failure()
                elif arg == "cancel":
                    vmc.vend_cancel()
                elif arg == "complete":
                    vmc.session_complete()
                elif arg == "reset":
                    vmc.reset()
                elif arg == "disable":
                    vmc.reader_disable()
                elif arg == "enable":
                    vmc.send([0x14, 0x01])
                else:
                    vmc.setup()
            elif kind == "tick":
                now += arg
                r.tick(now)
            ch.poll()
        except VmcError:
            pass
        committed = ctl.journal.in_state(tx.COMMITTED)
        assert len(committed) <= successes  # no commit without the VMC's VEND SUCCESS
        assert len(committed) + len(ctl.journal.in_state(*tx.HELD)) <= 2  # the limit
        assert r.approvals <= len(ctl.journal.in_state(tx.VENDING, tx.COMMITTED, tx.RELEASED,
                                                       tx.INDETERMINATE))


class Lossy(InProcess):
    """Corrupts the checksum of the first command it carries, or of the first reply."""

    def __init__(self, reader: mdb.Reader, hit: str) -> None:
        super().__init__(reader, lambda: 0)
        self.hit = hit

    def write(self, words: list[int]) -> None:
        if self.hit == "command" and len(words) > 1:
            self.hit = ""
            words = [*words[:-1], (words[-1] + 1) & 0xFF]
        super().write(words)

    def read(self, timeout: float) -> list[int]:
        out = super().read(timeout)
        if self.hit == "reply" and len(out) > 1:
            self.hit = ""
            out = [*out[:-1], mdb.MODE | ((out[-1] + 1) & 0xFF)]
        return out


def test_vmc_resends_a_command_the_reader_naked():
    v = Vmc(Lossy(mdb.Reader(), "command"))
    v.setup()
    assert v.resends == 1 and v.wire.reader.bad_checksums == 1  # type: ignore[union-attr]
    assert v.wire.reader.state == mdb.ENABLED  # type: ignore[union-attr]


def test_vmc_asks_ret_for_a_reply_with_a_bad_checksum():
    v = Vmc(Lossy(mdb.Reader(), "reply"))
    assert v.setup().data[0] == mdb.P_CONFIG
    assert v.rets == 1


# ---------------------------------------------------------------- a public trace, byte for byte

TRACE = Path(__file__).parent / "data" / "mdb" / "necta_kikko_max_pax_d200.txt"


def _trace() -> list[tuple[str, bytes]]:
    out = []
    for line in TRACE.read_text().splitlines():
        if line and not line.startswith("#"):
            who, *hexes = line.split()
            out.append((who, bytes(int(h, 16) for h in hexes)))
    return out


def test_trace_checksums_are_ours():
    """Every block of the real trace, the VMC's and the Pax D200's, checks with mdb.checksum."""
    blocks = _trace()
    assert len(blocks) > 40
    for who, b in blocks:
        if len(b) > 1:
            assert mdb.checksum(b[:-1]) == b[-1], (who, b.hex())


def test_trace_replies_parse_in_the_vmc_simulator():
    from sim.vmc import Reply, _block_ok

    for who, b in _trace():
        if who == "S":
            words = [*b[:-1], mdb.MODE | b[-1]]
            assert _block_ok(words), b.hex()
            if b[0] == mdb.P_BEGIN_SESSION and len(b) > 2:
                assert Reply(words).data[1:3] == bytes((0x4E, 0x20))  # funds 20000


def test_trace_vmc_bytes_drive_our_reader_to_the_same_replies():
    """The Kikko Max's exact command bytes, in order, into our reader; the host credits where
    the Pax opened a session and approves the vend. Our reader takes every command (no NAK:
    lengths and checksums agree with a real VMC) and gives the same reply codes; the Pax
    answered config data, END SESSION and its JUST RESET one POLL later than we do, which the
    spec allows, so codes are compared in order of appearance."""
    r = mdb.Reader(country=0x1392)
    ours: list[int] = []
    theirs: list[int] = []
    session = 0
    trace = _trace()
    for i, (who, b) in enumerate(trace):
        if who == "S":
            if len(b) > 1:
                theirs.append(b[0])
            continue
        nxt = trace[i + 1][1]
        if nxt[0] == mdb.P_BEGIN_SESSION and len(nxt) > 1:  # the Pax had a card: our tap
            session += 1
            assert r.credit(session, 20000, 0)
        if nxt == bytes((0x04, 0x04)):  # the Pax cancelled the session: our host revokes
            assert r.revoke(session, 0)
        reply: list[int] = []
        for j, x in enumerate(b):
            reply = r.word((mdb.MODE | x) if j == 0 else x, 0)
        assert reply != [mdb.NAK], b.hex()
        if len(reply) > 1:
            ours.append(reply[0])
            r.word(mdb.ACK, 0)
        if b[:2] == bytes((0x13, 0x00)):
            assert r.take_events()[-1] == (mdb.EV_VEND_REQUEST, session, 6, 10)
            assert r.approve(session, 0)
    assert r.take_events()[-2:] == [(mdb.EV_VEND_SUCCESS, 2, 6, 10), (mdb.EV_SESSION_END, 2, 6, 10)]
    assert ours == theirs, ([hex(x) for x in ours], [hex(x) for x in theirs])
    assert r.bad_checksums == 0 and r.out_of_sequence == 0


def test_serve_waits_for_a_running_vend_then_a_late_report_settles_it(tmp_path):
    r, vmc, ch, ctl = _host(tmp_path)
    board = ch.board
    plain = board.request

    def request(mtype: int, payload: bytes) -> int:  # the VMC reacts to the credit at once
        n = plain(mtype, payload)
        if frame.parse_mdb_host(payload)[0] == OP_CREDIT:
            vmc.poll_until((mdb.P_BEGIN_SESSION,))
            vmc.vend_request(item=3, price=110)
        return n

    board.request = request  # type: ignore[method-assign]
    res = ctl.reserve("T1")
    v = ch.serve(res, wait=0.05, vend_wait=0.2)  # the machine takes longer than that to vend
    assert v.outcome.state == tx.VENDING and (v.item, v.price) == (3, 110)
    assert r.approvals == 1
    vmc.poll_until((mdb.P_VEND_APPROVED,))
    vmc.vend_success(3)
    ch.poll()  # the role's idle loop
    assert ctl.journal.get(res.vend_id).state == tx.COMMITTED
