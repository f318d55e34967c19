"""Clocks: wall time in UTC milliseconds with a time-quality flag, and monotonic time.

Production uses SystemClock; the demo and tests inject a ManualClock so a whole site day
runs in seconds through the same agent code.

SystemClock's quality comes from the system's own sync state, the way `timedatectl` gets it:
the kernel's NTP status (adjtimex(2) with no modes: a read, no privilege), which chrony and
systemd-timesyncd keep up to date. Synced: the status lacks STA_UNSYNC and the kernel's
maximum error is under MAX_ERROR_US (it grows 0.5 ms a second without updates). Where
adjtimex cannot be called, `timedatectl show -p NTPSynchronized`, then timesyncd's flag file.
Not synced: `drifted` if it was synced before (seen by this process, or the flag file says so
since boot), else `never_synced`. The answer is cached for QUALITY_CACHE_S: it is asked at
every tap. The decision itself (`decide_quality`) and the parsers are pure.
"""

import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from protocol.timequality import TimeQuality

STA_UNSYNC = 0x0040            # <sys/timex.h>: the clock is not synchronized
TIME_ERROR = 5                 # adjtimex's answer for an unsynchronized clock
MAX_ERROR_US = 10_000_000      # past 10 s of maximum error a time is no longer a synced one
QUALITY_CACHE_S = 30.0
TIMESYNC_FLAG = "/run/systemd/timesync/synchronized"


class Clock(Protocol):
    def now_ms(self) -> int: ...

    def quality(self) -> TimeQuality: ...

    def monotonic(self) -> float: ...


@dataclass(frozen=True, slots=True)
class KernelTime:
    """What adjtimex(2) says about the system clock."""
    state: int          # TIME_OK (0) .. TIME_ERROR (5)
    status: int         # STA_* bits
    maxerror_us: int    # the kernel's maximum error estimate


@dataclass(frozen=True, slots=True)
class SyncSources:
    kernel: KernelTime | None   # None: adjtimex unavailable
    ntp: bool | None            # timedatectl's NTPSynchronized; None: not asked or no answer
    flag_file: bool             # timesyncd's "synchronized since boot" flag


class _Timex(ctypes.Structure):
    # struct timex up to `status`; the rest (time, tick, pps..., tai, padding) differs between
    # ABIs and is never read, so it is one generous buffer the call may fill
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("rest", ctypes.c_char * 512)]


_libc: list[ctypes.CDLL] = []  # loaded once


def kernel_time() -> KernelTime | None:
    """adjtimex(2) with modes 0 (read only); None where there is no such call."""
    try:
        if not _libc:
            _libc.append(ctypes.CDLL(None, use_errno=True))
        tx = _Timex()
        state = _libc[0].adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return KernelTime(state, tx.status, tx.maxerror)


def parse_timedatectl(output: str) -> bool | None:
    """`timedatectl show -p NTPSynchronized` -> True / False; None for anything else."""
    for line in output.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "NTPSynchronized":
            return {"yes": True, "no": False}.get(value.strip())
    return None


def timedatectl_synced(timeout_s: float = 2.0) -> bool | None:
    try:
        r = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized"],
                           capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_timedatectl(r.stdout) if r.returncode == 0 else None


def read_sources() -> SyncSources:
    """The system's sync state; timedatectl is asked only where adjtimex cannot be."""
    kernel = kernel_time()
    return SyncSources(kernel, timedatectl_synced() if kernel is None else None,
                       os.path.exists(TIMESYNC_FLAG))


def decide_quality(src: SyncSources, was_synced: bool = False) -> TimeQuality:
    """Pure: the time quality a touch carries, from what the system says."""
    if src.kernel is not None:
        k = src.kernel
        synced = (k.state != TIME_ERROR and not k.status & STA_UNSYNC
                  and 0 <= k.maxerror_us < MAX_ERROR_US)
    elif src.ntp is not None:
        synced = src.ntp
    else:
        synced = src.flag_file
    if synced:
        return TimeQuality.SYNCED
    return TimeQuality.DRIFTED if was_synced or src.flag_file else TimeQuality.NEVER_SYNCED


class SystemClock:
    """The real clock. Quality from the system's sync state (see the module docstring), or
    'synced' whatever it says when configured to trust it (`[clock] assume_synced`)."""

    def __init__(self, assume_synced: bool = False, *,
                 sources: Callable[[], SyncSources] = read_sources,
                 cache_s: float = QUALITY_CACHE_S) -> None:
        self._assume = assume_synced
        self._sources, self._cache_s = sources, cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, TimeQuality] | None = None
        self._was_synced = False

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def quality(self) -> TimeQuality:
        if self._assume:
            return TimeQuality.SYNCED
        now = time.monotonic()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self._cache_s:
                return self._cached[1]
            q = decide_quality(self._sources(), self._was_synced)
            self._was_synced = self._was_synced or q is TimeQuality.SYNCED
            self._cached = (now, q)
            return q

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
