"""Cost maths (common/cost.py): prices, billed time ready -> stopped, this month's share."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from common.cost import billed_seconds, endpoint_usage, instance_usage, month_start, parse_prices

T0 = datetime(2026, 3, 31, 23, 0, 0, tzinfo=timezone.utc)


def row(ready=None, stopped=None, price=None, gpus=(), gpu_type="", gpu_seconds=0.0):
    return SimpleNamespace(ready_at=ready, stopped_at=stopped, price_per_hour=price, gpus=list(gpus),
                           gpu_type=gpu_type, gpu_seconds=gpu_seconds)


@pytest.mark.parametrize("text, gpu_type, count, per_hour", [
    ("T4=0.35,A100=2.93,cpu=0.05", "T4", 1, 0.35),
    ("T4=0.35,A100=2.93,cpu=0.05", "a100", 2, 5.86),  # any case; per GPU
    ("T4=0.35,A100=2.93,cpu=0.05", "", 0, 0.05),      # CPU only
    ("T4=0.35", "H100", 1, 0.0),                      # no price for that type
    ("", "T4", 1, 0.0),
    (" T4 = 0.35 , ", "T4", 1, 0.35),
])
def test_prices(text, gpu_type, count, per_hour):
    assert parse_prices(text).per_hour(gpu_type, count) == pytest.approx(per_hour)


@pytest.mark.parametrize("text", ["T4", "T4=", "T4=abc", "T4=-1", "=3", "T4=nan", "T4=inf"])
def test_bad_prices_say_what_to_write(text):
    with pytest.raises(ValueError, match="TYPE=price per hour"):
        parse_prices(text)


def test_billed_from_ready_to_stopped_never_before():
    ready, stopped = T0, T0 + timedelta(seconds=90)
    assert billed_seconds(None, None, T0) == 0  # queued or starting: nothing
    assert billed_seconds(ready, stopped, T0 + timedelta(hours=5)) == 90
    assert billed_seconds(ready, None, T0 + timedelta(seconds=30)) == 30  # running: up to now
    # naive datetimes (SQLite) are UTC
    assert billed_seconds(ready.replace(tzinfo=None), stopped.replace(tzinfo=None), T0) == 90


def test_a_running_instance_costs_more_each_second():
    inst = row(ready=T0, price=3.6)
    costs = [instance_usage(inst, T0 + timedelta(seconds=s)).cost for s in (1, 2, 10)]
    assert costs == pytest.approx([0.001, 0.002, 0.010])
    assert instance_usage(inst, T0).running


def test_this_month_counts_only_this_month():
    # Ready 23:00 on March 31, stopped 01:00 on April 1: two hours, one of them in April.
    inst = row(ready=T0, stopped=T0 + timedelta(hours=2), price=2.0)
    usage = instance_usage(inst, T0 + timedelta(hours=3))
    assert month_start(T0 + timedelta(hours=3)) == datetime(2026, 4, 1, tzinfo=timezone.utc)
    assert (usage.billed_seconds, usage.cost) == (7200, pytest.approx(4.0))
    assert (usage.month_billed_seconds, usage.month_cost) == (3600, pytest.approx(2.0))


def test_endpoint_sums_its_instances_and_an_old_row_gets_todays_price():
    prices = parse_prices("T4=1.8")
    old = row(ready=T0, stopped=T0 + timedelta(seconds=100), price=None, gpus=[0], gpu_type="T4")
    new = row(ready=T0, stopped=T0 + timedelta(seconds=100), price=3.6, gpus=[0, 1], gpu_type="T4")
    never_ready = row(price=None, gpus=[0], gpu_type="T4")
    usage = endpoint_usage([old, new, never_ready], T0 + timedelta(hours=1), prices)
    assert usage.cost == pytest.approx(100 * 1.8 / 3600 + 100 * 3.6 / 3600)
    assert usage.billed_seconds == 200
    assert not usage.running
