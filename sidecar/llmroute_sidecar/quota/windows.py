"""Calendar windows of day and month budgets, in UTC: pure arithmetic, mirrored by the Lua scripts.

A day is ``floor(unix seconds / 86400)`` (days since 1970-01-01); a month is ``year * 12 + month - 1``.
Each window ends at the next 00:00 UTC (day) or the next 1st 00:00 UTC (month). The civil-date
conversions are Howard Hinnant's ``days_from_civil`` / ``civil_from_days`` (proleptic Gregorian),
written out the same way in ``scripts.WINDOW_LUA`` so Redis (whose ``TIME`` decides there) and the
memory store agree to the microsecond.
"""

from __future__ import annotations

DAY_SECONDS = 86_400


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month 1-12, day 1-31) of ``days`` since 1970-01-01."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a civil date."""
    year -= 1 if month <= 2 else 0
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def day_window(now: float) -> tuple[int, float]:
    """(day id, end in unix seconds) of the UTC day holding ``now``."""
    day = int(now // DAY_SECONDS)
    return day, float((day + 1) * DAY_SECONDS)


def month_window(now: float) -> tuple[int, float]:
    """(month id, end in unix seconds) of the UTC month holding ``now``."""
    year, month, _ = civil_from_days(int(now // DAY_SECONDS))
    next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
    return year * 12 + month - 1, float(days_from_civil(next_year, next_month, 1) * DAY_SECONDS)
