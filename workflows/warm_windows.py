"""Warm windows: "keep 2 warm on weekdays 09:00-18:00 Europe/Paris" (README.md "Warm windows").

An endpoint's `warm_windows` is text, one window a line:

    weekdays 09:00-18:00 Europe/Paris: 2
    Sat,Sun 10:00-14:00: 1
    daily 22:00-06:00 America/New_York: 1

- days: `daily` (or `every day`), `weekdays`, `weekends`, a day (`Mon`), a range (`Mon-Fri`) or a
  list (`Mon,Wed,Fri`); English names, three letters or whole, any case;
- a start and an end, 24-hour `HH:MM`; an end at or before the start runs past midnight (the
  window belongs to the day it starts);
- a time zone (IANA, e.g. `Europe/Paris`; left out: UTC), so daylight saving time moves the
  window with the local clock;
- `: N`, the instances kept running meanwhile (at least 1).

While a window is open its count is a floor, like min instances: that many are started at its
start and none of them is released for being idle; at its end the floor drops and the idle
retention applies again. The endpoint workflow keeps a timer on the next start or end
(`next_change`), so no Temporal Schedule is needed and the windows follow the spec's live edits.

Pure functions of the text and a time. The workflow asks `evaluate` through a local activity
(`warm_windows_now`) only when the text changed or the last answer's next change has come: the
time zone rules (tzdata) then live in its history, so a replay never depends on the tz database
of the machine that replays it. The web app calls them with the clock, the tests with any time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MAX_WINDOWS = 20
_LINE = re.compile(r"^(?P<days>.+?)\s+(?P<start>\d{1,2}:\d{2})\s*[-–]\s*(?P<end>\d{1,2}:\d{2})"
                   r"(?:\s+(?P<zone>[A-Za-z][A-Za-z0-9_+\-/]*))?\s*:\s*(?P<count>\d+)\s*$")
EXAMPLE = "weekdays 09:00-18:00 Europe/Paris: 2"


@dataclass(frozen=True)
class WarmWindow:
    days: frozenset[int]  # 0 = Monday
    start: time
    end: time
    zone: str
    instances: int
    text: str

    def tz(self):
        return timezone.utc if self.zone in ("", "UTC") else ZoneInfo(self.zone)

    def intervals(self, around: datetime, days_before: int = 1, days_after: int = 8):
        """The window's openings near `around` as (start, end) in UTC."""
        tz = self.tz()
        local_day = around.astimezone(tz).date()
        for offset in range(-days_before, days_after + 1):
            day = local_day + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            end_day = day if self.end > self.start else day + timedelta(days=1)
            yield (_utc(day, self.start, tz), _utc(end_day, self.end, tz))


def _utc(day: date, at: time, tz) -> datetime:
    return datetime.combine(day, at, tzinfo=tz).astimezone(timezone.utc)


def _day(token: str) -> int:
    token = token.strip().lower()
    if token in DAY_NAMES:
        return DAY_NAMES.index(token)
    if token in FULL_NAMES:
        return FULL_NAMES.index(token)
    raise ValueError(f"{token!r} is not a day (Mon, Tue, ... or Monday, ...)")


def _days(text: str) -> frozenset[int]:
    text = text.strip().lower()
    if text in ("daily", "every day", "everyday"):
        return frozenset(range(7))
    if text == "weekdays":
        return frozenset(range(5))
    if text == "weekends":
        return frozenset((5, 6))
    days: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            first, _, last = part.partition("-")
            a, b = _day(first), _day(last)
            days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
        else:
            days.add(_day(part))
    return frozenset(days)


def _clock(text: str) -> time:
    hours, _, minutes = text.partition(":")
    h, m = int(hours), int(minutes)
    if not (0 <= h <= 23 and 0 <= m <= 59):
        raise ValueError(f"{text!r} is not a time of day (00:00 to 23:59)")
    return time(h, m)


def parse(text: str, max_instances: int | None = None) -> list[WarmWindow]:
    """The windows of a spec's text. Raises ValueError naming the line and what to write."""
    windows = []
    lines = [(n, line.strip()) for n, line in enumerate((text or "").splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if len(lines) > MAX_WINDOWS:
        raise ValueError(f"at most {MAX_WINDOWS} windows, got {len(lines)}")
    for number, line in lines:
        where = f"line {number} ({line[:60]!r})"
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{where}: write DAYS HH:MM-HH:MM [TIME ZONE]: INSTANCES, e.g. {EXAMPLE}")
        try:
            days = _days(match["days"])
            start, end = _clock(match["start"]), _clock(match["end"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if start == end:
            raise ValueError(f"{where}: the start and the end are the same time; a window needs a length")
        zone = match["zone"] or "UTC"
        if zone != "UTC":
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{where}: {zone!r} is not a time zone; use an IANA name such as Europe/Paris "
                                 "or leave it out for UTC") from None
        count = int(match["count"])
        if count < 1:
            raise ValueError(f"{where}: keep at least 1 instance warm (or delete the line)")
        if max_instances is not None and count > max_instances:
            raise ValueError(f"{where}: {count} instances is more than max_instances ({max_instances})")
        windows.append(WarmWindow(days, start, end, zone, count, line))
    return windows


def warm_now(windows: list[WarmWindow], now: datetime) -> tuple[int, list[WarmWindow], datetime | None]:
    """(instances to keep warm now, the open windows, when that answer next changes)."""
    now = now.astimezone(timezone.utc)
    floor, open_now, changes = 0, [], []
    for window in windows:
        for start, end in window.intervals(now):
            if start <= now < end:
                floor = max(floor, window.instances)
                if window not in open_now:
                    open_now.append(window)
            changes.extend(t for t in (start, end) if t > now)
    return floor, open_now, (min(changes) if changes else None)


def evaluate(text: str, now: float, max_instances: int) -> tuple[int, list[str], float | None]:
    """What the endpoint workflow asks (through the `warm_windows_now` activity, so the time zone
    rules it depends on are recorded in its history): the instances the open windows keep now
    (at most max instances), their lines, and when that next changes (unix seconds)."""
    floor, open_now, next_change = warm_now(safe_parse(text), datetime.fromtimestamp(now, tz=timezone.utc))
    return min(floor, max_instances), [w.text for w in open_now], next_change.timestamp() if next_change else None


def safe_parse(text: str) -> list[WarmWindow]:
    """For the workflow: a spec the web app accepted parses; anything else counts as no window
    rather than failing a workflow task (workflows/lifecycle.py spec_problems says why)."""
    try:
        return parse(text)
    except ValueError:
        return []


def describe(window: WarmWindow, now: datetime) -> dict:
    """For the endpoint page: open or not, and the next start or end in the window's own zone."""
    now = now.astimezone(timezone.utc)
    tz = window.tz()
    for start, end in sorted(window.intervals(now)):
        if start <= now < end:
            return {"text": window.text, "instances": window.instances, "open": True,
                    "until": end.astimezone(tz).strftime("%a %H:%M %Z")}
        if start > now:
            return {"text": window.text, "instances": window.instances, "open": False,
                    "next": start.astimezone(tz).strftime("%a %d %b %H:%M %Z")}
    return {"text": window.text, "instances": window.instances, "open": False, "next": None}
