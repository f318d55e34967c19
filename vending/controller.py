"""VendController: the vending machine's transaction driver (journal + ledger + board), for the agent."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.board import BoardError, BoardLink, BoardSilent, BoardTimeout, BootNotice, VendReply
from firmware import frame

from . import transaction as tx
from .journal import Applied, VendJournal, VendRecord
from .ledger import AllowanceKey, Usage
from .period import PeriodSpec

DISPENSED = "dispensed"
NOT_DISPENSED = "not_dispensed"
INDETERMINATE = "indeterminate"
PENDING = "pending"

_NOT_DISPENSED_RESULTS = (
    frame.R_NO_DROP,
    frame.R_BUSY,
    frame.R_BAD_SLOT,
    frame.R_SENSOR_FAULT,
    frame.R_NOT_STARTED,
)


@dataclass(frozen=True)
class VendOutcome:
    """What happened to one vend; every outcome is a touch (slot, result)."""

    vend_id: int
    technician: str
    scope: str
    period: str
    slot: int | None
    result: str  # DISPENSED, NOT_DISPENSED, INDETERMINATE (or PENDING while open)
    state: str  # the transaction state (vending.transaction)
    reason: str | None
    board_result: int | None

    @classmethod
    def of(cls, rec: VendRecord) -> VendOutcome:
        result = {
            tx.COMMITTED: DISPENSED,
            tx.RELEASED: NOT_DISPENSED,
            tx.INDETERMINATE: INDETERMINATE,
        }.get(rec.state, PENDING)
        return cls(
            rec.vend_id,
            rec.technician,
            rec.scope,
            rec.period,
            rec.slot,
            result,
            rec.state,
            rec.reason,
            rec.board_result,
        )

    def touch_facts(self) -> dict[str, object]:
        """The role facts a vending touch carries."""
        return {"vend_id": self.vend_id, "slot": self.slot, "result": self.result, "reason": self.reason}


def _wall_ms() -> int:
    return int(time.time() * 1000)


class VendController:
    """Reserve on an approved tap, drive the board, commit or release; journaled throughout.

    controller = VendController(VendJournal(path), BoardLink(port), scope="machine:VM01",
                                limit=1, period=PeriodSpec("day", cut_hour=5))
    controller.recover()                       # once at start
    r = controller.reserve(technician_id)      # raises LimitReached
    outcome = controller.vend(r, slot=1)       # VendOutcome; never raises for board trouble
    """

    def __init__(
        self,
        journal: VendJournal,
        board: BoardLink | None,
        scope: str,
        limit: int = 1,
        period: PeriodSpec | None = None,
        pulse_ms: int = 200,
        drop_timeout_ms: int = 5000,
        clock_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.journal = journal
        self.board = board
        self.scope = scope
        self.limit = limit
        self.period = period or PeriodSpec()
        self.pulse_ms = pulse_ms
        self.drop_timeout_ms = drop_timeout_ms
        self.clock_ms = clock_ms
        self.anomalies: list[str] = []
        if board is not None:
            board.on_boot = self._on_boot

    # ---------------------------------------------------------------- allowance

    def key(self, technician: str, now_ms: int | None = None) -> AllowanceKey:
        ts = self.clock_ms() if now_ms is None else now_ms
        return AllowanceKey(technician, self.scope, self.period.key(ts))

    def usage(self, technician: str, now_ms: int | None = None) -> Usage:
        return self.journal.usage(self.key(technician, now_ms))

    def remaining(self, technician: str, now_ms: int | None = None) -> int:
        return max(0, self.limit - self.usage(technician, now_ms).used)

    def reserve(self, technician: str, slot: int | None = None) -> VendRecord:
        """Hold one drink of the technician's allowance, durably. Raises LimitReached."""
        now = self.clock_ms()
        return self.journal.reserve(self.key(technician, now), self.limit, now, slot)

    def cancel(self, reservation: VendRecord, reason: str = "cancelled") -> VendOutcome:
        return self._apply(reservation.vend_id, tx.CANCEL, reason=reason)

    # ---------------------------------------------------------------- vend

    def vend(self, reservation: VendRecord, slot: int, timeout: float | None = None) -> VendOutcome:
        """Drive the board for a reserved vend and settle the transaction.

        timeout: seconds to wait for the board's result after it acknowledged (default: the
        board's drop timeout + 2 s). Board trouble never raises: it becomes the outcome.
        """
        if self.board is None:
            raise BoardError("no board attached")
        vid = reservation.vend_id
        self._apply(vid, tx.START, slot=slot)  # journaled before the request leaves
        wait = timeout if timeout is not None else self.drop_timeout_ms / 1000 + 2.0
        try:
            reply = self.board.vend(vid, slot, self.pulse_ms, self.drop_timeout_ms, wait=wait)
        except BoardSilent as e:
            return self._apply(vid, tx.LINK_FAILED, reason=str(e))
        except BoardTimeout as e:
            return self._apply(vid, tx.TIMEOUT, reason=str(e))
        except BoardError as e:  # refused (NAK): the board did not take the request
            return self._apply(vid, tx.LINK_FAILED, reason=str(e))
        return self._settle(vid, reply)

    def _settle(self, vid: int, reply: VendReply) -> VendOutcome:
        if reply.result == frame.R_DISPENSED:
            return self._apply(vid, tx.CONFIRMED, reason=reply.name, board_result=reply.result)
        if reply.result in _NOT_DISPENSED_RESULTS:
            return self._apply(vid, tx.NOT_DISPENSED, reason=reply.name, board_result=reply.result)
        # interrupted, forgotten, unknown: the board cannot say; neither can we.
        return self._apply(vid, tx.INTERRUPTED, reason=f"board: {reply.name}", board_result=reply.result)

    # ---------------------------------------------------------------- recovery

    def recover(self, ask_board: bool = True) -> list[VendOutcome]:
        """At start: close transactions a host power loss left open, then ask the board about
        every indeterminate vend (its journal may know). Returns the changed outcomes."""
        now = self.clock_ms()
        out = [VendOutcome.of(a.record) for a in self.journal.recover(now)]
        if ask_board and self.board is not None:
            out.extend(self.reconcile())
        return out

    def reconcile(self) -> list[VendOutcome]:
        """Query the board about indeterminate vends; settle those its journal knows."""
        out: list[VendOutcome] = []
        if self.board is None:
            return out
        for rec in self.journal.in_state(tx.INDETERMINATE):
            try:
                reply = self.board.query_vend(rec.vend_id)
            except BoardError as e:
                self.anomalies.append(f"reconcile vend {rec.vend_id}: {e}")
                break
            if reply.result == frame.R_DISPENSED or reply.result in _NOT_DISPENSED_RESULTS:
                out.append(self._settle(rec.vend_id, reply))
        return out

    def poll(self, wait: float = 0.0) -> list[VendOutcome]:
        """Pump the board link; settle indeterminate vends from late VEND_RESULTs. Call it
        from the agent's idle loop; returns the vends it settled."""
        out: list[VendOutcome] = []
        if self.board is None:
            return out
        self.board.pump(wait)
        for reply in self.board.take_results():
            try:
                rec = self.journal.get(reply.vend_id)
            except KeyError:
                self.anomalies.append(f"board result for unknown vend {reply.vend_id}")
                continue
            if rec.state != tx.INDETERMINATE:
                continue
            if reply.result == frame.R_DISPENSED or reply.result in _NOT_DISPENSED_RESULTS:
                out.append(self._settle(reply.vend_id, reply))
        return out

    def resolve(self, vend_id: int, dispensed: bool, reason: str = "operator") -> VendOutcome:
        """An operator settles an indeterminate vend."""
        ev = tx.RESOLVE_DISPENSED if dispensed else tx.RESOLVE_NOT_DISPENSED
        return self._apply(vend_id, ev, reason=reason)

    def unresolved(self) -> list[VendOutcome]:
        return [VendOutcome.of(r) for r in self.journal.in_state(tx.INDETERMINATE)]

    def billable(self, period: str | None = None) -> list[VendOutcome]:
        return [VendOutcome.of(r) for r in self.journal.billable(self.scope, period)]

    def _on_boot(self, notice: BootNotice) -> None:
        vid = notice.interrupted_vend
        if vid is None:
            return
        try:
            rec = self.journal.get(vid)
        except KeyError:
            self.anomalies.append(f"board reports unknown vend {vid} interrupted at reset")
            return
        if rec.state in (tx.VENDING, tx.INDETERMINATE):
            self._apply(
                vid, tx.INTERRUPTED, reason="board reset while vending", board_result=frame.R_INTERRUPTED
            )

    def _apply(self, vend_id: int, event: str, **kw: object) -> VendOutcome:
        try:
            a: Applied = self.journal.apply(vend_id, event, self.clock_ms(), **kw)  # type: ignore[arg-type]
        except tx.InvalidTransition as e:
            self.anomalies.append(f"vend {vend_id}: {e}")
            return VendOutcome.of(self.journal.get(vend_id))
        return VendOutcome.of(a.record)
