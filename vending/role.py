"""The vending role plug-in (entry point `vending` in group ccus.roles): allowance decision, the
vend itself, and the touch facts. It implements edge.roles.DeviceRole; the agent finds it by
name and never imports this package.

The agent hands every tap on a vending machine here. An approved tap reserves the allowance
(journaled before the vend line moves), drives the board and settles the transaction; the
touch then carries slot and result. Board trouble never raises: it becomes the result.
"""

import logging
import threading
from pathlib import Path
from typing import Any

from edge.board import BoardLink
from edge.clock import Clock
from edge.config import ReaderConfig, VendingConfig
from edge.decision import CardRead, Verdict, decide_vending, resolve
from edge.idlist.base import IdList
from edge.roles import Facts, RoleContext
from protocol.reasons import Reason
from protocol.touch import Decision, Touch
from vending.controller import DISPENSED, INDETERMINATE, PENDING, VendController, VendOutcome
from vending.journal import VendJournal, VendRecord
from vending.ledger import LimitReached
from vending.mdb import MdbChannel, MdbError
from vending.period import PeriodSpec

log = logging.getLogger(__name__)

# Billing words on the touch: a vend the board did not complete is "failed" for the ledger.
RESULT = {DISPENSED: "dispensed", INDETERMINATE: "indeterminate"}


class VendingRole:
    def __init__(self, cfg: VendingConfig, device: str, site: str, data_dir: Path,
                 clock: Clock, board: BoardLink | None = None) -> None:
        self.cfg = cfg
        scope = f"machine:{device}" if cfg.scope == "machine" else f"site:{site}"
        self.board = board or BoardLink(cfg.serial, baudrate=cfg.baud)
        self.ctl = VendController(VendJournal(str(data_dir / "vend.sqlite")), self.board, scope,
                                  limit=cfg.limit, period=PeriodSpec(cfg.period, cut_hour=cfg.cut_hour),
                                  pulse_ms=cfg.pulse_ms, drop_timeout_ms=cfg.drop_timeout_ms,
                                  clock_ms=clock.now_ms)
        self.mdb: MdbChannel | None = None  # channel "mdb": the board is the machine's reader
        if cfg.channel == "mdb":
            self.mdb = MdbChannel(self.ctl, self.board, cfg.price_ceiling)
        # BoardLink is driven from one thread at a time: taps and the idle poll share this lock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="vend-poll", daemon=True)

    def start(self) -> None:
        with self._lock:
            # both channels: the board's flash journal answers for the vend a restart left
            # open (an MDB vend is journaled there before the reader approves it)
            for out in self.ctl.recover():
                log.warning("vend %d left open by a restart: %s", out.vend_id, out.result)
            if self.mdb is not None:
                self.mdb.start()
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        self._poller.join(3)
        self.board.close()

    def _poll(self) -> None:
        # late board results settle indeterminate vends (reported in the vend journal)
        while not self._stop.wait(0.5):
            with self._lock:
                if self.mdb is not None:
                    self.mdb.poll(0.0)  # late VMC reports (a result after the session wait)
                for out in self.ctl.poll(0.0):
                    log.info("vend %d settled late: %s", out.vend_id, out.result)

    # -- edge.roles.DeviceRole ---------------------------------------------------------------
    def decide(self, reader: ReaderConfig, read: CardRead,
               idlist: IdList | None) -> tuple[Verdict, Facts]:
        return self.serve(read, idlist)

    def facts(self, reader: ReaderConfig, now_ms: int) -> Facts:
        return {"reader": reader.name}

    def after(self, reader: ReaderConfig, touch: Touch) -> None:
        return None  # the vend already ran inside decide(): its result is on the touch

    def state(self) -> dict[str, Any]:
        return {}

    def serve(self, read: CardRead, idlist: IdList | None) -> tuple[Verdict, Facts]:
        """Decide a tap; on approval vend. Returns the verdict and the touch's vending facts."""
        entry, _ = resolve(read, idlist)
        with self._lock:
            remaining = self.ctl.remaining(entry.tid) if entry is not None else 0
            verdict = decide_vending(read, idlist, remaining)
            facts: dict[str, str | int | bool] = {"slot": self.cfg.slot}
            if self.cfg.contractor:
                facts["contractor"] = self.cfg.contractor
            if verdict.decision is not Decision.ALLOW or verdict.tid is None:
                return verdict, facts
            try:
                reservation = self.ctl.reserve(verdict.tid, self.cfg.slot)
            except LimitReached:  # the journal, not the figure read above, has the last word
                return Verdict(Decision.DENY, Reason.LIMIT_REACHED, verdict.tid,
                               verdict.list_version), facts
            if self.mdb is not None:
                return verdict, self._mdb_facts(facts, reservation)
            outcome: VendOutcome = self.ctl.vend(reservation, self.cfg.slot)
        facts.update(vend_id=outcome.vend_id, result=RESULT.get(outcome.result, "failed"))
        if outcome.reason:
            facts["vend_reason"] = str(outcome.reason)[:64]
        return verdict, facts

    def _mdb_facts(self, facts: dict[str, str | int | bool], reservation: VendRecord
                   ) -> dict[str, str | int | bool]:
        """One MDB session -> one touch with the item and price the VMC reported."""
        assert self.mdb is not None
        try:
            v = self.mdb.serve(reservation, self.cfg.session_s)
        except MdbError as e:  # board silent: the reservation is already released
            facts.update(vend_id=reservation.vend_id, result="failed", vend_reason=str(e)[:64])
            return facts
        # a vend still running when the wait ended is not known yet: never "failed" on the touch
        result = "indeterminate" if v.outcome.result == PENDING and v.item is not None else \
            RESULT.get(v.outcome.result, "failed")
        facts.update(vend_id=v.vend_id, result=result)
        if v.item is not None and v.price is not None:
            facts.update(slot=v.item, item=v.item, price=v.price)
        if v.outcome.reason:
            facts["vend_reason"] = str(v.outcome.reason)[:64]
        return facts

    def billable(self) -> list[VendOutcome]:
        with self._lock:
            return self.ctl.billable()


def make(ctx: RoleContext) -> VendingRole:
    """Entry point `vending` (group ccus.roles)."""
    c = ctx.cfg
    return VendingRole(c.vending, c.device.id, c.device.site, c.data_dir, ctx.clock)
