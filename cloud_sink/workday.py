"""The work day a touch belongs to (pure): Asia/Tokyo local time, cut at a configurable hour.

With a cut at 04:00, a night shift from 22:00 to 03:00 lands on the day it started.
"""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

JST = ZoneInfo("Asia/Tokyo")


def work_day(ts_ms: int, cut_hour: int = 4, tz: ZoneInfo = JST) -> str:
    """UTC milliseconds -> 'YYYY-MM-DD' of the work day."""
    if not 0 <= cut_hour <= 23:
        raise ValueError("cut_hour must be 0..23")
    local = datetime.fromtimestamp(ts_ms / 1000, UTC).astimezone(tz)
    return (local - timedelta(hours=cut_hour)).date().isoformat()


def local_time(ts_ms: int, tz: ZoneInfo = JST) -> str:
    """UTC milliseconds -> 'HH:MM' local, for tables people read."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).astimezone(tz).strftime("%H:%M")


def local_date(ts_ms: int, tz: ZoneInfo = JST) -> str:
    """UTC milliseconds -> 'YYYY-MM-DD' local (the calendar date, no cut)."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).astimezone(tz).date().isoformat()


def jst_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """A wall-clock moment in Asia/Tokyo -> UTC milliseconds."""
    return int(datetime(year, month, day, hour, minute, second, tzinfo=JST).timestamp() * 1000)
