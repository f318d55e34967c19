"""The error base of vending/: `except VendingError` catches anything the vending role raises.

LimitReached and LedgerError (ledger.py) and InvalidTransition (transaction.py) derive from it.
Imports nothing.
"""


class VendingError(Exception):
    """Anything the vending role raises on purpose."""
