"""The error base of protocol/: a payload that is not what the wire contract says.

TouchError (protocol/touch.py) and AckError (protocol/ack.py) derive from it; it stays a
ValueError, as they were. Imports nothing.
"""


class ProtocolError(ValueError):
    """A payload that breaks the wire contract (touch, ack)."""
