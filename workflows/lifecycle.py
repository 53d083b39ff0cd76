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
from common.revisions import apportion, primary
from common.spec_fields import BY_NAME, LIFECYCLE, read_by
from common.spec_fields import LIVE as LIVE_EDIT
from workflows import autoscale as asc
from workflows.activity_types import LifecycleSpec, RevisionInfo
from workflows.rollout_types import RolloutState
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
    # The revision it runs (0: an endpoint without revisions).
    revision: int = 0
    # Released on purpose (an update replaced it, its revision lost its share): never kept back
    # by returning demand.
    retiring: bool = False


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
    # Revisions (README.md "Revisions and updates"): the traffic split (revision -> percent; empty
    # for an endpoint without revisions), the revisions that served all traffic after an update,
    # oldest first (the last is the one a rollback returns to), and revisions a wake asked for.
    split: dict[int, int] = field(default_factory=dict)
    good: list[int] = field(default_factory=list)
    wake_revisions: list[int] = field(default_factory=list)
    rollout: RolloutState | None = None
    rollout_seq: int = 0
    # The split last written to the database (the proxy routes by it).
    recorded_split: dict[int, int] = field(default_factory=dict)


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


def choose_pool(state: EndpointState, now: float, pools: list[str] | None = None) -> str:
    """The pool for a new instance: instances split evenly over the endpoint's pools (the one
    with the fewest live instances, the first in the spec on a tie), passing over a pool that
    lately had no host up while another one has (so one pool's failure leaves it serving).
    `pools`: its revision's, when they differ from the endpoint's spec."""
    pools = list(pools or state.spec.pools or []) or ["default"]
    candidates = [p for p in available_pools(state, now) if p in pools] or pools
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


def undrainable(state: EndpointState, revision: int | None = None) -> list[InstanceView]:
    """Draining instances that returning demand may keep (of `revision`, when given)."""
    return [i for i in state.instances.values() if i.status == I_DRAINING and not i.release_sent
            and not i.retiring and (revision is None or i.revision == revision)]


def undrain(state: EndpointState, view: InstanceView, now: float) -> None:
    """Demand came back while `view` drains: it serves again, which answers any pending wake,
    and its idle retention starts over (else the same reconcile would drain it again)."""
    view.status = I_READY
    view.draining_since = None
    view.kept_at = now
    if view.revision in state.wake_revisions:
        state.wake_revisions.remove(view.revision)
    state.wake_pending = bool(state.split) and bool(state.wake_revisions)


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


def floor_instances(state: EndpointState) -> int:
    """Instances kept running: min instances, the manual scale above it, the autoscaler's answer
    (workflows/autoscale.py) and an open warm window (workflows/warm_windows.py)."""
    return max(state.spec.min_instances, getattr(state.spec, "instance_count", 0) or 0, autoscaled(state),
               state.warm)


def keep_by_revision(state: EndpointState) -> dict[int, int]:
    """The floor shared out over the revisions by their traffic shares (largest remainder), so a
    10% canary at min instances 1 keeps none and wakes on its first request."""
    floor = floor_instances(state)
    if not state.split:
        return {0: floor}
    return apportion(floor, state.split)


def wanted_by_revision(state: EndpointState) -> dict[int, int]:
    """How many instances of each revision to start now, for the floor and pending wakes, within
    max instances (the endpoint's, over all revisions)."""
    if state.desired != SERVING or state.restart_pending:
        return {}
    keep = keep_by_revision(state)
    wakes: set[int] = set()
    if state.wake_pending:
        wakes = {r for r in state.wake_revisions if r in state.split} if state.split else {0}
        if state.split and not wakes:
            wakes = {primary(state.split)}
    room = state.spec.max_instances - len(live(state))
    out: dict[int, int] = {}
    for revision in sorted(set(keep) | wakes, key=lambda r: (-state.split.get(r, 0), r)):
        want = max(keep.get(revision, 0), 1 if revision in wakes else 0)
        have = sum(1 for v in active(state) if v.revision == revision or not state.split)
        # Keeping a draining instance (the workflow's first choice) takes no new slot.
        spare = len(undrainable(state, None if not state.split else revision))
        count = max(0, min(want - have, room + spare))
        if count:
            out[revision] = count
            room -= max(0, count - spare)
    return out


def wanted_new_instances(state: EndpointState) -> int:
    """How many instances to start now to honour min instances and a pending wake."""
    return sum(wanted_by_revision(state).values())


# ---- updates in progress (README.md "Revisions and updates") -------------------------------------


def in_new_group(state: EndpointState, view: InstanceView) -> bool:
    """An instance the running update started: its generation, and its target revision."""
    return started_by(state.rollout, view)


def started_by(rollout: RolloutState | None, view: InstanceView) -> bool:
    if rollout is None:
        return False
    return view.generation >= rollout.generation and (rollout.target == 0 or view.revision == rollout.target)


def rollout_new_needed(state: EndpointState) -> dict[int, int]:
    """New instances the running update's last step asks for and the endpoint does not have yet
    (beyond max instances by the update's surge: old instances leave only once these serve)."""
    r = state.rollout
    if r is None or r.step is None or r.step.done or state.desired != SERVING:
        return {}
    if any(started_by(r, v) and v.status == I_FAILED for v in state.instances.values()):
        return {}  # the update rolls back: no replacement for a failed new instance
    out = {}
    for revision, count in r.step.new_counts.items():
        have = sum(1 for v in active(state) if v.revision == revision and started_by(r, v))
        if count > have:
            out[revision] = count - have
    return out


def held_by_rollout(state: EndpointState, view: InstanceView) -> bool:
    """Kept from idle release while an update runs: its new instances, and the old set while a
    blue-green switch may still be rolled back."""
    r = state.rollout
    if r is None:
        return False
    if in_new_group(state, view):
        return True
    return bool(r.step and r.step.hold_old)


def to_retire(state: EndpointState) -> list[str]:
    """Live instances of revisions that lost their share (and no update holds): released now,
    drained first when ready."""
    if not state.split or state.desired != SERVING:
        return []
    return [v.id for v in live(state) if v.revision not in state.split and not v.release_sent
            and v.status not in (I_DRAINING, I_STOPPING) and not held_by_rollout(state, v)]


def adopt_split(state: EndpointState, split: dict[int, int]) -> None:
    """The first split an endpoint's workflow takes on (from the revisions the database holds):
    instances it started before revisions run the primary revision (revision 1, made from the spec
    they started with)."""
    state.split = dict(split)
    first = primary(split)
    for view in state.instances.values():
        if view.revision == 0:
            view.revision = first
    if not state.good:
        state.good = [first]


def revision_info(spec: LifecycleSpec, number: int) -> RevisionInfo | None:
    for info in getattr(spec, "revisions", None) or []:
        if info.number == number:
            return info
    return None


def spec_for_revision(spec: LifecycleSpec, number: int) -> LifecycleSpec:
    """The spec an instance of revision `number` starts with: its resources, pools and netns need
    are the revision's, the rest the endpoint's."""
    import dataclasses

    info = revision_info(spec, number)
    if info is None:
        return dataclasses.replace(spec, revisions=[])
    return dataclasses.replace(spec, gpu_type=info.gpu_type, gpu_count=info.gpu_count, cpu_cores=info.cpu_cores,
                               memory_gb=info.memory_gb, pools=list(info.pools or spec.pools),
                               needs_netns=info.needs_netns, revisions=[])


def move_share(split: dict[int, int], bad: int, to: int) -> dict[int, int]:
    """The split with `bad`'s share given to `to` (a revision that failed outside an update)."""
    out = dict(split)
    share = out.pop(bad, 0)
    out[to] = out.get(to, 0) + share
    return {n: p for n, p in sorted(out.items()) if p}


def good_revision(state: EndpointState) -> int:
    """The last good revision: where a rollback returns all traffic."""
    return state.good[-1] if state.good else primary(state.split)


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
    count = asc.surplus(state.autoscale.desired, max(state.spec.min_instances, state.warm,
                                                     getattr(state.spec, "instance_count", 0) or 0), len(serving))
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
    # The floor (min instances, a manual scale, the autoscaler's answer, a warm window) is kept,
    # shared out over the revisions; idle retention releases the rest.
    keep = keep_by_revision(state)
    candidates = []
    next_check: float | None = None
    for view in routable(state):
        t = traffic.get(view.id, Traffic())
        if t.in_flight > 0 or held_by_rollout(state, view):
            continue
        idle_since = last_activity(view, traffic)
        due = idle_since + max(0.0, state.spec.idle_retention_seconds - state.spec.drain_grace_seconds)
        if due <= now:
            candidates.append((idle_since, view.id))
        else:
            next_check = due if next_check is None else min(next_check, due)
    candidates.sort()  # the longest idle goes first
    # Never below the floor, per revision (all together for an endpoint without revisions).
    spare = {rev: sum(1 for v in active(state) if _group(state, v) == rev) - count for rev, count in keep.items()}
    drain = []
    for _, iid in candidates:
        rev = _group(state, state.instances[iid])
        if rev not in spare:  # a revision with no floor (no share: it retires anyway)
            drain.append(iid)
        elif spare[rev] > 0:
            drain.append(iid)
            spare[rev] -= 1
    return drain, next_check


def _group(state: EndpointState, view: InstanceView) -> int:
    return view.revision if state.split else 0


def scaled_down(state: EndpointState) -> list[str]:
    """Ready instances beyond a manual scale (`instance_count` set lower than what runs): drained now
    rather than at the end of their idle retention, the least busy first (its longest idle)."""
    wanted = getattr(state.spec, "instance_count", 0) or 0
    if state.desired != SERVING or wanted <= 0 or state.rollout is not None:
        return []
    floor = floor_instances(state)  # the autoscaler or a warm window may keep more
    extra = len(active(state)) - floor
    if extra <= 0:
        return []
    keep = keep_by_revision(state)
    ready = sorted(routable(state), key=lambda v: (v.ready_at or 0.0, v.id))
    out = []
    for view in ready:
        if len(out) >= extra:
            break
        group = _group(state, view)
        if sum(1 for v in active(state) if _group(state, v) == group and v.id not in out) > keep.get(group, 0):
            out.append(view.id)
    return out


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
    revision: int = 0


@dataclass
class RolloutStatusView:
    rollout: int
    target: int
    kind: str
    strategy: str
    phase: str
    base_split: dict[int, int] = field(default_factory=dict)


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
    traffic: dict[int, int] = field(default_factory=dict)
    rollout: RolloutStatusView | None = None


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
                               v.ready_at, v.reason, v.revision)
            for v in state.instances.values()
        ],
        autoscale_desired=autoscaled(state),
        autoscale_reason=state.autoscale.message if getattr(state.spec, "autoscaling", False) else "",
        warm_instances=state.warm,
        warm_windows_open=list(state.warm_open),
        traffic=dict(state.split),
        rollout=None if state.rollout is None else RolloutStatusView(
            state.rollout.rollout, state.rollout.target, state.rollout.kind, state.rollout.options.strategy,
            state.rollout.step.phase if state.rollout.step else "starting", dict(state.rollout.base_split)),
    )
