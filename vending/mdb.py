"""The MDB vend channel, host side: a tap reserves one allowance and opens a cashless session on
the board's MDB reader; the VMC's own reports settle it. Same journal, ledger and table as the
pulse channel (vending/transaction.py); only the mapping of channel events to table events is new.

| MDB event (board)          | journal row state | table event      | to the board |
| ---                        | ---               | ---              | ---          |
| tap (approved)             | -                 | reserve          | credit(funds = price ceiling) |
| credit refused (reader not enabled) | reserved | cancel           | - |
| vend_request(item, price)  | reserved, price <= ceiling | start (slot = item) | approve |
| vend_request               | anything else     | -                | deny |
| vend_success               | vending           | confirmed        | - |
| vend_failure               | vending           | not_dispensed    | - |
| vend_cancel / denied       | vending           | not_dispensed    | - |
| session_end / timeout / reset (no vend approved) | reserved | cancel / timeout | - |
| disabled (READER DISABLE in the session) | reserved | cancel           | - |
| reset_mid_vend (VMC reset after VEND APPROVED)   | vending  | interrupted -> indeterminate | - |
| board BOOT, its journal: this vend done, dispensed / not | vending | confirmed / not_dispensed | - |
| board BOOT (board reset), anything else | vending | interrupted, then a query | - |
| serve() wait over, reader silent | reserved     | timeout          | revoke |
| host restart               | vending / reserved | power_loss (journal.recover), then a query | - |
| query: dispensed (board journal) | indeterminate | confirmed        | - |
| query: no_drop / not_started | indeterminate     | not_dispensed    | - |
| query: interrupted / forgotten / none (still running) | indeterminate | - (stays) | - |

Rules: `start` is journaled before the approval leaves the host, and the board journals the
vend (firmware/vend_mdb.py) before its reader queues VEND APPROVED and the VMC's result before
it tells the host. So after any crash the board's journal answers as on the pulse path: the
VMC's report if the board saw it, "not started" if the board never approved the vend (then no
drink can have come out), "interrupted" if the board reset mid-vend (truly unknown: held for an
operator, never billed, never given again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge.board import BoardError, BoardLink, BootNotice
from firmware import frame
from firmware import mdb as wire

from . import transaction as tx
from .controller import VendController, VendOutcome
from .errors import VendingError
from .journal import VendRecord

OP_CREDIT, OP_APPROVE, OP_DENY, OP_REVOKE = 1, 2, 3, 4

# channel event -> (states it applies in, table event); anything else leaves the row alone
EVENT_TABLE: dict[int, tuple[tuple[str, ...], str]] = {
    wire.EV_VEND_SUCCESS: ((tx.VENDING, tx.INDETERMINATE), tx.CONFIRMED),
    wire.EV_VEND_FAILURE: ((tx.VENDING, tx.INDETERMINATE), tx.NOT_DISPENSED),
    wire.EV_VEND_CANCEL: ((tx.VENDING,), tx.NOT_DISPENSED),
    wire.EV_DENIED: ((tx.VENDING,), tx.NOT_DISPENSED),
    wire.EV_SESSION_END: ((tx.RESERVED,), tx.CANCEL),
    wire.EV_TIMEOUT: ((tx.RESERVED,), tx.TIMEOUT),
    wire.EV_RESET: ((tx.RESERVED, tx.VENDING), tx.CANCEL),  # VENDING here: never approved
    wire.EV_RESET_MID_VEND: ((tx.VENDING,), tx.INTERRUPTED),
    wire.EV_REFUSED: ((tx.RESERVED,), tx.CANCEL),
    # READER DISABLE in a session: the reader approves nothing more in it, so a reservation
    # not yet asked for is given back now; a vend already asked for runs to its result
    wire.EV_DISABLED: ((tx.RESERVED,), tx.CANCEL),
}
# (CANCEL on a VENDING row, a reset or refusal before the reader approved, is not in the
# transaction table: it is applied as not_dispensed, which releases the same way.)


class MdbError(VendingError):
    """The MDB channel could not open a session (board silent or refused)."""


@dataclass
class MdbVend:
    """One MDB session's result: the touch's facts."""

    vend_id: int
    item: int | None
    price: int | None
    outcome: VendOutcome

    def touch_facts(self) -> dict[str, object]:
        f = self.outcome.touch_facts()
        f.update(item=self.item, price=self.price)
        return f


class MdbChannel:  # implements vending.channel.VendChannel
    """Drives the board's MDB reader for one vending controller (journal, ledger, scope)."""

    def __init__(self, ctl: VendController, board: BoardLink, price_ceiling: int) -> None:
        self.ctl = ctl
        self.board = board
        self.price_ceiling = price_ceiling
        self.items: dict[int, tuple[int, int]] = {}  # vend_id -> (item, price) the VMC asked
        self.anomalies = ctl.anomalies
        self._pulse_on_boot = board.on_boot  # the pulse channel's handler (same board)
        board.on_boot = self._on_boot
        self._reconcile_due = False  # a BOOT made vends indeterminate: ask the board's journal

    def start(self) -> None:
        """Before the first session: take what the port already holds (a BOOT notice sent
        before this host opened it), so an old BOOT cannot cancel a session opened later.
        (Were one to arrive late anyway, the row is released and the reader's VEND REQUEST
        denied: a lost tap, never an unbilled drink.)"""
        for _ in range(3):
            self.board.pump(0.05)
        # reports about sessions of a previous run (sent while no host listened): the table
        # applies only what fits the journal row (a VEND SUCCESS settles an indeterminate vend)
        for ev in self.board.take_mdb_events():
            self.handle(*ev)

    # ------------------------------------------------------------ session

    def open(self, reservation: VendRecord) -> None:
        """Push the credit for a reservation to the board (BEGIN SESSION at its next POLL).
        On a silent board the reservation is released and MdbError raised."""
        try:
            self.board.request(frame.MDB_HOST, frame.mdb_host(OP_CREDIT, reservation.vend_id,
                                                             self.price_ceiling))
        except BoardError as e:
            self._apply(reservation.vend_id, tx.CANCEL, reason=f"mdb credit: {e}")
            raise MdbError(str(e)) from e

    def revoke(self, vend_id: int) -> None:
        self.board.request(frame.MDB_HOST, frame.mdb_host(OP_REVOKE, vend_id, 0))

    def serve(self, reservation: VendRecord, wait: float, vend_wait: float = 30.0) -> MdbVend:
        """Open a session and pump until it is settled. After `wait` s with no vend started the
        session is revoked (2 s more for the VMC to close it); a vend the VMC is running gets
        `vend_wait` s more for its result. A row still `vending` then stays open: the idle
        poll() settles it from a late report, recover() makes it indeterminate."""
        vid = reservation.vend_id
        self.open(reservation)
        deadline = time.monotonic() + wait
        revoked = extended = False
        while True:
            self.poll(0.01)
            rec = self.ctl.journal.get(vid)
            if rec.state in tx.FINAL or rec.state == tx.INDETERMINATE:
                break
            if time.monotonic() <= deadline:
                continue
            if rec.state == tx.VENDING and not extended:
                extended = True
                deadline = time.monotonic() + vend_wait
            elif rec.state == tx.VENDING or revoked:
                break
            else:
                revoked = True
                deadline = time.monotonic() + 2.0
                try:
                    self.revoke(vid)
                except BoardError as e:
                    self.anomalies.append(f"mdb revoke {vid}: {e}")
        if self.ctl.journal.get(vid).state == tx.RESERVED:
            # never approved (START is journaled before an approval): nothing can have been
            # vended from it, so it is given back
            self._apply(vid, tx.TIMEOUT, reason="mdb session not settled by the reader")
        item, price = self.items.pop(vid, (None, None))
        return MdbVend(vid, item, price, VendOutcome.of(self.ctl.journal.get(vid)))

    # ------------------------------------------------------------ events

    def poll(self, wait: float = 0.0) -> None:
        self.board.pump(wait)
        for ev in self.board.take_mdb_events():
            self.handle(*ev)
        if self._reconcile_due:
            self._reconcile_due = False
            self.ctl.reconcile()  # the live board's journal: settles what it knows

    def handle(self, kind: int, vid: int, item: int, price: int, state: int) -> None:
        try:
            rec = self.ctl.journal.get(vid)
        except KeyError:
            self.anomalies.append(f"mdb {wire.EV_NAMES.get(kind, kind)} for unknown vend {vid}")
            if kind == wire.EV_VEND_REQUEST:
                self._board(OP_DENY, vid)
            return
        if kind == wire.EV_VEND_REQUEST:
            if rec.state == tx.RESERVED and price <= self.price_ceiling:
                self.items[vid] = (item, price)
                self._apply(vid, tx.START, slot=item, reason=f"mdb item {item} price {price}")
                self._board(OP_APPROVE, vid)  # after START is on disk
            else:
                self._board(OP_DENY, vid)
            return
        rule = EVENT_TABLE.get(kind)
        if rule is None or rec.state not in rule[0]:
            return
        event = rule[1]
        if event == tx.CANCEL and rec.state == tx.VENDING:
            event = tx.NOT_DISPENSED
        board_result = frame.R_DISPENSED if event == tx.CONFIRMED else None
        self._apply(vid, event, reason=f"mdb {wire.EV_NAMES[kind]}", board_result=board_result)

    def _board(self, op: int, vid: int) -> None:
        try:
            self.board.request(frame.MDB_HOST, frame.mdb_host(op, vid, 0))
        except BoardError as e:  # the reader's own decision timeout denies; START stays
            self.anomalies.append(f"mdb op {op} for vend {vid}: {e}")

    def _on_boot(self, notice: BootNotice) -> None:
        """The board reset: its reader forgot every session. The notice carries its journal's
        last vend: if that is a `vending` row and the board saw the VMC's result, that settles
        it. Any other `vending` row is interrupted (indeterminate) and the board's journal is
        asked at the next poll(). `reserved` rows are left alone: the notice may be an old one
        (sent before the credit), and a reserved row can never have been approved (START comes
        first); a reader that really lost the session refuses or times out, and serve()
        releases it."""
        if self._pulse_on_boot is not None:
            self._pulse_on_boot(notice)
        for rec in self.ctl.journal.in_state(tx.VENDING):
            if rec.scope != self.ctl.scope:
                continue
            known = (notice is not None and notice.last_vend_id == rec.vend_id
                     and notice.last_state == frame.J_DONE)
            if known and notice.last_result == frame.R_DISPENSED:
                self._apply(rec.vend_id, tx.CONFIRMED, reason="mdb board journal: vend_success",
                            board_result=frame.R_DISPENSED)
            elif known and notice.last_result == frame.R_NO_DROP:
                self._apply(rec.vend_id, tx.NOT_DISPENSED, reason="mdb board journal: not vended",
                            board_result=frame.R_NO_DROP)
            else:
                self._apply(rec.vend_id, tx.INTERRUPTED, reason="board reset during an MDB vend",
                            board_result=frame.R_INTERRUPTED)
                self._reconcile_due = True

    def _apply(self, vid: int, event: str, **kw: object) -> None:
        try:
            self.ctl.journal.apply(vid, event, self.ctl.clock_ms(), **kw)  # type: ignore[arg-type]
        except tx.InvalidTransition as e:
            self.anomalies.append(f"vend {vid}: {e}")

