"""Revisions of an endpoint and the traffic split between them: pure rules, shared by the web app,
the worker, the workflows and the proxy (README.md "Revisions and updates").

A revision is an immutable snapshot of what runs: the spec fields whose change needs new
instances (the `restart` edit class of common/spec_fields.py), numbered
1, 2, ... per endpoint. Its source is pinned once, when it is made (a git ref resolved to a
commit, a source directory copied), so every instance of it runs the same code.

The traffic split maps revision numbers to whole percentages that sum to 100; a revision with
no share takes no request. The proxy picks a revision per request by smooth weighted round
robin (`smooth_weighted_choice`), so 10% is every tenth request, not 10% on average.
"""
from __future__ import annotations

import copy
import hashlib
import math
from typing import Any, Iterable, Mapping

from common.spec_fields import BY_NAME, RESTART, SPEC

# The fields a revision holds: what runs (the `restart` edit class: command or image, port, source,
# model version, git URL and ref, routes, environment, resources, pools). A change to any of them
# makes a new revision.
REVISION_FIELDS: tuple[str, ...] = tuple(f.name for f in SPEC if f.edit == RESTART)

# Revision states (written by the endpoint's workflow through worker activities).
R_PENDING, R_DEPLOYING, R_SERVING, R_RETIRED, R_FAILED = "pending", "deploying", "serving", "retired", "failed"
REVISION_STATES = (R_PENDING, R_DEPLOYING, R_SERVING, R_RETIRED, R_FAILED)

# Update strategies (chosen per update).
ROLLING, BLUE_GREEN, CANARY = "rolling", "blue-green", "canary"
STRATEGIES = (ROLLING, BLUE_GREEN, CANARY)
DEFAULT_CANARY_STEPS = (10, 50, 100)


def revision_spec(source: Any) -> dict[str, Any]:
    """The revision fields of an endpoint row or a spec dict, copied (lists are not shared)."""
    def value(name: str) -> Any:
        got = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
        # A row not flushed yet has None where its column default will go: the default runs.
        return copy.deepcopy(BY_NAME[name].default) if got is None else got

    return {name: copy.deepcopy(value(name)) for name in REVISION_FIELDS}


def first_revision(endpoint: Any):
    """Revision 1 of a new endpoint: its spec as created, serving all traffic (its workflow pins
    the source when it starts). The web app adds it with the endpoint (and so do the tests)."""
    from common.models import Revision

    return Revision(number=1, spec=revision_spec(endpoint), reason="created", state=R_SERVING, traffic=100)


def revision_changes(before: Mapping | None, after: Mapping) -> list[dict]:
    """Field by field, what differs from the previous revision (secret values masked)."""
    out = []
    for name in REVISION_FIELDS:
        old = before.get(name) if before is not None else None
        new = after.get(name)
        if before is None or old != new:
            out.append({"field": name, "from": public_value(name, old) if before is not None else None,
                        "to": public_value(name, new)})
    return out


def public_value(name: str, value: Any) -> Any:
    """A value as shown outside the server: secret environment values never leave it."""
    if name == "env":
        return [{"key": item.get("key"), "value": None if item.get("secret") else item.get("value", ""),
                 "secret": bool(item.get("secret"))} for item in value or []]
    return value


# ---- the split -----------------------------------------------------------------------------------


class SplitError(ValueError):
    """A traffic split that cannot be used; the message says what to change."""


def check_split(raw: Any, known: Iterable[int], unusable: Mapping[int, str] | None = None) -> dict[int, int]:
    """A traffic split from a client ({"1": 90, "2": 10}), checked: revision numbers that exist,
    whole percentages 0-100 summing to 100. Zero shares are dropped. Raises SplitError."""
    if not isinstance(raw, Mapping) or not raw:
        raise SplitError('traffic must be an object of revision numbers to percentages, e.g. {"1": 90, "2": 10}')
    known = set(known)
    unusable = unusable or {}
    split: dict[int, int] = {}
    for key, percent in raw.items():
        try:
            number = int(str(key).strip())
        except ValueError:
            raise SplitError(f"traffic keys are revision numbers, got {key!r}") from None
        if number not in known:
            have = ", ".join(str(n) for n in sorted(known)) or "none"
            raise SplitError(f"revision {number} does not exist (revisions: {have})")
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise SplitError(f"the share of revision {number} must be a whole percentage from 0 to 100, "
                             f"got {percent!r}")
        if percent and number in unusable:
            raise SplitError(f"revision {number} cannot take traffic: {unusable[number]}")
        if number in split:
            raise SplitError(f"revision {number} is named twice")
        split[number] = percent
    total = sum(split.values())
    if total != 100:
        shares = " + ".join(f"{p} (revision {n})" for n, p in sorted(split.items()))
        raise SplitError(f"traffic shares must sum to 100, got {shares} = {total}")
    return {n: p for n, p in sorted(split.items()) if p}


def primary(split: Mapping[int, int]) -> int:
    """The revision with the largest share (the newest on a tie); 0 when there is no split."""
    if not split:
        return 0
    return max(split, key=lambda n: (split[n], n))


def apportion(total: int, weights: Mapping[int, float]) -> dict[int, int]:
    """`total` split in proportion to `weights` by largest remainder: whole numbers that sum to
    `total` (zero weights get nothing; ties go to the larger weight, then the newer revision)."""
    positive = {k: float(w) for k, w in weights.items() if w > 0}
    if total <= 0 or not positive:
        return {k: 0 for k in weights}
    scale = sum(positive.values())
    exact = {k: total * w / scale for k, w in positive.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    left = total - sum(out.values())
    for k in sorted(exact, key=lambda k: (exact[k] - out[k], positive[k], k), reverse=True)[:left]:
        out[k] += 1
    return {k: out.get(k, 0) for k in weights}


def blend(base: Mapping[int, int], target: int, target_percent: float) -> dict[int, int]:
    """`base` with `target` given `target_percent` of the traffic and the other revisions the
    rest in proportion to their shares in `base`: the split of one step of an update. With no
    other revision (a restart), the target keeps everything."""
    others = {n: p for n, p in base.items() if n != target and p > 0}
    if not others:
        return {target: 100}
    give = max(0, min(100, int(round(target_percent))))
    shares = apportion(100 - give, others)
    shares[target] = give
    return {n: p for n, p in sorted(shares.items()) if p}


# ---- choosing a revision per request --------------------------------------------------------------


def smooth_weighted_choice(weights: Mapping[int, int], current: dict[int, int]) -> int:
    """Smooth weighted round robin (nginx's): every choice adds each weight to its counter, takes
    the largest counter and subtracts the total from it. Over any run of sum(weights) choices each
    revision is chosen exactly its weight's number of times, spread evenly. `current` holds the
    counters between calls (updated in place; stale keys are dropped)."""
    if not weights:
        raise ValueError("no revision has a share")
    for key in [k for k in current if k not in weights]:
        del current[key]
    total = 0
    best = None
    for key, weight in sorted(weights.items()):
        current[key] = current.get(key, 0) + weight
        total += weight
        if best is None or current[key] > current[best]:
            best = key
    current[best] -= total
    return best


def hashed_choice(weights: Mapping[int, int], client: str) -> int:
    """The revision a client's hash falls in, so the same client stays on one revision (ip_hash
    balancing) while the split holds, and moves only when its bucket's revision changes."""
    if not weights:
        raise ValueError("no revision has a share")
    total = sum(weights.values())
    bucket = int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest(), "big") % total
    for key, weight in sorted(weights.items()):
        if bucket < weight:
            return key
        bucket -= weight
    return max(weights)  # unreachable: the buckets cover the total
