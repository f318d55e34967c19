"""Vending machines: allowance ledger, vend transaction table, journal, controller.

The board link the controller drives is edge/board.py (the gate role uses it too).

Public API (what the agent calls):
    VendController   reserve() / vend() / cancel() / recover() / reconcile() / resolve()
    VendJournal      SQLite journal (WAL, synchronous=FULL); the ledger lives in its rows
    PeriodSpec       day or week, cut at an hour in Asia/Tokyo
    LimitReached     raised by reserve() when the allowance is used up
    VendOutcome      the result of a vend (a touch's vend facts)
"""

from .controller import DISPENSED, INDETERMINATE, NOT_DISPENSED, VendController, VendOutcome
from .journal import VendJournal, VendRecord
from .ledger import AllowanceKey, Ledger, LimitReached, Usage
from .period import PeriodSpec
from .transaction import InvalidTransition, Transition, transition

__all__ = [
    "DISPENSED",
    "INDETERMINATE",
    "NOT_DISPENSED",
    "AllowanceKey",
    "InvalidTransition",
    "Ledger",
    "LimitReached",
    "PeriodSpec",
    "Transition",
    "Usage",
    "VendController",
    "VendJournal",
    "VendOutcome",
    "VendRecord",
    "transition",
]
