"""Revisions, the traffic split and updates, as the UI and the JSON API share them (README.md
"Revisions and updates").

The web app makes revisions (a new one whenever a change to what runs is saved, or on a redeploy)
and asks the endpoint's workflow to roll them out, split traffic, roll back or promote; the
workflow decides, and its activities write each revision's state and traffic share.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from sqlalchemy import func, select

from common.models import INSTANCE_LIVE_STATES, Endpoint, Revision
from common.revisions import (
    BLUE_GREEN,
    CANARY,
    R_DEPLOYING,
    R_FAILED,
    R_SERVING,
    STRATEGIES,
    SplitError,
    check_split,
    first_revision,
    public_value,
    revision_changes,
    revision_spec,
)
from webapp.extensions import bridge, db
from webapp.views_common import iso
from workflows.contracts import (
    UPDATE_DEPLOY,
    UPDATE_PROMOTE,
    UPDATE_ROLLBACK,
    UPDATE_SET_TRAFFIC,
    DeployRequest,
    PromoteRequest,
    RollbackRequest,
    TrafficSplitRequest,
)

# How long the web app waits for the workflow to accept an update (it answers at once; the update
# itself runs on in its RolloutWorkflow).
ACCEPT_SECONDS = 30.0
MAX_STEPS = 10
MAX_OPTION_SECONDS = 7 * 24 * 3600


class OptionsError(ValueError):
    """Bad update options; `errors` maps each parameter to what to change."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


@dataclass
class UpdateOptions:
    """How one update rolls out (the query parameters of PATCH, apply and deploy)."""

    strategy: str = "rolling"
    steps: list[int] = field(default_factory=list)
    pause_seconds: float | None = None
    manual: bool = False
    settle_seconds: float | None = None
    error_rate: float | None = None
    window_seconds: float | None = None
    given: bool = False  # a strategy was named: the caller confirms the update

    def request(self, revision: int) -> DeployRequest:
        return DeployRequest(revision=revision, strategy=self.strategy, steps=list(self.steps),
                             pause_seconds=self.pause_seconds, manual=self.manual,
                             settle_seconds=self.settle_seconds, error_rate=self.error_rate,
                             window_seconds=self.window_seconds, request_id=uuid.uuid4().hex)


def parse_options(args: Mapping[str, Any]) -> UpdateOptions:
    """`strategy` (rolling, blue-green, canary), `steps` (canary percentages, e.g. 10,50),
    `pause` (seconds between canary steps, or `manual`), `settle`, `window` (seconds),
    `error_rate` (0-1). Raises OptionsError naming each bad one."""
    errors: dict[str, str] = {}
    options = UpdateOptions()
    strategy = (args.get("strategy") or "").strip().lower().replace("_", "-")
    if strategy:
        if strategy not in STRATEGIES:
            errors["strategy"] = f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
        else:
            options.strategy, options.given = strategy, True
    raw_steps = (args.get("steps") or "").strip()
    if raw_steps:
        try:
            steps = [int(part) for part in raw_steps.split(",") if part.strip()]
        except ValueError:
            steps = []
        if not steps or len(steps) > MAX_STEPS or any(not 1 <= p <= 100 for p in steps) or steps != sorted(set(steps)):
            errors["steps"] = (f"steps must be increasing whole percentages from 1 to 100, comma-separated "
                               f"(at most {MAX_STEPS}), e.g. 10,50; got {raw_steps!r}")
        else:
            options.steps = steps
        if options.strategy != CANARY and "strategy" not in errors:
            errors["steps"] = "steps are for a canary update: add strategy=canary"
    pause = (args.get("pause") or "").strip().lower()
    if pause == "manual":
        options.manual = True
    elif pause:
        options.pause_seconds = _seconds(pause, "pause", errors, extra=" or manual")
    for name, attribute in (("settle", "settle_seconds"), ("window", "window_seconds")):
        raw = (args.get(name) or "").strip()
        if raw:
            setattr(options, attribute, _seconds(raw, name, errors))
    raw_rate = (args.get("error_rate") or "").strip()
    if raw_rate:
        try:
            rate = float(raw_rate)
        except ValueError:
            rate = -1.0
        if not 0 <= rate <= 1:
            errors["error_rate"] = f"error_rate must be a fraction from 0 to 1 (0.05 is 5%), got {raw_rate!r}"
        else:
            options.error_rate = rate
    if (options.manual or options.pause_seconds is not None) and options.strategy != CANARY \
            and "strategy" not in errors:
        errors["pause"] = "pause is for a canary update: add strategy=canary"
    if options.window_seconds is not None and options.strategy != BLUE_GREEN and "strategy" not in errors:
        errors["window"] = "window is for a blue-green update: add strategy=blue-green"
    if errors:
        raise OptionsError(errors)
    return options


def _seconds(raw: str, name: str, errors: dict, extra: str = "") -> float | None:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_OPTION_SECONDS:  # NaN fails this too
        errors[name] = f"{name} must be a number of seconds from 0 to {MAX_OPTION_SECONDS}{extra}, got {raw!r}"
        return None
    return value


# ---- rows --------------------------------------------------------------------------------------


def make_revision(endpoint: Endpoint, reason: str) -> Revision:
    """A new revision from the endpoint's spec as it stands now (saved)."""
    last = db.session.scalar(select(func.max(Revision.number)).where(Revision.endpoint_id == endpoint.id)) or 0
    revision = Revision(endpoint_id=endpoint.id, number=last + 1, spec=revision_spec(endpoint), reason=reason)
    db.session.add(revision)
    db.session.commit()
    return revision


def revisions_of(endpoint: Endpoint) -> list[Revision]:
    """Newest first."""
    return list(db.session.scalars(select(Revision).where(Revision.endpoint_id == endpoint.id)
                                   .order_by(Revision.number.desc())))


def traffic_of(endpoint: Endpoint) -> dict[str, int]:
    return {str(r.number): r.traffic for r in sorted(endpoint.revisions, key=lambda r: r.number) if r.traffic > 0}


def revision_json(revision: Revision, previous: Revision | None, live: int = 0) -> dict:
    spec = revision.spec or {}
    return {
        "number": revision.number,
        "state": revision.state,
        "state_reason": revision.state_reason,
        "traffic": revision.traffic,
        "strategy": revision.strategy,
        "reason": revision.reason,
        "created_at": iso(revision.created_at),
        "source": {"commit": revision.source_commit, "snapshot": bool(revision.source_snapshot),
                   "pinned_at": iso(revision.pinned_at)},
        "live_instances": live,
        "spec": {name: public_value(name, value) for name, value in spec.items()},
        "changes": revision_changes(previous.spec if previous is not None else None, spec),
    }


def revisions_json(endpoint: Endpoint) -> list[dict]:
    rows = revisions_of(endpoint)
    live: dict[int, int] = {}
    for instance in endpoint.instances:
        if instance.status in INSTANCE_LIVE_STATES:
            live[instance.revision] = live.get(instance.revision, 0) + 1
    return [revision_json(row, rows[i + 1] if i + 1 < len(rows) else None, live.get(row.number, 0))
            for i, row in enumerate(rows)]


def rollout_in_progress(endpoint: Endpoint) -> str | None:
    """Why another update must wait, or None."""
    for revision in endpoint.revisions:
        if revision.state == R_DEPLOYING:
            return (f"revision {revision.number} is rolling out ({revision.strategy or 'rolling'}): wait for it, "
                    "promote it or roll it back first")
    return None


def checked_split(endpoint: Endpoint, raw: Any) -> dict[int, int]:
    """Raises SplitError saying what to change."""
    rows = endpoint.revisions
    unusable = {r.number: f"its source could not be pinned ({r.state_reason})" for r in rows
                if r.state == R_FAILED and r.pinned_at is None and r.state_reason}
    return check_split(raw, [r.number for r in rows], unusable)


# ---- asking the workflow -------------------------------------------------------------------------


def deploy(endpoint: Endpoint, number: int, options: UpdateOptions) -> Any:
    result = bridge().update(endpoint.name, UPDATE_DEPLOY, options.request(number), ACCEPT_SECONDS)
    _audit("endpoint.deploy", endpoint, {"revision": number, "strategy": options.strategy})
    return result


def set_traffic(endpoint: Endpoint, split: dict[int, int]) -> Any:
    result = bridge().update(endpoint.name, UPDATE_SET_TRAFFIC, TrafficSplitRequest(split, uuid.uuid4().hex),
                             ACCEPT_SECONDS)
    _audit("endpoint.traffic", endpoint, {"traffic": {str(n): p for n, p in split.items()}})
    return result


def rollback(endpoint: Endpoint, reason: str) -> Any:
    result = bridge().update(endpoint.name, UPDATE_ROLLBACK, RollbackRequest(reason, uuid.uuid4().hex),
                             ACCEPT_SECONDS)
    _audit("endpoint.rollback", endpoint, {"reason": reason})
    return result


def promote(endpoint: Endpoint) -> Any:
    result = bridge().update(endpoint.name, UPDATE_PROMOTE, PromoteRequest(uuid.uuid4().hex), ACCEPT_SECONDS)
    _audit("endpoint.promote", endpoint, {})
    return result


def _audit(action: str, endpoint: Endpoint, detail: dict) -> None:
    """Who changed what runs or where traffic goes (README.md "Accounts and projects", audit log)."""
    from webapp import audit

    audit.record(action, endpoint=endpoint, detail=detail)


def field_of(result: Any, name: str) -> Any:
    if isinstance(result, dict):
        return result.get(name)
    return getattr(result, name, None)


__all__ = ["OptionsError", "SplitError", "UpdateOptions", "parse_options", "first_revision", "make_revision",
           "revisions_json", "traffic_of", "rollout_in_progress", "checked_split", "deploy", "set_traffic",
           "rollback", "promote", "field_of"]
