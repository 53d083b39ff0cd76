"""Pure decisions of updates (README.md "Revisions and updates"), unit-tested directly.

The endpoint's side: what it tells its rollout (`observe`). The rollout's side: a step's split
(`common/revisions.py` `blend`), whether new instances are healthy (`health_problem`), which old
instance goes next (`next_old`), a canary's steps (`canary_steps`).
"""
from __future__ import annotations

import math

from common.models import I_FAILED, I_READY
from workflows import lifecycle as lc
from workflows.rollout_types import InstanceRef, RolloutObservation


def observe(state: lc.EndpointState, now: float) -> RolloutObservation | None:
    """What the running update needs to know of the endpoint, without its sequence number."""
    r = state.rollout
    if r is None:
        return None
    new = [v for v in state.instances.values() if lc.in_new_group(state, v)]
    old_live = [v for v in lc.live(state) if not lc.in_new_group(state, v)]
    old_ready = sorted((v for v in old_live if v.status == I_READY and not v.release_sent and not v.retiring),
                       key=lambda v: (v.ready_at or v.created_at, v.id))
    new_ready = sorted((v for v in new if v.status == I_READY and not v.release_sent),
                       key=lambda v: (v.ready_at or v.created_at, v.id))
    pending = [v for v in new if v.status in lc.LIVE and v.status != I_READY and not v.release_sent]
    failures = [f"instance {v.id} {'died' if v.ready_at else 'never became ready'}: {v.reason or 'failed'}"
                for v in sorted(new, key=lambda v: v.id) if v.status == I_FAILED and not v.release_sent]
    counts = request_counts(state, {v.id for v in new})
    return RolloutObservation(
        rollout=r.rollout,
        new_ready=[InstanceRef(v.id, v.revision) for v in new_ready],
        new_pending=len(pending),
        new_failures=failures,
        old_ready=[InstanceRef(v.id, v.revision) for v in old_ready],
        old_live=len(old_live),
        new_requests=counts[0],
        new_errors=counts[1],
        # A stopped endpoint still takes an update (nothing runs: it switches at once).
        serving=state.desired not in (lc.WANT_FAILED, lc.WANT_TERMINATED),
    )


def request_counts(state: lc.EndpointState, instance_ids: set[str]) -> tuple[int, int]:
    """Requests and errors the proxies counted on these instances (every reporter's total)."""
    requests = errors = 0
    for report in state.traffic.values():
        for item in report.instances:
            if item.instance_id in instance_ids:
                requests += item.requests
                errors += getattr(item, "errors", 0)
    return requests, errors


def health_problem(requests: int, errors: int, threshold: float) -> str:
    """Why new instances are unhealthy over a window (their requests and errors in it), or ""."""
    if errors <= 0:
        return ""
    rate = errors / max(requests, errors)
    if rate > threshold:
        return (f"error rate {rate:.0%} ({errors} of {max(requests, errors)} requests answered 5xx or refused) "
                f"is above {threshold:.0%}")
    return ""


def next_old(obs: RolloutObservation, released: set[str]) -> InstanceRef | None:
    """The old instance to replace next: the oldest ready one not released yet."""
    for ref in obs.old_ready:
        if ref.id not in released:
            return ref
    return None


def canary_steps(steps: list[int]) -> list[int]:
    """A canary's percentages, increasing, ending at 100."""
    out = sorted({int(p) for p in steps if 0 < int(p) < 100})
    return out + [100]


def instances_for_share(total: int, percent: int) -> int:
    """New instances a canary step keeps: its share of the instances the update started with, at
    least one (so the canary is warm when traffic first reaches it)."""
    return max(1, math.ceil(total * percent / 100))
