"""Warm windows (workflows/warm_windows.py): the text, when a window is open, the next change,
daylight saving time, and the lifecycle keeping the instances a window asks for."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from workflows import lifecycle as lc
from workflows.activity_types import LifecycleSpec
from workflows.warm_windows import describe, evaluate, parse, warm_now

UTC = timezone.utc
PARIS = "weekdays 09:00-18:00 Europe/Paris: 2"


@pytest.mark.parametrize("text, days, start, end, zone, count", [
    (PARIS, {0, 1, 2, 3, 4}, "09:00", "18:00", "Europe/Paris", 2),
    ("Mon-Fri 9:00-18:00 Europe/Paris: 2", {0, 1, 2, 3, 4}, "09:00", "18:00", "Europe/Paris", 2),
    ("sat,SUNDAY 10:00 - 14:00: 1", {5, 6}, "10:00", "14:00", "UTC", 1),
    ("daily 22:00-06:00 America/New_York: 3", set(range(7)), "22:00", "06:00", "America/New_York", 3),
    ("Fri-Mon 00:00-23:59: 1", {4, 5, 6, 0}, "00:00", "23:59", "UTC", 1),
    ("weekends 08:00–12:00 UTC: 1", {5, 6}, "08:00", "12:00", "UTC", 1),
])
def test_the_text(text, days, start, end, zone, count):
    [window] = parse(text)
    assert (set(window.days), window.start.strftime("%H:%M"), window.end.strftime("%H:%M"), window.zone,
            window.instances) == (days, start, end, zone, count)


@pytest.mark.parametrize("text, says", [
    ("weekdays 9-18: 2", "write DAYS HH:MM-HH:MM [TIME ZONE]: INSTANCES, e.g. weekdays 09:00-18:00 Europe/Paris: 2"),
    ("Moonday 09:00-10:00: 1", "'moonday' is not a day"),
    ("daily 25:00-26:00: 1", "'25:00' is not a time of day"),
    ("daily 09:00-09:00: 1", "a window needs a length"),
    ("daily 09:00-10:00 Mars/Olympus: 1", "'Mars/Olympus' is not a time zone"),
    ("daily 09:00-10:00: 0", "keep at least 1 instance warm"),
    ("daily 09:00-10:00: 5", "5 instances is more than max_instances (3)"),
    ("\n".join(["daily 09:00-10:00: 1"] * 21), "at most 20 windows"),
])
def test_bad_text_says_what_to_write(text, says):
    with pytest.raises(ValueError) as err:
        parse(text, max_instances=3)
    assert says in str(err.value)
    if "line" in str(err.value):
        assert str(err.value).startswith("line 1 (")


@pytest.mark.parametrize("now, floor, next_change", [
    # Monday 2026-03-02: Paris is UTC+1 in winter.
    (datetime(2026, 3, 2, 7, 59, tzinfo=UTC), 0, datetime(2026, 3, 2, 8, 0, tzinfo=UTC)),
    (datetime(2026, 3, 2, 8, 0, tzinfo=UTC), 2, datetime(2026, 3, 2, 17, 0, tzinfo=UTC)),
    (datetime(2026, 3, 2, 17, 0, tzinfo=UTC), 0, datetime(2026, 3, 3, 8, 0, tzinfo=UTC)),
    # Friday evening: next opening is Monday.
    (datetime(2026, 3, 6, 18, 0, tzinfo=UTC), 0, datetime(2026, 3, 9, 8, 0, tzinfo=UTC)),
    # Daylight saving time (March 29): 09:00 in Paris is 07:00 UTC from then on.
    (datetime(2026, 3, 30, 7, 0, tzinfo=UTC), 2, datetime(2026, 3, 30, 16, 0, tzinfo=UTC)),
])
def test_open_and_next_change(now, floor, next_change):
    assert warm_now(parse(PARIS), now)[0] == floor
    assert warm_now(parse(PARIS), now)[2] == next_change


def test_a_window_past_midnight_belongs_to_the_day_it_starts():
    windows = parse("Fri 22:00-02:00: 1")
    assert warm_now(windows, datetime(2026, 3, 7, 1, 0, tzinfo=UTC))[0] == 1  # Saturday 01:00
    assert warm_now(windows, datetime(2026, 3, 8, 1, 0, tzinfo=UTC))[0] == 0  # Sunday 01:00


def test_overlapping_windows_keep_the_larger_count():
    windows = parse("daily 08:00-12:00: 1\nweekdays 10:00-11:00: 3\n# a comment\n")
    floor, open_now, _ = warm_now(windows, datetime(2026, 3, 2, 10, 30, tzinfo=UTC))
    assert floor == 3 and len(open_now) == 2


def test_the_page_says_when_it_opens_and_until_when_it_is_open():
    [window] = parse(PARIS)
    assert describe(window, datetime(2026, 3, 2, 6, 0, tzinfo=UTC))["next"] == "Mon 02 Mar 09:00 CET"
    assert describe(window, datetime(2026, 3, 2, 9, 0, tzinfo=UTC)) == {
        "text": PARIS, "instances": 2, "open": True, "until": "Mon 18:00 CET"}


def test_the_lifecycle_keeps_what_an_open_window_asks_for():
    spec = LifecycleSpec(name="e", warm_windows=PARIS, max_instances=3, idle_retention_seconds=60)
    state = lc.EndpointState(spec=spec)
    monday_10_paris = datetime(2026, 3, 2, 9, 0, tzinfo=UTC).timestamp()
    state.warm, state.warm_open, state.warm_next = evaluate(PARIS, monday_10_paris, spec.max_instances)
    assert state.warm == 2 and state.warm_open == [PARIS]
    assert state.warm_next == datetime(2026, 3, 2, 17, 0, tzinfo=UTC).timestamp()
    assert lc.wanted_new_instances(state) == 2
    state.instances["a"] = lc.InstanceView("a", "ready", 0, created_at=0.0, ready_at=0.0)
    assert lc.idle_to_drain(state, monday_10_paris)[0] == []  # idle for hours, but the window keeps it
    state.warm = 0  # the window closed
    assert lc.idle_to_drain(state, monday_10_paris)[0] == ["a"]
