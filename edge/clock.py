"""Clocks: wall time in UTC milliseconds with a time-quality flag, and monotonic time.

Production uses SystemClock; the demo and tests inject a ManualClock so a whole site day
runs in seconds through the same agent code.
"""

import threading
import time
from typing import Protocol

from protocol.timequality import TimeQuality


class Clock(Protocol):
    def now_ms(self) -> int: ...

    def quality(self) -> TimeQuality: ...

    def monotonic(self) -> float: ...


def _system_synced() -> bool:
    """systemd-timesyncd and chrony leave this flag file behind once the clock is synced."""
    try:
        import os

        return os.path.exists("/run/systemd/timesync/synchronized")
    except OSError:  # pragma: no cover - defensive
        return False


class SystemClock:
    """The real clock. Quality: 'synced' when the OS says so (or when configured to trust it)."""

    def __init__(self, assume_synced: bool = False) -> None:
        self._assume = assume_synced

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def quality(self) -> TimeQuality:
        return TimeQuality.SYNCED if self._assume or _system_synced() else TimeQuality.NEVER_SYNCED

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """Wall time set by the caller (demo, tests). Monotonic time is real time plus every forward
    jump of the wall clock, so timers (the re-tap window) see the simulated hours pass too."""

    def __init__(self, start_ms: int, quality: TimeQuality = TimeQuality.SYNCED) -> None:
        self._now = start_ms
        self._quality = quality
        self._skipped_s = 0.0
        self._lock = threading.Lock()

    def set(self, ms: int) -> None:
        with self._lock:
            self._skipped_s += max(0, ms - self._now) / 1000
            self._now = ms

    def advance(self, ms: int) -> None:
        self.set(self.now_ms() + ms)

    def now_ms(self) -> int:
        with self._lock:
            return self._now

    def quality(self) -> TimeQuality:
        return self._quality

    def monotonic(self) -> float:
        with self._lock:
            return time.monotonic() + self._skipped_s
