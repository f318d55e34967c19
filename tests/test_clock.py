"""Clocks: the demo's ManualClock moves monotonic time with its wall-clock jumps."""

from hypothesis import given
from hypothesis import strategies as st

from edge.clock import ManualClock, SystemClock
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
