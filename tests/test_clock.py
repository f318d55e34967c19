"""Clocks: the demo's ManualClock moves monotonic time with its wall-clock jumps; SystemClock's
quality comes from the kernel's sync state (recorded adjtimex and timedatectl answers, and the
real call on this machine)."""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.clock import (
    KernelTime,
    ManualClock,
    SyncSources,
    SystemClock,
    decide_quality,
    kernel_time,
    parse_timedatectl,
    read_sources,
)
from edge.decision import Debouncer
from protocol.timequality import TimeQuality


@given(st.lists(st.integers(-10_000, 10_000_000), max_size=20))
def test_manual_monotonic_never_goes_back_and_follows_forward_jumps(steps: list[int]) -> None:
    c = ManualClock(1_000_000)
    last_mono = c.monotonic()
    for step in steps:
        before_wall = c.now_ms()
        c.set(before_wall + step)
        mono = c.monotonic()
        assert mono >= last_mono + max(0, step) / 1000 - 1e-6
        assert c.now_ms() == before_wall + step
        last_mono = mono


def test_a_simulated_afternoon_clears_the_retap_window() -> None:
    c, d = ManualClock(0), Debouncer(2.0)
    assert d.is_new_tap(b"card", c.monotonic())
    c.advance(600)
    assert not d.is_new_tap(b"card", c.monotonic())   # a second tap 0.6 s later: same tap
    c.advance(3 * 3600 * 1000)
    assert d.is_new_tap(b"card", c.monotonic())       # three hours later: a new tap


def test_system_clock_quality_can_be_trusted_by_config() -> None:
    assert SystemClock(assume_synced=True).quality() is TimeQuality.SYNCED
    assert abs(SystemClock().now_ms() - ManualClock(SystemClock().now_ms()).now_ms()) < 1000


# -- clock quality from the system's own sync state (issue 13 #9) ---------------------------
# adjtimex(2) answers (state, status, maxerror_us): typical ones, and UNSYNCED_BOOT as read on
# this development VM (no time daemon in its container)
SYNCED_CHRONY = KernelTime(0, 0x2001, 502_000)      # STA_PLL | STA_NANO, chronyd tracking
SYNCED_TIMESYNCD = KernelTime(0, 0x0001, 1_024_500)  # STA_PLL, 2048 s after the last poll
UNSYNCED_BOOT = KernelTime(5, 0x0040, 16_000_000)    # STA_UNSYNC: no daemon (this machine)
STALE = KernelTime(0, 0x0001, 12_000_000)            # no update for ~6.6 h: error past 10 s


@pytest.mark.parametrize("src, was, want", [
    (SyncSources(SYNCED_CHRONY, None, False), False, TimeQuality.SYNCED),
    (SyncSources(SYNCED_TIMESYNCD, None, True), False, TimeQuality.SYNCED),
    (SyncSources(UNSYNCED_BOOT, None, False), False, TimeQuality.NEVER_SYNCED),
    (SyncSources(UNSYNCED_BOOT, None, False), True, TimeQuality.DRIFTED),
    (SyncSources(UNSYNCED_BOOT, None, True), False, TimeQuality.DRIFTED),  # synced since boot
    (SyncSources(STALE, None, False), True, TimeQuality.DRIFTED),
    (SyncSources(KernelTime(1, 0x0011, 5_000), None, False), False, TimeQuality.SYNCED),  # leap
    (SyncSources(None, True, False), False, TimeQuality.SYNCED),        # timedatectl's word
    (SyncSources(None, False, False), False, TimeQuality.NEVER_SYNCED),
    (SyncSources(None, None, True), False, TimeQuality.SYNCED),         # only the flag file
    (SyncSources(None, None, False), False, TimeQuality.NEVER_SYNCED),
])
def test_quality_decision(src: SyncSources, was: bool, want: TimeQuality) -> None:
    assert decide_quality(src, was) is want


@pytest.mark.parametrize("out, want", [
    ("NTPSynchronized=yes\n", True),
    ("NTPSynchronized=no\n", False),
    ("NTP=yes\nNTPSynchronized=yes\nTimeUSec=Tue 2026-12-01 21:52:50 UTC\n", True),
    ("", None),
    ("System has not been booted with systemd as init system (PID 1). Can't operate.\n", None),
    ("NTPSynchronized=maybe\n", None),
])
def test_timedatectl_output(out: str, want: bool | None) -> None:
    assert parse_timedatectl(out) is want


def test_real_system_quality_is_read_cheaply_and_cached() -> None:
    k = kernel_time()
    assert k is not None and 0 <= k.state <= 5 and k.maxerror_us >= 0  # Linux: adjtimex works
    calls: list[int] = []

    def sources() -> SyncSources:
        calls.append(1)
        return read_sources()

    c = SystemClock(sources=sources)
    t0 = time.perf_counter()
    q = [c.quality() for _ in range(1000)]
    assert q[0] in set(TimeQuality) and len(set(q)) == 1
    assert calls == [1] and time.perf_counter() - t0 < 0.5  # one system call for a thousand taps
    assert decide_quality(read_sources()) is q[0]


def test_a_clock_that_loses_sync_reports_drifted() -> None:
    answers = iter([SyncSources(SYNCED_CHRONY, None, False), SyncSources(UNSYNCED_BOOT, None, False)])
    c = SystemClock(sources=lambda: next(answers), cache_s=0.0)
    assert c.quality() is TimeQuality.SYNCED
    assert c.quality() is TimeQuality.DRIFTED
