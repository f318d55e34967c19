"""Allowance periods: a day or a week, cut at a configurable hour in Asia/Tokyo (zoneinfo)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

TOKYO = "Asia/Tokyo"


@dataclass(frozen=True)
class PeriodSpec:
    """kind is "day" or "week"; a period starts at cut_hour local time (weeks on week_start, 0=Monday)."""

    kind: str = "day"
    cut_hour: int = 5
    tz: str = TOKYO
    week_start: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("day", "week"):
            raise ValueError(f"period kind must be 'day' or 'week', not {self.kind!r}")
        if not 0 <= self.cut_hour <= 23:
            raise ValueError(f"cut_hour must be 0..23, not {self.cut_hour!r}")
        if not 0 <= self.week_start <= 6:
            raise ValueError(f"week_start must be 0..6 (0=Monday), not {self.week_start!r}")
        ZoneInfo(self.tz)  # raises for an unknown zone

    def key(self, ts_ms: int) -> str:
        """The period a UTC millisecond timestamp falls in: 'D2026-11-27' or 'W2026-11-23'."""
        start = self.start_date(ts_ms)
        return ("D" if self.kind == "day" else "W") + start.isoformat()

    def start_date(self, ts_ms: int):  # -> datetime.date
        local = datetime.fromtimestamp(ts_ms / 1000, UTC).astimezone(ZoneInfo(self.tz))
        day = (local - timedelta(hours=self.cut_hour)).date()
        if self.kind == "week":
            day -= timedelta(days=(day.weekday() - self.week_start) % 7)
        return day

    def bounds_ms(self, ts_ms: int) -> tuple[int, int]:
        """[start, end) of the period holding ts_ms, in UTC milliseconds."""
        zone = ZoneInfo(self.tz)
        d = self.start_date(ts_ms)
        start = datetime(d.year, d.month, d.day, self.cut_hour, tzinfo=zone)
        length = timedelta(days=1 if self.kind == "day" else 7)
        nd = d + length
        end = datetime(nd.year, nd.month, nd.day, self.cut_hour, tzinfo=zone)
        return int(start.timestamp() * 1000), int(end.timestamp() * 1000)
