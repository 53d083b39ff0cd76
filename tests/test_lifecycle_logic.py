"""Unit tests for workflows/lifecycle.py: the endpoint's decisions as pure functions."""
from __future__ import annotations

import pytest

from workflows import lifecycle as lc
from workflows.activity_types import LifecycleSpec
from workflows.traffic_types import InstanceTraffic, TrafficReport

NOW = 1_000_000.0


def make_state(*, min_instances=0, max_instances=3, idle=60, grace=0.0, desired=lc.SERVING, **kw) -> lc.EndpointState:
    spec = LifecycleSpec(name="ep", min_instances=min_instances, max_instances=max_instances,
                         idle_retention_seconds=idle, drain_grace_seconds=grace)
    return lc.EndpointState(spec=spec, desired=desired, **kw)


def add(state: lc.EndpointState, iid: str, status: str, *, created_at=NOW - 1000, ready_at=None, **kw):
    if status in (lc.I_READY, lc.I_DRAINING) and ready_at is None:
        ready_at = created_at + 10
    view = lc.InstanceView(id=iid, status=status, generation=state.generation, created_at=created_at,
                           ready_at=ready_at, **kw)
    state.instances[iid] = view
    return view


def report(state: lc.EndpointState, reporter: str, sent_at: float, seq: int = 1, **per_instance):
    """per_instance: iid=(in_flight, last_request_at)."""
    state.traffic[reporter] = TrafficReport(
        reporter=reporter, seq=seq, sent_at=sent_at,
        instances=[InstanceTraffic(iid, in_flight=f, last_request_at=t) for iid, (f, t) in per_instance.items()])


# ---------------------------------------------------------------- derive_status
@pytest.mark.parametrize("statuses, expected", [
    ([], lc.STANDBY),
    ([lc.I_STOPPED, lc.I_FAILED], lc.STANDBY),  # ended instances do not count
    ([lc.I_STOPPING], lc.STANDBY),  # an idle release on its way out
    ([lc.I_QUEUED], lc.QUEUED),
    ([lc.I_NEW], lc.STARTING),
    ([lc.I_PROVISIONING], lc.STARTING),
    ([lc.I_STARTING], lc.STARTING),
    ([lc.I_QUEUED, lc.I_STARTING], lc.STARTING),  # one is making progress
    ([lc.I_READY], lc.RUNNING),
    ([lc.I_DRAINING], lc.RUNNING),  # still serves until released
    ([lc.I_READY, lc.I_QUEUED, lc.I_STARTING], lc.RUNNING),
])
def test_derive_status_serving(statuses, expected):
    state = make_state()
    for n, status in enumerate(statuses):
        add(state, f"i{n}", status)
    assert lc.derive_status(state) == expected


def test_derive_status_stop_is_stopping_until_nothing_lives():
    state = make_state(desired=lc.WANT_STOPPED)
    add(state, "a", lc.I_READY)
    add(state, "b", lc.I_STOPPED)
    assert lc.derive_status(state) == lc.STOPPING
    state.instances["a"].status = lc.I_STOPPING
    assert lc.derive_status(state) == lc.STOPPING
    state.instances["a"].status = lc.I_STOPPED
    assert lc.derive_status(state) == lc.STOPPED


def test_derive_status_failed_and_terminated_win_over_instances():
    state = make_state(desired=lc.WANT_FAILED)
    add(state, "a", lc.I_READY)
    assert lc.derive_status(state) == lc.FAILED
    state.instances.clear()
    assert lc.derive_status(state) == lc.FAILED
    # `terminated` is only written by the purge: until then the endpoint is stopping.
    state.desired = lc.WANT_TERMINATED
    assert lc.derive_status(state) == lc.STOPPING
    add(state, "b", lc.I_READY)
    assert lc.derive_status(state) == lc.STOPPING


# ---------------------------------------------------------------- wanted_new_instances
def test_wanted_honours_min_instances():
    state = make_state(min_instances=2)
    assert lc.wanted_new_instances(state) == 2
    add(state, "a", lc.I_STARTING)
    assert lc.wanted_new_instances(state) == 1
    add(state, "b", lc.I_QUEUED)
    assert lc.wanted_new_instances(state) == 0


def test_wanted_wake_pending_asks_for_one():
    state = make_state()
    assert lc.wanted_new_instances(state) == 0
    state.wake_pending = True
    assert lc.wanted_new_instances(state) == 1
    add(state, "a", lc.I_NEW)
    assert lc.wanted_new_instances(state) == 0
    # A wake on top of min instances does not add one more.
    state = make_state(min_instances=2, wake_pending=True)
    assert lc.wanted_new_instances(state) == 2


def test_wanted_replaces_instances_on_their_way_out():
    state = make_state(min_instances=1)
    add(state, "a", lc.I_READY, release_sent=True)
    add(state, "b", lc.I_STOPPED)
    assert lc.wanted_new_instances(state) == 1


def test_wanted_capped_by_max_instances_counting_live_ones():
    state = make_state(min_instances=3, max_instances=2)
    assert lc.wanted_new_instances(state) == 2
    # An instance still stopping holds its slot until it has ended.
    add(state, "a", lc.I_STOPPING)
    assert lc.wanted_new_instances(state) == 1
    add(state, "b", lc.I_READY)
    assert lc.wanted_new_instances(state) == 0


def test_wake_while_only_instance_drains_at_max_keeps_it():
    """Demand returns while the only instance (max 1) drains: the workflow should undrain it
    (each wanted instance is an undrain first). Undraining adds no live instance, so the
    max-instances room must not block it; else the wake waits for the release and a cold start."""
    state = make_state(max_instances=1, wake_pending=True)
    add(state, "a", lc.I_DRAINING, draining_since=NOW - 1)
    assert lc.wanted_new_instances(state) == 1


def test_undrained_instance_is_not_drained_again_at_once():
    """Regression: EndpointWorkflow._undrain_one set the instance ready but left `wake_pending`
    set and its idle clock at ready_at, so the same reconcile drained it again, and every drain
    grace after, wanted_new_instances undrained it again: never released, never back to standby.
    Keeping an instance must answer the wake and restart its idle clock (`lc.undrain`)."""
    state = make_state(max_instances=2, idle=60, wake_pending=True)
    view = add(state, "a", lc.I_DRAINING, ready_at=NOW - 900, draining_since=NOW - 1)
    assert lc.wanted_new_instances(state) == 1  # the workflow undrains before it starts one
    lc.undrain(state, view, NOW)
    assert view.status == lc.I_READY and view.draining_since is None
    assert lc.routable(state) == [view] and not state.wake_pending
    # A fixed point: nothing to start, nothing to drain until the retention passes again.
    assert lc.wanted_new_instances(state) == 0
    assert lc.idle_to_drain(state, NOW) == ([], NOW + 60)
    assert lc.idle_to_drain(state, NOW + 60) == (["a"], None)


@pytest.mark.parametrize("desired", [lc.WANT_STOPPED, lc.WANT_FAILED, lc.WANT_TERMINATED])
def test_wanted_nothing_unless_serving(desired):
    state = make_state(min_instances=2, desired=desired, wake_pending=True)
    assert lc.wanted_new_instances(state) == 0


def test_wanted_nothing_while_restart_releases_old_generation():
    state = make_state(min_instances=1, restart_pending=True, wake_pending=True)
    assert lc.wanted_new_instances(state) == 0


# ---------------------------------------------------------------- idle_to_drain
def test_idle_retention_counts_from_ready_then_from_last_request():
    state = make_state(idle=60)
    add(state, "a", lc.I_READY, ready_at=NOW - 30)
    drain, next_check = lc.idle_to_drain(state, NOW)
    assert drain == [] and next_check == NOW + 30
    assert lc.idle_to_drain(state, NOW + 30) == (["a"], None)  # exactly due
    # A request 10 s ago pushes the release to 50 s from now.
    report(state, "p1", sent_at=NOW, a=(0, NOW - 10))
    assert lc.idle_to_drain(state, NOW) == ([], NOW + 50)


def test_drain_begins_a_grace_early_so_the_release_lands_on_the_retention():
    state = make_state(idle=60, grace=2.0)
    add(state, "a", lc.I_READY, ready_at=NOW - 50)
    assert lc.idle_to_drain(state, NOW) == ([], NOW + 8)  # 60 - 50 - 2
    assert lc.idle_to_drain(state, NOW + 8) == (["a"], None)
    state.instances["a"].status, state.instances["a"].draining_since = lc.I_DRAINING, NOW + 8
    # Released exactly when the retention ends: last activity + 60 s.
    assert lc.drained(state, NOW + 8) == ([], NOW + 10)
    assert lc.drained(state, NOW + 10) == (["a"], None)
    # A retention shorter than the grace drains as soon as the instance is idle.
    short = make_state(idle=1, grace=2.0)
    add(short, "b", lc.I_READY, ready_at=NOW)
    assert lc.idle_to_drain(short, NOW) == (["b"], None)


def test_idle_never_drains_below_min_instances():
    state = make_state(min_instances=1, idle=60)
    add(state, "a", lc.I_READY, ready_at=NOW - 500)
    assert lc.idle_to_drain(state, NOW) == ([], None)
    state.spec.min_instances = 0
    assert lc.idle_to_drain(state, NOW) == (["a"], None)


def test_idle_drains_longest_idle_first_and_keeps_min():
    state = make_state(min_instances=1, idle=60)
    add(state, "recent", lc.I_READY, ready_at=NOW - 100)
    add(state, "oldest", lc.I_READY, ready_at=NOW - 900)
    add(state, "middle", lc.I_READY, ready_at=NOW - 400)
    drain, _ = lc.idle_to_drain(state, NOW)
    assert drain == ["oldest", "middle"]


def test_idle_counts_instances_already_draining_as_gone():
    state = make_state(min_instances=1, idle=60)
    add(state, "a", lc.I_READY, ready_at=NOW - 900)
    add(state, "b", lc.I_DRAINING, ready_at=NOW - 900, draining_since=NOW - 1)
    # b is leaving: a is the one kept for min instances.
    assert lc.idle_to_drain(state, NOW) == ([], None)


def test_idle_in_flight_blocks_drain_even_when_request_started_long_ago():
    state = make_state(idle=60)
    add(state, "a", lc.I_READY, ready_at=NOW - 900)
    add(state, "b", lc.I_READY, ready_at=NOW - 900)
    report(state, "p1", sent_at=NOW - 5, a=(1, NOW - 500), b=(0, NOW - 500))
    drain, next_check = lc.idle_to_drain(state, NOW)
    assert drain == ["b"]
    assert next_check is None  # the next traffic report re-evaluates a


def test_idle_next_check_is_earliest_due():
    state = make_state(idle=60)
    add(state, "a", lc.I_READY, ready_at=NOW - 10)
    add(state, "b", lc.I_READY, ready_at=NOW - 40)
    assert lc.idle_to_drain(state, NOW) == ([], NOW + 20)


def test_idle_ignores_unready_and_released_instances_and_non_serving():
    state = make_state(idle=60)
    add(state, "s", lc.I_STARTING, created_at=NOW - 900)
    add(state, "r", lc.I_READY, ready_at=NOW - 900, release_sent=True)
    assert lc.idle_to_drain(state, NOW) == ([], None)
    state = make_state(idle=60, desired=lc.WANT_STOPPED)
    add(state, "a", lc.I_READY, ready_at=NOW - 900)
    assert lc.idle_to_drain(state, NOW) == ([], None)


# ---------------------------------------------------------------- drained
def test_drain_grace_after_draining_since():
    state = make_state(grace=3.0)
    add(state, "a", lc.I_DRAINING, draining_since=NOW - 1)
    assert lc.drained(state, NOW) == ([], NOW + 2)
    assert lc.drained(state, NOW + 2) == (["a"], None)


def test_drain_grace_after_last_request():
    state = make_state(grace=3.0)
    add(state, "a", lc.I_DRAINING, draining_since=NOW - 10)
    # A request routed by a stale proxy view finished 1 s ago: wait the grace from it.
    report(state, "p1", sent_at=NOW, a=(0, NOW - 1))
    assert lc.drained(state, NOW) == ([], NOW + 2)


def test_drain_in_flight_blocks_release():
    state = make_state(grace=3.0)
    add(state, "a", lc.I_DRAINING, draining_since=NOW - 100)
    add(state, "b", lc.I_DRAINING, draining_since=NOW - 100)
    report(state, "p1", sent_at=NOW, a=(2, NOW - 50))
    assert lc.drained(state, NOW) == (["b"], None)


def test_drained_skips_released_and_other_statuses():
    state = make_state(grace=3.0)
    add(state, "a", lc.I_DRAINING, draining_since=NOW - 100, release_sent=True)
    add(state, "b", lc.I_READY, ready_at=NOW - 100)
    assert lc.drained(state, NOW) == ([], None)


# ---------------------------------------------------------------- aggregate_traffic
def test_aggregate_sums_in_flight_and_keeps_latest_request():
    state = make_state()
    report(state, "p1", sent_at=NOW - 1, a=(2, NOW - 20), b=(0, NOW - 5))
    report(state, "p2", sent_at=NOW - 2, a=(3, NOW - 3))
    traffic = lc.aggregate_traffic(state, NOW)
    assert traffic["a"].in_flight == 5 and traffic["a"].last_request_at == NOW - 3
    assert traffic["b"].in_flight == 0 and traffic["b"].last_request_at == NOW - 5


def test_aggregate_ignores_stale_in_flight_but_keeps_its_last_request():
    state = make_state()
    stale_at = NOW - lc.STALE_REPORT_SECONDS - 1
    report(state, "gone", sent_at=stale_at, a=(4, stale_at))
    report(state, "live", sent_at=NOW, a=(1, NOW - 100))
    traffic = lc.aggregate_traffic(state, NOW)
    assert traffic["a"].in_flight == 1
    assert traffic["a"].last_request_at == stale_at
    # At exactly the stale limit the report still counts.
    assert lc.aggregate_traffic(state, stale_at + lc.STALE_REPORT_SECONDS)["a"].in_flight == 5


def test_next_stale_report_only_for_reporters_holding_requests():
    state = make_state()
    report(state, "idle", sent_at=NOW - 10, a=(0, NOW - 10))
    assert lc.next_stale_report(state, NOW) is None
    report(state, "busy", sent_at=NOW - 10, a=(1, NOW - 10))
    assert lc.next_stale_report(state, NOW) == NOW - 10 + lc.STALE_REPORT_SECONDS
    assert lc.next_stale_report(state, NOW + lc.STALE_REPORT_SECONDS) is None  # already stale


def test_stale_reporter_no_longer_blocks_idle_release():
    state = make_state(idle=60)
    add(state, "a", lc.I_READY, ready_at=NOW - 900)
    report(state, "crashed-proxy", sent_at=NOW - 200, a=(1, NOW - 200))
    assert lc.idle_to_drain(state, NOW) == (["a"], None)


# ---------------------------------------------------------------- prune
def test_prune_forgets_long_ended_instances_and_their_traffic():
    state = make_state()
    add(state, "old", lc.I_STOPPED, ended_at=NOW - 61)
    add(state, "recent", lc.I_FAILED, ended_at=NOW - 10)
    add(state, "live", lc.I_READY)
    report(state, "p1", sent_at=NOW, old=(0, NOW - 70), live=(1, NOW))
    state.scale_outs = {"r-old": "old", "r-live": "live"}
    lc.prune(state, NOW)
    assert set(state.instances) == {"recent", "live"}
    assert [i.instance_id for i in state.traffic["p1"].instances] == ["live"]
    assert state.scale_outs == {"r-live": "live"}


def test_prune_drops_long_gone_reporters_only():
    state = make_state()
    add(state, "a", lc.I_READY)
    report(state, "gone", sent_at=NOW - 10 * lc.STALE_REPORT_SECONDS - 1, a=(0, NOW - 900))
    report(state, "quiet", sent_at=NOW - 10 * lc.STALE_REPORT_SECONDS + 1, a=(0, NOW - 900))
    lc.prune(state, NOW)
    assert set(state.traffic) == {"quiet"}


def test_crash_loop_needs_three_deaths_within_the_window():
    state = lc.EndpointState(spec=LifecycleSpec(name="ep"))
    assert not lc.record_death(state, 1000.0)
    assert not lc.record_death(state, 1000.0 + lc.CRASH_LOOP_WINDOW_SECONDS + 1)  # the first aged out
    assert not lc.record_death(state, 1000.0 + lc.CRASH_LOOP_WINDOW_SECONDS + 2)
    assert lc.record_death(state, 1000.0 + lc.CRASH_LOOP_WINDOW_SECONDS + 3)
