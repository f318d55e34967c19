"""The vend channel: how an allowance becomes a drink on one kind of machine. Two channels today,
the pulse line (the board pulses a vend line and watches the drop sensor) and MDB (the board is
the machine's cashless reader); JVMA would be a third (docs/vending.md lists what it needs).

A channel turns one reservation into one settled (or indeterminate) transaction of
vending/transaction.py, journaled by vending/journal.py; it never touches the books otherwise.
"""

from __future__ import annotations

from typing import Protocol

from .controller import VendController
from .journal import VendRecord
from .mdb import MdbChannel


class VendChannel(Protocol):
    def vend_facts(self, reservation: VendRecord) -> dict[str, object]:
        """Run one vend for a reservation; the touch's vending facts (vend_id, result, ...)."""
        ...


class PulseChannel:
    """Today's channel: VendController.vend on the configured slot."""

    def __init__(self, ctl: VendController, slot: int) -> None:
        self.ctl = ctl
        self.slot = slot

    def vend_facts(self, reservation: VendRecord) -> dict[str, object]:
        return self.ctl.vend(reservation, self.slot).touch_facts()


class MdbVendChannel:
    """The MDB channel: a cashless session; the VMC reports item, price and the result."""

    def __init__(self, mdb: MdbChannel, session_s: float) -> None:
        self.mdb = mdb
        self.session_s = session_s

    def vend_facts(self, reservation: VendRecord) -> dict[str, object]:
        return self.mdb.serve(reservation, self.session_s).touch_facts()
