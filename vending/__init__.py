"""Vending machines: allowance ledger, vend transaction state machine, journal, board link, controller.

Public API (what the agent calls):
    VendController   reserve() / vend() / cancel() / recover() / reconcile() / resolve()
    VendJournal      SQLite journal (WAL, synchronous=FULL); the ledger lives in its rows
    BoardLink        pyserial link to the controller board (firmware/frame.py protocol)
    PeriodSpec       day or week, cut at an hour in Asia/Tokyo
    LimitReached     raised by reserve() when the allowance is used up
    VendOutcome      the result of a vend (a touch's vend facts)
"""

from .board import (
    BoardError,
    BoardLink,
    BoardRefused,
    BoardSilent,
    BoardStatus,
    BoardTimeout,
    BootNotice,
    VendReply,
)
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
    "BoardError",
    "BoardLink",
    "BoardRefused",
    "BoardSilent",
    "BoardStatus",
    "BoardTimeout",
    "BootNotice",
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
    "VendReply",
    "transition",
]
