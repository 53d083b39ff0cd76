"""The autoscaler's maths (workflows/autoscale.py) and how the lifecycle uses its answer
(workflows/lifecycle.py), table-driven: windows, the panic window, the scale-down delay, the HPA
rule with its tolerance, clamping, and which instances go."""
from __future__ import annotations

import pytest

from workflows import autoscale as asc
from workflows import lifecycle as lc
from workflows.activity_types import LifecycleSpec
from workflows.traffic_types import InstanceTraffic, TrafficReport


class Proxy:
    """A proxy process as the workflow sees it: reports of its growing request-seconds."""

    def __init__(self, state: asc.AutoscaleState, name: str = "proxy:1", keep: float = 200.0):
        self.state, self.name, self.keep = state, name, keep
        self.raw, self.at, self.current = 0.0, None, 0

    def hold(self, load: int, start: float, end: float, every: float = 1.0) -> None:
        """`load` requests in flight from `start` to `end`, reported every `every` seconds."""
        t = start
        if self.at is None or self.at < start:
            self.report(start, load)
        while t + every <= end + 1e-9:
            t += every
            self.raw += load * every
            self.report(t, load)

    def report(self, at: float, current: int) -> None:
        self.at, self.current = at, current
        asc.observe_load(self.state, self.name, at, self.raw, current, self.keep)


def inputs(now, **kw) -> asc.Inputs:
    base = dict(now=now, min_instances=0, max_instances=10, ready=1, active=1, target_concurrency=5,
                window_seconds=60.0, scale_down_delay_seconds=30.0)
    base.update(kw)
    return asc.Inputs(**base)


# ---------------------------------------------------------------- averages


@pytest.mark.parametrize("load, seconds, window, expected", [
    (6, 60, 60, 6.0),     # steady: the average is the load
    (6, 30, 60, 3.0),     # half the window loaded
    (14, 60, 6, 14.0),    # the panic window sees the same steady load
    (0, 60, 60, 0.0),
])
def test_average_concurrency_over_a_window(load, seconds, window, expected):
    state = asc.AutoscaleState()
    Proxy(state).hold(load, 1000.0 - seconds, 1000.0)
    assert asc.average_concurrency(state, 1000.0, window) == pytest.approx(expected)


def test_a_silent_proxy_with_requests_in_flight_still_counts_them():
    # Reports come every 10 s while nothing changes: between them its in-flight count holds.
    state = asc.AutoscaleState()
    proxy = Proxy(state)
    proxy.report(100.0, 4)
    assert asc.average_concurrency(state, 110.0, 10.0) == pytest.approx(4.0)
    # ... but not forever: a proxy silent past STALE_REPORT_SECONDS is not extrapolated further.
    assert asc.average_concurrency(state, 100.0 + asc.STALE_REPORT_SECONDS + 30, 30.0) == pytest.approx(0.0)


def test_proxies_add_up_and_a_restarted_proxy_is_a_counter_reset():
    state = asc.AutoscaleState()
    Proxy(state, "a").hold(3, 0.0, 60.0)
    b = Proxy(state, "b")
    b.hold(2, 0.0, 30.0)
    b.raw = 0.0  # restarted at 30 s: its count starts again from zero
    b.hold(2, 30.0, 60.0)
    assert asc.average_concurrency(state, 60.0, 60.0) == pytest.approx(5.0)


def test_late_reports_are_ignored():
    state = asc.AutoscaleState()
    asc.observe_load(state, "p", 10.0, 50.0, 5, 100)
    asc.observe_load(state, "p", 9.0, 20.0, 1, 100)
    assert [s.at for s in state.samples["p"]] == [10.0]


# ---------------------------------------------------------------- concurrency decisions


def test_the_issues_example_14_in_flight_over_2_instances_target_5_is_3():
    state = asc.AutoscaleState()
    Proxy(state).hold(14, 0.0, 60.0)
    decision = asc.decide(state, inputs(60.0, ready=2, active=2))
    assert decision.desired == 3 and decision.changed and not decision.panic
    assert decision.message == "in-flight 14.0 (60s average) over 2 ready instances, target 5 per instance: " \
                               "2 -> 3 instances"


@pytest.mark.parametrize("quiet, burst, ready, panic, desired", [
    # A burst doubling what the ready instances can take within the panic window: panic, at once.
    (2, 20, 1, True, 4),
    # From zero (no instance ready yet): held requests count, one instance is the yardstick.
    (0, 6, 0, True, 2),
    # A rise that does not ask for twice the ready instances: no panic, the stable window decides.
    (5, 8, 2, False, 2),
])
def test_panic_window(quiet, burst, ready, panic, desired):
    state = asc.AutoscaleState()
    proxy = Proxy(state)
    proxy.hold(quiet, 0.0, 54.0)
    proxy.hold(burst, 54.0, 60.0)  # the last 6 s: the panic window of a 60 s window
    decision = asc.decide(state, inputs(60.0, target_concurrency=5 if quiet != 0 else 3, ready=ready,
                                        active=max(ready, 1)))
    assert decision.panic is panic
    assert decision.desired == desired, decision.message
    if panic:
        assert decision.message.startswith("panic: in-flight")


def test_panic_never_scales_down_and_ends_after_a_calm_window():
    state = asc.AutoscaleState()
    proxy = Proxy(state)
    proxy.hold(2, 0.0, 54.0)
    proxy.hold(20, 54.0, 60.0)
    assert asc.decide(state, inputs(60.0)).desired == 4
    proxy.hold(0, 60.0, 70.0)  # the burst is over
    late = asc.decide(state, inputs(70.0, ready=4, active=4))
    assert late.panic and late.desired == 4  # in panic nothing goes down
    proxy.hold(0, 70.0, 125.0)
    assert asc.decide(state, inputs(119.0, ready=4, active=4)).panic  # panic lasts a window past the burst
    calm = asc.decide(state, inputs(125.0, ready=4, active=4))
    assert not calm.panic
    assert calm.desired == 4  # now the scale-down delay holds it (see below)


@pytest.mark.parametrize("delay, after, desired", [
    (30.0, 10.0, 3),   # within the delay: still the highest recent answer
    (30.0, 31.0, 1),   # past it: down to what the load needs
    (0.0, 11.0, 1),    # no delay: as soon as the window shows the lower load
])
def test_scale_down_is_delayed(delay, after, desired):
    state = asc.AutoscaleState()
    proxy = Proxy(state)
    proxy.hold(14, 0.0, 60.0)
    assert asc.decide(state, inputs(60.0, ready=2, active=2, scale_down_delay_seconds=delay,
                                    window_seconds=10.0)).desired == 3  # no panic: 3 < 2 x 2
    proxy.hold(4, 60.0, 60.0 + after)
    decision = asc.decide(state, inputs(60.0 + after, ready=3, active=3, scale_down_delay_seconds=delay,
                                        window_seconds=10.0))
    assert decision.desired == desired, decision.message
    if desired == 3:
        assert f"scale-down delayed {delay:g}s: keeping 3" in decision.message


@pytest.mark.parametrize("load, minimum, maximum, desired, note", [
    (40, 0, 3, 3, "max instances 3"),
    (0, 2, 10, 2, "min instances 2"),
    (5, 0, 10, 1, ""),
])
def test_answers_stay_within_min_and_max(load, minimum, maximum, desired, note):
    state = asc.AutoscaleState()
    Proxy(state).hold(load, 0.0, 60.0)
    decision = asc.decide(state, inputs(60.0, min_instances=minimum, max_instances=maximum,
                                        scale_down_delay_seconds=0.0))
    assert decision.desired == desired
    assert note in decision.message


def test_an_unchanged_answer_is_not_a_new_decision():
    state = asc.AutoscaleState()
    Proxy(state).hold(14, 0.0, 60.0)
    assert asc.decide(state, inputs(60.0, ready=2, active=2)).changed
    assert not asc.decide(state, inputs(61.0, ready=3, active=3)).changed


# ---------------------------------------------------------------- utilisation (HPA)


@pytest.mark.parametrize("current, utilisation, target, starting, desired", [
    (1, 100, 50, 0, 2),    # ceil(1 x 100/50)
    (2, 95, 50, 0, 4),
    (4, 30, 60, 0, 2),     # down: ceil(4 x 0.5)
    (2, 54, 50, 0, 2),     # within the 10% tolerance: unchanged
    (2, 46, 50, 0, 2),
    (2, 100, 50, 1, 2),    # one of the two is still starting (counted idle): 50% is on target
    (3, 100, 50, 1, 4),    # two measured at 100% of three: ceil(3 x 66.7/50)
])
def test_hpa_rule(current, utilisation, target, starting, desired):
    assert asc.hpa_desired(current, utilisation, target, starting) == desired


def _usage(state, now, **by_instance):
    asc.observe_usage(state, asc.UsageReport("host", now, [
        asc.InstanceUsage(iid, cpu_percent=cpu, at=now) for iid, cpu in by_instance.items()]))


def test_cpu_target_scales_one_to_two_and_names_its_inputs():
    state = asc.AutoscaleState()
    _usage(state, 100.0, a=97.0)
    decision = asc.decide(state, inputs(100.0, target_concurrency=0, target_cpu_percent=50, min_instances=1,
                                        ready_ids=("a",)))
    assert decision.desired == 2
    assert decision.message == "CPU 97% (average of 1 instance), target 50%: 1 -> 2 instances"


def test_stale_usage_and_draining_instances_are_not_read():
    state = asc.AutoscaleState()
    _usage(state, 100.0, a=97.0, b=99.0)
    inp = inputs(100.0 + asc.USAGE_FRESH_SECONDS + 1, target_concurrency=0, target_cpu_percent=50, min_instances=1,
                 ready_ids=("a",))
    decision = asc.decide(state, inp)
    assert decision.desired == 1 and decision.message.startswith("no target has data yet")


def test_several_targets_take_the_largest_answer():
    state = asc.AutoscaleState()
    Proxy(state).hold(6, 0.0, 60.0)  # concurrency: ceil(6/5) = 2
    _usage(state, 60.0, a=90.0, b=90.0)  # CPU: ceil(2 x 90/60) = 3
    decision = asc.decide(state, inputs(60.0, ready=2, active=2, target_cpu_percent=60, ready_ids=("a", "b")))
    assert decision.desired == 3
    assert decision.message.startswith("in-flight 6.0 (60s average) over 2 ready instances, target 5 per "
                                       "instance -> 2; CPU 90% (average of 2 instances), target 60% -> 3: ")


# ---------------------------------------------------------------- when to look again, what goes


def test_the_workflow_looks_again_while_load_is_in_the_window_and_not_when_idle():
    state = asc.AutoscaleState()
    assert asc.next_look(state, inputs(0.0)) is None
    proxy = Proxy(state)
    proxy.hold(3, 0.0, 10.0)
    asc.decide(state, inputs(10.0))
    assert asc.next_look(state, inputs(10.0)) == 10.0 + asc.TICK_SECONDS
    proxy.report(10.0 + 1, 0)
    late = inputs(200.0, scale_down_delay_seconds=0.0)
    asc.decide(state, late)
    assert asc.next_look(state, late) is None  # load gone, answer at min: no timer


@pytest.mark.parametrize("desired, minimum, active, drained", [
    (1, 0, 3, 2), (0, 0, 3, 2), (0, 0, 1, 0),  # never the last one (idle retention's job)
    (2, 3, 4, 1), (5, 0, 3, 0),
])
def test_surplus(desired, minimum, active, drained):
    assert asc.surplus(desired, minimum, active) == drained


# ---------------------------------------------------------------- in the lifecycle


def _endpoint(instances: dict[str, str], **spec) -> lc.EndpointState:
    spec = LifecycleSpec(name="e", **{"autoscaling": True, "target_concurrency": 2, "max_instances": 5,
                                      "idle_retention_seconds": 600, **spec})
    state = lc.EndpointState(spec=spec)
    for iid, status in instances.items():
        state.instances[iid] = lc.InstanceView(iid, status, 0, created_at=0.0, ready_at=0.0 if status == "ready" else None)
    return state


def test_the_lifecycle_starts_what_the_autoscaler_wants_and_keeps_it_from_idle_release():
    state = _endpoint({"a": "ready"})
    state.autoscale.desired = 3
    assert lc.wanted_new_instances(state) == 2
    # Idle for longer than the retention, but wanted: kept.
    drain, _ = lc.idle_to_drain(state, 10_000.0)
    assert drain == []
    state.spec.autoscaling = False  # off: the old rules, exactly
    assert lc.wanted_new_instances(state) == 0
    assert lc.idle_to_drain(state, 10_000.0)[0] == ["a"]


def test_surplus_instances_go_least_busy_first():
    state = _endpoint({"a": "ready", "b": "ready", "c": "ready"})
    state.traffic["p"] = TrafficReport("p", 1, 100.0, [InstanceTraffic("a", 3, 99.0), InstanceTraffic("b", 0, 50.0),
                                                       InstanceTraffic("c", 1, 99.0)])
    state.autoscale.desired = 1
    assert lc.autoscale_surplus(state, 100.0) == ["b", "c"]
    state.autoscale.desired = 0
    assert lc.autoscale_surplus(state, 100.0) == ["b", "c"]  # the last one stays


def test_traffic_reports_feed_the_autoscaler_only_when_it_is_on():
    state = _endpoint({"a": "ready"})
    lc.observe_traffic_load(state, TrafficReport("p", 1, 10.0, [InstanceTraffic("a", 4, 10.0)], held=2,
                                                 load_seconds=7.0))
    assert state.autoscale.samples["p"][0].current == 6
    off = _endpoint({"a": "ready"}, autoscaling=False)
    lc.observe_traffic_load(off, TrafficReport("p", 1, 10.0, [], load_seconds=7.0))
    assert off.autoscale.samples == {}
