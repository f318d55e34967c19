"""The work day: Asia/Tokyo, cut at a configurable hour, so a night shift is one day."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sink.workday import JST, jst_ms, local_time, work_day


def test_night_shift_lands_on_the_day_it_started() -> None:
    assert work_day(jst_ms(2026, 11, 26, 22, 0), cut_hour=4) == "2026-11-26"
    assert work_day(jst_ms(2026, 11, 27, 3, 59), cut_hour=4) == "2026-11-26"
    assert work_day(jst_ms(2026, 11, 27, 4, 0), cut_hour=4) == "2026-11-27"
    assert work_day(jst_ms(2026, 11, 27, 0, 30), cut_hour=0) == "2026-11-27"


def test_utc_and_tokyo_differ_by_nine_hours() -> None:
    # 2026-11-26 20:00 UTC is 2026-11-27 05:00 in Tokyo
    ts = int(datetime(2026, 11, 26, 20, 0, tzinfo=UTC).timestamp() * 1000)
    assert work_day(ts, cut_hour=4) == "2026-11-27"
    assert local_time(ts) == "05:00"


@given(st.integers(0, 4_102_444_800_000), st.integers(0, 23))
def test_work_day_is_local_date_shifted_by_cut(ts: int, cut: int) -> None:
    local = datetime.fromtimestamp(ts / 1000, UTC).astimezone(JST)
    assert work_day(ts, cut) == (local - timedelta(hours=cut)).date().isoformat()
    # a work day is never after the local calendar day
    assert work_day(ts, cut) <= local.date().isoformat()


def test_cut_hour_is_checked() -> None:
    with pytest.raises(ValueError):
        work_day(0, 24)
