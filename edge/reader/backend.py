"""The reader backend interface, the feedback hook, and the factory that picks a backend by config.

A backend owns one reader: it finds cards, applies the card profile, hands each tap on as a
CardRead (`on_read`, which returns the touch made, or None for a repeat tap), gives the
person feedback, and reports its health ("starting", "ok", "down", "error") through
`on_health` and its `health` attribute. Backends never raise out of their thread.
"""

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from edge.config import ProfileConfig, ReaderConfig
from edge.decision import CardRead
from protocol.reasons import Reason
from protocol.touch import Decision

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


log = logging.getLogger(__name__)


class ReaderThread:
    """What every backend shares: one thread per reader, a stop event, and health reporting.
    A subclass implements _run(), which loops until self._stop is set."""

    def __init__(self, cfg: ReaderConfig, profile: ProfileConfig, on_read: OnRead,
                 on_health: OnHealth | None = None, feedback: Feedback | None = None) -> None:
        self.cfg, self.profile, self.on_read = cfg, profile, on_read
        self.on_health = on_health or (lambda name, health: None)
        self.feedback = feedback
        self.health = "starting"
        self.taps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reader-{cfg.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _set_health(self, health: str) -> None:
        if health != self.health:
            self.health = health
            log.info("reader %s: %s", self.cfg.name, health)
            self.on_health(self.cfg.name, health)

    def _run(self) -> None:
        raise NotImplementedError


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
