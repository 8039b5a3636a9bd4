"""Business days: the time zone, and the public holidays of mainland China
that move fuel demand (travel before and during, less freight)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

BUSINESS_TZ = ZoneInfo("Asia/Shanghai")

# Official holiday periods (放假), 2025-2027.
_PERIODS: list[tuple[str, str, str]] = [
    ("New Year", "2025-01-01", "2025-01-01"),
    ("Spring Festival", "2025-01-28", "2025-02-04"),
    ("Qingming", "2025-04-04", "2025-04-06"),
    ("Labour Day", "2025-05-01", "2025-05-05"),
    ("Dragon Boat", "2025-05-31", "2025-06-02"),
    ("National Day", "2025-10-01", "2025-10-08"),
    ("New Year", "2026-01-01", "2026-01-03"),
    ("Spring Festival", "2026-02-15", "2026-02-23"),
    ("Qingming", "2026-04-04", "2026-04-06"),
    ("Labour Day", "2026-05-01", "2026-05-05"),
    ("Dragon Boat", "2026-06-19", "2026-06-21"),
    ("Mid-Autumn", "2026-09-25", "2026-09-27"),
    ("National Day", "2026-10-01", "2026-10-07"),
    ("New Year", "2027-01-01", "2027-01-03"),
    ("Spring Festival", "2027-02-05", "2027-02-13"),
]


def _expand() -> dict[dt.date, str]:
    out: dict[dt.date, str] = {}
    for name, first, last in _PERIODS:
        day, end = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
        while day <= end:
            out[day] = name
            day += dt.timedelta(days=1)
    return out


HOLIDAYS = _expand()


def holiday(day: dt.date) -> str:
    """The holiday `day` falls in, or ''."""
    return HOLIDAYS.get(day, "")


def eve(day: dt.date) -> bool:
    """The last working day before a holiday period (the travel rush)."""
    return not holiday(day) and bool(holiday(day + dt.timedelta(days=1)))


def date_key(day: dt.date) -> int:
    return day.year * 10000 + day.month * 100 + day.day


def local(when: dt.datetime) -> dt.datetime:
    """Business-local wall time, naive (the warehouse's timestamps)."""
    return when.astimezone(BUSINESS_TZ).replace(tzinfo=None)
