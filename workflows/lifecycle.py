"""The endpoint lifecycle's decisions as pure functions over its state (unit-tested directly).

EndpointWorkflow keeps an `EndpointState`, feeds it signals, and asks these functions what to do:
which status to show, how many instances to start, which idle instance to drain, when to wake.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.models import (
    FAILED,
    I_DRAINING,
    I_FAILED,
    I_PROVISIONING,
    I_QUEUED,
    I_READY,
    I_STARTING,
    I_STOPPED,
    I_STOPPING,
    QUEUED,
    RUNNING,
    STANDBY,
    STARTING,
    STOPPED,
    STOPPING,

)
from common.spec_fields import BY_NAME, LIFECYCLE, read_by
from common.spec_fields import LIVE as LIVE_EDIT
from workflows import autoscale as asc
from workflows.activity_types import LifecycleSpec
from workflows.traffic_types import TrafficReport

# What the owner asked for; the shown status is derived from it and the instances.
SERVING, WANT_STOPPED, WANT_FAILED, WANT_TERMINATED = "serving", "stopped", "failed", "terminated"

I_NEW = "new"  # decided, child workflow not started yet
LIVE = (I_NEW, I_QUEUED, I_PROVISIONING, I_STARTING, I_READY, I_DRAINING, I_STOPPING)
TERMINAL = (I_STOPPED, I_FAILED)

# A proxy process that has not reported for this long is presumed gone: its in-flight figures
# no longer hold an instance (proxies re-report every few seconds while requests are in flight).
STALE_REPORT_SECONDS = 60.0


def spec_problems(spec: LifecycleSpec) -> list[str]:
    """What is wrong with a spec the lifecycle was handed, field by field, against the bounds
    declared for it (common/spec_fields.py). The web app refuses such specs already; this is the
    workflow's own check, so that a bad row (written by hand, by an older release) can never make
    it fail its task on an impossible timer: it refuses the spec instead."""
    problems = []
    for name, decl in BY_NAME.items():
        if decl.low is None or not hasattr(spec, name):
            continue
        value = getattr(spec, name)
        if value is None and decl.nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < decl.low or value > decl.high or (decl.above_low and value <= decl.low):
            problems.append(f"{name} must be between {_plain(decl.low)} and {_plain(decl.high)}, got {value!r}")
    return problems


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def live_spec_fields() -> tuple[str, ...]:
    """Spec fields an instance's workflow takes from a changed spec while it runs."""
    return tuple(f.name for f in read_by(LIFECYCLE) if f.edit == LIVE_EDIT)


@dataclass
class InstanceView:
    id: str
    status: str
    generation: int
    created_at: float
    address: str = ""
    ready_at: float | None = None
    draining_since: float | None = None
    release_sent: bool = False
    reason: str = ""
    ended_at: float | None = None
    # When returning demand kept it from draining: its idle clock restarts there.
    kept_at: float | None = None
    pool: str = ""


@dataclass
class EndpointState:
    spec: LifecycleSpec
    desired: str = SERVING
    generation: int = 0
    instances: dict[str, InstanceView] = field(default_factory=dict)
    traffic: dict[str, TrafficReport] = field(default_factory=dict)
    wake_pending: bool = False
    # restart: old instances are released first, then `restart_target` fresh ones start.
    restart_pending: bool = False
    restart_target: int = 0
    stopped_at: float | None = None
    purge_at: float | None = None
    failure_reason: str = ""
    published_status: str = ""
    published_reason: str = ""
    scale_outs: dict[str, str] = field(default_factory=dict)  # request id -> instance id
    spec_reload_pending: bool = False
    # When serving instances died (not released): a crash loop fails the endpoint.
    deaths: list[float] = field(default_factory=list)
    # Pools that said none of their hosts is up, and when: new instances go elsewhere meanwhile.
    unavailable_pools: dict[str, float] = field(default_factory=dict)
    # The autoscaler's observations and last answer (workflows/autoscale.py).
    autoscale: asc.AutoscaleState = field(default_factory=asc.AutoscaleState)
    # Warm windows (workflows/warm_windows.py): instances kept now, the open windows (their
    # lines), when that next changes (the workflow's timer), and the text it was worked out for.
    warm: int = 0
    warm_open: list[str] = field(default_factory=list)
    warm_next: float | None = None
    warm_text: str = ""


@dataclass
class Traffic:
    in_flight: int = 0
    last_request_at: float = 0.0


# An endpoint whose instances keep dying right after becoming ready would burn GPUs forever
# being replaced: this many deaths within the window fail it instead.
CRASH_LOOP_DEATHS = 3
CRASH_LOOP_WINDOW_SECONDS = 600.0


# A pool that said it has no host up is passed over for new instances this long.
POOL_UNAVAILABLE_SECONDS = 60.0


def choose_pool(state: EndpointState, now: float) -> str:
    """The pool for a new instance: instances split evenly over the endpoint's pools (the one
    with the fewest live instances, the first in the spec on a tie), passing over a pool that
    lately had no host up while another one has (so one pool's failure leaves it serving)."""
    pools = list(state.spec.pools or []) or ["default"]
    candidates = available_pools(state, now) or pools
    live_in = {p: sum(1 for v in active(state) if v.pool == p) for p in candidates}
    return min(candidates, key=lambda p: (live_in[p], pools.index(p)))


def available_pools(state: EndpointState, now: float) -> list[str]:
    """The endpoint's pools, less those that lately said they have no host up."""
    recent = {p for p, at in state.unavailable_pools.items() if now - at < POOL_UNAVAILABLE_SECONDS}
    return [p for p in (state.spec.pools or ["default"]) if p not in recent]


def record_death(state: EndpointState, at: float) -> bool:
    """Note a serving instance's death; True when the deaths amount to a crash loop."""
    state.deaths = [t for t in state.deaths if at - t < CRASH_LOOP_WINDOW_SECONDS] + [at]
    return len(state.deaths) >= CRASH_LOOP_DEATHS


def live(state: EndpointState) -> list[InstanceView]:
    return [i for i in state.instances.values() if i.status in LIVE]


def active(state: EndpointState) -> list[InstanceView]:
    """Live instances that are not on their way out."""
    return [i for i in live(state) if i.status not in (I_DRAINING, I_STOPPING) and not i.release_sent]


def routable(state: EndpointState) -> list[InstanceView]:
    return [i for i in state.instances.values() if i.status == I_READY and not i.release_sent]


def undrainable(state: EndpointState) -> list[InstanceView]:
    return [i for i in state.instances.values() if i.status == I_DRAINING and not i.release_sent]


def undrain(state: EndpointState, view: InstanceView, now: float) -> None:
    """Demand came back while `view` drains: it serves again, which answers any pending wake,
    and its idle retention starts over (else the same reconcile would drain it again)."""
    view.status = I_READY
    view.draining_since = None
    view.kept_at = now
    state.wake_pending = False


def aggregate_traffic(state: EndpointState, now: float) -> dict[str, Traffic]:
    """Sum in-flight requests per instance over proxy processes; the latest request time wins."""
    out: dict[str, Traffic] = {}
    for report in state.traffic.values():
        fresh = now - report.sent_at <= STALE_REPORT_SECONDS
        for item in report.instances:
            t = out.setdefault(item.instance_id, Traffic())
            if fresh:
                t.in_flight += item.in_flight
            t.last_request_at = max(t.last_request_at, item.last_request_at)
    return out


def last_activity(view: InstanceView, traffic: dict[str, Traffic]) -> float:
    t = traffic.get(view.id)
    return max(view.ready_at or view.created_at, view.kept_at or 0.0, t.last_request_at if t else 0.0)


def derive_status(state: EndpointState) -> str:
    alive = live(state)
    if state.desired == WANT_TERMINATED:
        return STOPPING  # `terminated` is written by the purge itself, once everything is gone
    if state.desired == WANT_FAILED:
        return FAILED
    if state.desired == WANT_STOPPED:
        return STOPPING if alive else STOPPED
    statuses = {i.status for i in alive}
    if I_READY in statuses or I_DRAINING in statuses:
        return RUNNING
    if statuses & {I_NEW, I_PROVISIONING, I_STARTING}:
        return STARTING
    if I_QUEUED in statuses:
        return QUEUED
    return STANDBY


def wanted_new_instances(state: EndpointState) -> int:
    """How many instances to start now to honour min instances and a pending wake."""
    if state.desired != SERVING or state.restart_pending:
        return 0
    want = max(state.spec.min_instances, autoscaled(state), state.warm)
    if state.wake_pending:
        want = max(want, 1)
    have = len(active(state))
    # Keeping a draining instance (the workflow's first choice) takes no new slot.
    room = state.spec.max_instances - len(live(state)) + len(undrainable(state))
    return max(0, min(want - have, room))


# ---------------------------------------------------------------- autoscaling (workflows/autoscale.py)


def autoscaled(state: EndpointState) -> int:
    """The autoscaler's last answer, while autoscaling is on (else 0: nothing beyond min)."""
    return state.autoscale.desired if getattr(state.spec, "autoscaling", False) else 0


def autoscale_inputs(state: EndpointState, now: float) -> asc.Inputs:
    spec, ready, serving = state.spec, routable(state), active(state)
    return asc.Inputs(
        now=now, min_instances=spec.min_instances, max_instances=spec.max_instances, ready=len(ready),
        active=len(serving), target_concurrency=spec.target_concurrency, target_cpu_percent=spec.target_cpu_percent,
        target_memory_percent=spec.target_memory_percent, target_gpu_percent=spec.target_gpu_percent,
        window_seconds=float(spec.autoscale_window_seconds), scale_down_delay_seconds=float(spec.scale_down_delay_seconds),
        ready_ids=tuple(v.id for v in ready), starting=len(serving) - len(ready))


def autoscale_keep_seconds(state: EndpointState) -> float:
    """How far back the autoscaler looks: its window or its scale-down delay, with a margin."""
    return float(max(state.spec.autoscale_window_seconds, state.spec.scale_down_delay_seconds)) + 5.0


def observe_traffic_load(state: EndpointState, report: TrafficReport) -> None:
    """A proxy report, as load for the concurrency autoscaler (while autoscaling is on)."""
    if not getattr(state.spec, "autoscaling", False):
        return
    current = sum(item.in_flight for item in report.instances) + report.held
    asc.observe_load(state.autoscale, report.reporter, report.sent_at, report.load_seconds, current,
                     autoscale_keep_seconds(state))


def autoscale_surplus(state: EndpointState, now: float) -> list[str]:
    """Serving instances beyond the autoscaler's answer, to drain: the fewest requests in flight
    first, then the longest idle. Never the last instance, never below min instances."""
    if state.desired != SERVING or not getattr(state.spec, "autoscaling", False):
        return []
    serving = active(state)
    count = asc.surplus(state.autoscale.desired, max(state.spec.min_instances, state.warm), len(serving))
    if count <= 0:
        return []
    traffic = aggregate_traffic(state, now)
    candidates = sorted(routable(state), key=lambda v: (traffic.get(v.id, Traffic()).in_flight,
                                                         last_activity(v, traffic), v.id))
    return [v.id for v in candidates[:count]]


def idle_to_drain(state: EndpointState, now: float) -> tuple[list[str], float | None]:
    """Ready instances, beyond min instances, whose idle retention ends within the drain grace,
    to drain now; and the next time this answer may change (for the workflow's timer).

    Draining starts `drain_grace_seconds` before the retention ends, so that the release (after
    the grace, see `drained`) falls on the retention itself, not seconds after it: an idle GPU is
    paid for exactly the retention the user chose. A request in that last stretch wakes the
    endpoint, which keeps the draining instance (`undrain`)."""
    if state.desired != SERVING:
        return [], None
    traffic = aggregate_traffic(state, now)
    # What the autoscaler wants is kept like min instances; idle retention releases the rest.
    keep = max(state.spec.min_instances, autoscaled(state), state.warm)
    candidates = []
    next_check: float | None = None
    for view in routable(state):
        t = traffic.get(view.id, Traffic())
        if t.in_flight > 0:
            continue
        idle_since = last_activity(view, traffic)
        due = idle_since + max(0.0, state.spec.idle_retention_seconds - state.spec.drain_grace_seconds)
        if due <= now:
            candidates.append((idle_since, view.id))
        else:
            next_check = due if next_check is None else min(next_check, due)
    candidates.sort()  # the longest idle goes first
    spare = len(active(state)) - keep
    drain = [iid for _, iid in candidates[: max(0, spare)]]
    return drain, next_check


def drained(state: EndpointState, now: float) -> tuple[list[str], float | None]:
    """Draining instances that can be released: no request in flight and the drain grace passed
    since both the drain began and the last request touched them."""
    traffic = aggregate_traffic(state, now)
    ready, next_check = [], None
    for view in state.instances.values():
        if view.status != I_DRAINING or view.release_sent:
            continue
        t = traffic.get(view.id, Traffic())
        if t.in_flight > 0:
            continue  # a traffic report will wake the workflow when it drops
        due = max(view.draining_since or now, t.last_request_at) + state.spec.drain_grace_seconds
        if due <= now:
            ready.append(view.id)
        else:
            next_check = due if next_check is None else min(next_check, due)
    return ready, next_check


def next_stale_report(state: EndpointState, now: float) -> float | None:
    """When a reporter with in-flight requests turns stale, idleness must be re-evaluated."""
    times = [
        r.sent_at + STALE_REPORT_SECONDS
        for r in state.traffic.values()
        if any(i.in_flight for i in r.instances) and r.sent_at + STALE_REPORT_SECONDS > now
    ]
    return min(times) if times else None


def prune(state: EndpointState, now: float, keep_seconds: float = 60.0) -> None:
    """Forget ended instances (the database keeps their record) and long-gone reporters."""
    for iid in [i.id for i in state.instances.values() if i.status in TERMINAL and i.ended_at is not None
                and now - i.ended_at > keep_seconds]:
        del state.instances[iid]
    known = set(state.instances)
    for key in [k for k, r in state.traffic.items() if now - r.sent_at > 10 * STALE_REPORT_SECONDS]:
        del state.traffic[key]
    for report in state.traffic.values():
        report.instances = [i for i in report.instances if i.instance_id in known]
    live_ids = set(state.instances)
    state.scale_outs = {k: v for k, v in state.scale_outs.items() if v in live_ids}
    asc.forget(state.autoscale, now, autoscale_keep_seconds(state), {v.id for v in live(state)})


@dataclass
class InstanceStatusView:
    id: str
    status: str
    generation: int
    address: str
    in_flight: int
    ready_at: float | None
    reason: str


@dataclass
class EndpointStatusView:
    name: str
    status: str
    desired: str
    generation: int
    reason: str
    wake_pending: bool
    stopped_at: float | None
    purge_at: float | None
    min_instances: int
    max_instances: int
    instances: list[InstanceStatusView] = field(default_factory=list)
    # The autoscaler's last answer and why (0 and "" while autoscaling is off).
    autoscale_desired: int = 0
    autoscale_reason: str = ""
    # Instances the open warm windows keep, and those windows.
    warm_instances: int = 0
    warm_windows_open: list[str] = field(default_factory=list)


def status_view(name: str, state: EndpointState | None, now: float) -> EndpointStatusView:
    """The `status` query's answer (also what `temporal workflow query --type status` prints)."""
    if state is None:
        return EndpointStatusView(name, "creating", SERVING, 0, "", False, None, None, 0, 0)
    traffic = aggregate_traffic(state, now)
    return EndpointStatusView(
        name=name,
        status=derive_status(state),
        desired=state.desired,
        generation=state.generation,
        reason=state.failure_reason,
        wake_pending=state.wake_pending,
        stopped_at=state.stopped_at,
        purge_at=state.purge_at,
        min_instances=state.spec.min_instances,
        max_instances=state.spec.max_instances,
        instances=[
            InstanceStatusView(v.id, v.status, v.generation, v.address, traffic.get(v.id, Traffic()).in_flight,
                               v.ready_at, v.reason)
            for v in state.instances.values()
        ],
        autoscale_desired=autoscaled(state),
        autoscale_reason=state.autoscale.message if getattr(state.spec, "autoscaling", False) else "",
        warm_instances=state.warm,
        warm_windows_open=list(state.warm_open),
    )
