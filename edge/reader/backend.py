"""The reader backend interface, the feedback hook, and the factory that picks a backend by config.

A backend owns one reader: it finds cards, applies the card profile, hands each tap on as a
CardRead (`on_read`, which returns the touch made, or None for a repeat tap), gives the
person feedback, and reports its health ("starting", "ok", "down", "error") through
`on_health` and its `health` attribute. Backends never raise out of their thread.
"""

from collections.abc import Callable
from typing import Any, Protocol

from edge.config import ProfileConfig, ReaderConfig
from edge.decision import CardRead
from edge.reasons import Reason
from edge.touch import Decision

OnRead = Callable[[ReaderConfig, CardRead], Any]
OnHealth = Callable[[str, str], None]
# (reader name, decision, reason): beep/LED for the person at the reader. The controller
# board implements it for readers that cannot signal themselves (udp, RC-S300, PN532).
Feedback = Callable[[str, Decision, Reason], None]


class ReaderBackend(Protocol):
    cfg: ReaderConfig
    health: str
    taps: int

    def start(self) -> None: ...
    def stop(self, timeout: float = 3.0) -> None: ...


def outcome(touch: Any) -> tuple[Decision, Reason] | None:
    """The decision and reason of what on_read returned (a Touch), or None (a repeat tap)."""
    decision, reason = getattr(touch, "decision", None), getattr(touch, "reason", None)
    if isinstance(decision, Decision) and isinstance(reason, Reason):
        return decision, reason
    return None


def make_reader(cfg: ReaderConfig, profile: ProfileConfig, on_read: OnRead,
                on_health: OnHealth | None = None, feedback: Feedback | None = None
                ) -> ReaderBackend:
    if cfg.backend == "pcsc":
        from edge.reader.pcsc_backend import PcscReader
        return PcscReader(cfg, profile, on_read, on_health, feedback)
    from edge.reader.nfcpy_backend import NfcpyReader
    return NfcpyReader(cfg, profile, on_read, on_health, feedback)
