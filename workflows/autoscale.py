"""Autoscaling decisions as pure functions (docs/architecture.md "Autoscaling"), unit-tested directly.

EndpointWorkflow feeds them what the proxies report (in-flight and held requests, as a growing
count of request-seconds) and what the workers measure (CPU, memory and GPU use per instance),
and asks how many instances the endpoint should have. The workflow then starts or drains
instances as it does for a wake or an idle release; this module never acts.

Two autoscalers, combined by taking the larger answer (as Kubernetes' HPA does with several
metrics):

- **Concurrency (Knative's KPA):** desired = ceil(average concurrency / target per instance),
  the average taken over the stable window (60 s by default). A burst whose average over the
  panic window (a tenth of the stable window, 6 s) asks for at least twice the ready instances
  enters panic mode: the panic average decides, nothing scales down, and the mode lasts until a
  whole stable window passed without the burst condition.
- **Utilisation (Kubernetes' HPA):** desired = ceil(current × utilisation / target) for each
  of CPU, memory and GPU with a target, left as it is within a 10% tolerance of the target.

Scale-down is delayed: the answer is the largest of the recommendations of the last
`scale_down_delay_seconds` (HPA's stabilisation window), so a dip does not release an instance
that the next second needs again. The answer is kept within min and max instances. The
autoscaler never takes an endpoint's last instance away: that stays the idle retention's job
(workflows/lifecycle.py `idle_to_drain`), so "kept this long after its last request" holds.

Every change of the answer comes with a message naming its inputs ("in-flight 14.0 over 2
instances, target 5 per instance -> 3 instances"), recorded as an `autoscale` event.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Knative's defaults: the panic window is 10% of the stable window, and panic starts when the
# panic window's load asks for 200% of the ready instances.
PANIC_WINDOW_FRACTION = 0.1
PANIC_THRESHOLD = 2.0
# Kubernetes' HPA default: no change while utilisation is within 10% of its target.
TOLERANCE = 0.1
# How often the workflow looks again while load may still change its answer (Knative: 2 s).
TICK_SECONDS = 2.0
# A proxy's last report is extrapolated (its requests still in flight) at most this long.
STALE_REPORT_SECONDS = 60.0
# A worker's usage sample counts for this long (it samples every few seconds).
USAGE_FRESH_SECONDS = 30.0

METRIC_LABELS = {"cpu": "CPU", "memory": "memory", "gpu": "GPU"}


@dataclass
class LoadSample:
    """One proxy report: at `at`, `cumulative` request-seconds (rebased by the workflow so it only
    grows, across the proxy's restarts) and `current` requests in flight or held."""

    at: float
    cumulative: float
    current: int
    raw: float = 0.0  # the proxy's own count, to tell a restart (it went down) from growth


@dataclass
class InstanceUsage:
    """What a worker measured of one instance: percentages of what the spec grants it."""

    instance_id: str
    cpu_percent: float | None = None
    memory_percent: float | None = None
    gpu_percent: float | None = None
    at: float = 0.0


@dataclass
class UsageReport:
    """The `usage` signal: a worker's latest samples of the instances it runs for an endpoint."""

    host: str
    sent_at: float
    instances: list[InstanceUsage] = field(default_factory=list)


@dataclass
class Recommendation:
    at: float
    desired: int


@dataclass
class AutoscaleState:
    samples: dict[str, list[LoadSample]] = field(default_factory=dict)  # reporter -> samples
    usage: dict[str, InstanceUsage] = field(default_factory=dict)  # instance id -> latest
    panic_until: float | None = None
    panic_high: int = 0  # the highest answer of this panic
    recommendations: list[Recommendation] = field(default_factory=list)  # raw answers, newest last
    desired: int = 0
    decided_at: float | None = None
    message: str = ""


@dataclass
class Inputs:
    """What a decision depends on, besides the autoscaler's own state."""

    now: float
    min_instances: int
    max_instances: int
    ready: int  # instances serving now
    active: int  # instances serving or on their way (queued, starting), not draining
    target_concurrency: int = 0
    target_cpu_percent: int = 0
    target_memory_percent: int = 0
    target_gpu_percent: int = 0
    window_seconds: float = 60.0
    scale_down_delay_seconds: float = 30.0
    ready_ids: tuple[str, ...] = ()
    starting: int = 0  # active instances not ready yet (no usage of their own)


@dataclass
class Decision:
    desired: int
    message: str
    changed: bool
    panic: bool = False


# ---------------------------------------------------------------- observations


def observe_load(state: AutoscaleState, reporter: str, at: float, raw_cumulative: float, current: int,
                 keep_seconds: float) -> None:
    """Record a proxy report. Its count of request-seconds grows while that proxy process lives;
    a smaller one means it restarted, so what it counted since is added (a counter reset)."""
    samples = state.samples.setdefault(reporter, [])
    if samples and at <= samples[-1].at:
        return  # late or reordered
    if samples:
        last = samples[-1]
        grown = raw_cumulative - last.raw if raw_cumulative >= last.raw else raw_cumulative
        cumulative = last.cumulative + grown
    else:
        cumulative = 0.0
    samples.append(LoadSample(at, cumulative, max(0, current), raw_cumulative))
    _prune_samples(samples, at - keep_seconds)


def _prune_samples(samples: list[LoadSample], since: float) -> None:
    # Keep one sample at or before `since`: the window's start is interpolated from it.
    while len(samples) >= 2 and samples[1].at <= since:
        samples.pop(0)


def observe_usage(state: AutoscaleState, report: UsageReport) -> None:
    for item in report.instances:
        previous = state.usage.get(item.instance_id)
        if previous is None or item.at >= previous.at:
            state.usage[item.instance_id] = item


def forget(state: AutoscaleState, now: float, keep_seconds: float, live_ids: set[str]) -> None:
    """Drop what no decision will read again: ended instances' usage, long-silent reporters."""
    state.usage = {iid: u for iid, u in state.usage.items() if iid in live_ids}
    for reporter in [r for r, s in state.samples.items() if not s or now - s[-1].at > keep_seconds
                     + STALE_REPORT_SECONDS]:
        del state.samples[reporter]
    for samples in state.samples.values():
        _prune_samples(samples, now - keep_seconds)
    state.recommendations = [r for r in state.recommendations if now - r.at <= keep_seconds]


# ---------------------------------------------------------------- concurrency


def _cumulative_at(samples: list[LoadSample], t: float) -> float:
    """A reporter's request-seconds up to time t: interpolated between its reports, extrapolated
    past the last one with the requests it had in flight (for at most STALE_REPORT_SECONDS)."""
    if not samples or t <= samples[0].at:
        return samples[0].cumulative if samples else 0.0
    last = samples[-1]
    if t >= last.at:
        return last.cumulative + last.current * min(t - last.at, STALE_REPORT_SECONDS)
    for before, after in zip(samples, samples[1:]):
        if before.at <= t <= after.at:
            span = after.at - before.at
            share = (t - before.at) / span if span > 0 else 1.0
            return before.cumulative + (after.cumulative - before.cumulative) * share
    return last.cumulative


def average_concurrency(state: AutoscaleState, now: float, window: float) -> float:
    """Requests in flight or held, on average over the last `window` seconds, all proxies summed."""
    if window <= 0:
        return 0.0
    area = sum(_cumulative_at(s, now) - _cumulative_at(s, now - window) for s in state.samples.values())
    return max(0.0, area / window)


# ---------------------------------------------------------------- utilisation


def average_utilisation(state: AutoscaleState, inp: Inputs, metric: str) -> tuple[float | None, int]:
    """The mean `metric` percentage over ready instances with a fresh sample, and how many."""
    values = []
    for iid in inp.ready_ids:
        usage = state.usage.get(iid)
        value = getattr(usage, f"{metric}_percent", None) if usage is not None else None
        if value is not None and inp.now - usage.at <= USAGE_FRESH_SECONDS:
            values.append(value)
    if not values:
        return None, 0
    return sum(values) / len(values), len(values)


def hpa_desired(current: int, utilisation: float, target: float, starting: int = 0,
                tolerance: float = TOLERANCE) -> int:
    """Kubernetes' rule: ceil(current × utilisation / target), unchanged within the tolerance.
    When it would scale up, instances still starting count as idle (0%), so a start under way
    is not answered with another one (as the HPA treats pods without metrics)."""
    if current <= 0 or target <= 0:
        return current
    ratio = utilisation / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    if ratio > 1.0 and starting > 0:
        measured = max(0, current - starting)
        diluted = utilisation * measured / current / target
        if diluted <= 1.0 + tolerance:
            return current
        ratio = diluted
    return math.ceil(current * ratio - 1e-9)


# ---------------------------------------------------------------- the decision


def decide(state: AutoscaleState, inp: Inputs) -> Decision:
    """The number of instances the endpoint should have now, and why. Updates the autoscaler's
    own bookkeeping (panic mode, the recommendations the scale-down delay looks back on)."""
    reasons: list[str] = []
    candidates: list[int] = []
    panic = False
    if inp.target_concurrency > 0:
        wanted, panic, why = _concurrency(state, inp)
        candidates.append(wanted)
        reasons.append(why)
    for metric in ("cpu", "memory", "gpu"):
        target = getattr(inp, f"target_{metric}_percent")
        if target <= 0:
            continue
        utilisation, measured = average_utilisation(state, inp, metric)
        if utilisation is None:
            continue
        current = max(inp.active, 1)
        wanted = hpa_desired(current, utilisation, target, inp.starting)
        candidates.append(wanted)
        reasons.append(f"{METRIC_LABELS[metric]} {utilisation:.0f}% (average of {measured} "
                       f"instance{'s' * (measured != 1)}), target {target}%")
    raw = max(candidates) if candidates else inp.min_instances
    state.recommendations.append(Recommendation(inp.now, raw))
    delay = inp.scale_down_delay_seconds
    state.recommendations = [r for r in state.recommendations if inp.now - r.at <= max(delay, inp.window_seconds)]
    held = max(r.desired for r in state.recommendations if inp.now - r.at <= delay) if not panic else raw
    desired = max(raw, held)
    notes = []
    if held > raw:
        notes.append(f"scale-down delayed {delay:g}s: keeping {held}")
    clamped = min(max(desired, inp.min_instances), inp.max_instances)
    if clamped != desired:
        notes.append(f"{'max' if clamped < desired else 'min'} instances {clamped}")
    desired = clamped
    if len(reasons) > 1:  # which target asked for what
        reasons = [f"{why} -> {wanted}" for why, wanted in zip(reasons, candidates)]
    message = "; ".join(reasons) if reasons else "no target has data yet"
    if notes:
        message += " (" + ", ".join(notes) + ")"
    message += f": {inp.active} -> {desired} instance{'s' * (desired != 1)}"
    changed = desired != state.desired
    state.desired = desired
    if changed:
        state.decided_at, state.message = inp.now, message
    return Decision(desired, message, changed, panic)


def _concurrency(state: AutoscaleState, inp: Inputs) -> tuple[int, bool, str]:
    target = inp.target_concurrency
    window = inp.window_seconds
    panic_window = window * PANIC_WINDOW_FRACTION
    stable = average_concurrency(state, inp.now, window)
    burst = average_concurrency(state, inp.now, panic_window)
    want_stable = math.ceil(stable / target - 1e-9)
    want_panic = math.ceil(burst / target - 1e-9)
    ready = max(inp.ready, 1)
    if want_panic / ready >= PANIC_THRESHOLD:
        state.panic_until = inp.now + window  # enter, or stay: a whole calm window ends it
    in_panic = state.panic_until is not None and inp.now < state.panic_until
    over = f"over {inp.ready} ready instance{'s' * (inp.ready != 1)}"
    if in_panic:
        # Knative: in panic mode the answer never goes down.
        wanted = max(want_panic, state.panic_high, inp.active)
        state.panic_high = wanted
        return wanted, True, (f"panic: in-flight {burst:.1f} in the last {panic_window:g}s {over}, target "
                              f"{target} per instance")
    state.panic_until, state.panic_high = None, 0
    return want_stable, False, (f"in-flight {stable:.1f} ({window:g}s average) {over}, target {target} per "
                                f"instance")


def next_look(state: AutoscaleState, inp: Inputs) -> float | None:
    """When the answer may change without a new report: while any load is in the window, in
    panic, or while the answer is above min instances (it comes down as the window empties)."""
    busy = any(s and (s[-1].current > 0 or inp.now - s[-1].at < inp.window_seconds)
               for s in state.samples.values())
    if busy or state.panic_until is not None or state.desired > inp.min_instances \
            or any(inp.now - r.at < inp.scale_down_delay_seconds for r in state.recommendations
                   if r.desired > inp.min_instances):
        return inp.now + TICK_SECONDS
    return None


def surplus(desired: int, min_instances: int, active: int) -> int:
    """How many serving instances to drain: those beyond the answer, never the last one (the idle
    retention releases that) and never below min instances."""
    return max(0, active - max(desired, min_instances, 1))
