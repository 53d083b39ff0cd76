"""What the UI and the JSON API share: endpoint lookup, JSON shapes, lifecycle actions, logs."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flask import abort, g
from sqlalchemy import select

from common.models import (
    FAILED,
    STOPPED,
    STOPPING,
    TERMINATED,
    Endpoint,
    Event,
    Instance,
)
from common.account_models import Project
from webapp import audit
from webapp.auth import require_role
from webapp.extensions import bridge, db, settings
from common.temporal_bridge import TIMEOUT, TemporalUnavailable, WorkflowActionError
from webapp.spec import SPEC_FIELDS
from workflows.contracts import (
    SIGNAL_RESTART,
    SIGNAL_STOP,
    SIGNAL_TERMINATE,
    SIGNAL_WAKE,
    UPDATE_SCALE_OUT,
    UPDATE_WAKE,
    ActionRequest,
    ScaleOutRequest,
    WakeRequest,
)

ACTIONS = ("stop", "restart", "terminate", "wake", "scale-out")
_SIGNALS = {"stop": SIGNAL_STOP, "restart": SIGNAL_RESTART, "terminate": SIGNAL_TERMINATE, "wake": SIGNAL_WAKE}
SECRET_MASK = "••••"
MAX_LOG_LINES = 5000


def get_endpoint(name: str, level: str | None = None) -> Endpoint:
    """The endpoint the URL names, if the user may see it: another project's is a 404, as if it
    did not exist; a member whose role is below `level` (default: the view's declared one) gets a
    403 (webapp/auth.py)."""
    endpoint = db.session.scalar(select(Endpoint).where(Endpoint.name == name))
    not_found = f"no endpoint named {name!r}"
    if endpoint is None:
        abort(404, description=not_found)
    require_role(endpoint.project_id, not_found, level)
    return endpoint


def project_name(project_id: int) -> str:
    """A project's name, looked up once per request."""
    names = g.setdefault("project_names", {})
    if project_id not in names:
        project = db.session.get(Project, project_id)
        names[project_id] = project.name if project is not None else ""
    return names[project_id]


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    # SQLite returns naive datetimes; every timestamp we store is UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def endpoint_url(endpoint: Endpoint) -> str:
    return f"{settings().proxy_url.rstrip('/')}/e/{endpoint.name}/"


def public_env(env: list[dict]) -> list[dict]:
    """Env entries as shown to users: secret values never leave the server."""
    return [
        {"key": item["key"], "value": None if item.get("secret") else item.get("value", ""), "secret": bool(item.get("secret"))}
        for item in env or []
    ]


def instance_json(instance: Instance, now: datetime | None = None) -> dict:
    from common.cost import instance_usage, price_of

    usage = instance_usage(instance, now or datetime.now(timezone.utc), settings().price_list)
    return {
        "id": instance.id,
        "status": instance.status,
        "revision": instance.revision,
        "host": instance.host,
        "address": instance.address,
        "gpus": list(instance.gpus or []),
        "gpu_type": instance.gpu_type,
        "created_at": iso(instance.created_at),
        "started_at": iso(instance.started_at),
        "ready_at": iso(instance.ready_at),
        "stopped_at": iso(instance.stopped_at),
        "gpu_seconds": round(usage.gpu_seconds, 3),
        "price_per_hour": price_of(instance, settings().price_list),
        "billed_seconds": round(usage.billed_seconds, 3),
        "cost": round(usage.cost, 6),
        "queue_position": instance.queue_position,
        "reason": instance.reason,
    }


def usage_json(endpoint: Endpoint, now: datetime) -> dict:
    """An endpoint's billed time and cost (README.md "Cost"), in all and this month."""
    from common.cost import endpoint_usage

    usage = endpoint_usage(endpoint.instances, now, settings().price_list)
    return {"gpu_seconds": round(usage.gpu_seconds, 3), "billed_seconds": round(usage.billed_seconds, 3),
            "cost": round(usage.cost, 6), "cost_this_month": round(usage.month_cost, 6),
            "currency": settings().currency, "running": usage.running}


def endpoint_json(endpoint: Endpoint, with_instances: bool = True) -> dict:
    now = datetime.now(timezone.utc)
    body: dict[str, Any] = {field: getattr(endpoint, field) for field in SPEC_FIELDS}
    body["env"] = public_env(endpoint.env)
    body.update(
        project=project_name(endpoint.project_id),
        status=endpoint.status,
        status_reason=endpoint.status_reason,
        queue_position=endpoint.queue_position,
        url=endpoint_url(endpoint),
        created_at=iso(endpoint.created_at),
        spec_updated_at=iso(endpoint.spec_updated_at),
        stopped_at=iso(endpoint.stopped_at),
        purge_at=iso(endpoint.purge_at),
        workflow_id=endpoint.workflow_id,
        has_api_keys=any(key.revoked_at is None for key in endpoint.api_keys),
        usage=usage_json(endpoint, now),
        # README.md "Revisions and updates": the newest revision, and the traffic split.
        revision=max((r.number for r in endpoint.revisions), default=0),
        traffic={str(r.number): r.traffic for r in sorted(endpoint.revisions, key=lambda r: r.number)
                 if r.traffic > 0},
    )
    if with_instances:
        body["instances"] = [instance_json(i, now) for i in endpoint.instances]
    return body


def recent_events(endpoint: Endpoint, limit: int = 200) -> list[Event]:
    return list(
        db.session.scalars(
            select(Event).where(Event.endpoint_id == endpoint.id).order_by(Event.at.desc(), Event.id.desc()).limit(limit)
        )
    )


def event_json(event: Event) -> dict:
    return {"at": iso(event.at), "kind": event.kind, "instance_id": event.instance_id, "message": event.message}


# ---- lifecycle actions ----


def action_refusal(endpoint: Endpoint, action: str) -> str | None:
    """Why `action` is not allowed in the endpoint's current state, or None when it is."""
    status = endpoint.status
    if status == TERMINATED:
        return f"endpoint {endpoint.name!r} is terminated; create it again to use the name"
    if status == FAILED and action != "terminate":
        reason = f" ({endpoint.status_reason})" if endpoint.status_reason else ""
        return f"endpoint {endpoint.name!r} failed{reason}; a failed endpoint can only be terminated"
    if action == "stop" and status in (STOPPED, STOPPING):
        return f"endpoint {endpoint.name!r} is already {status}"
    if action in ("wake", "scale-out") and status in (STOPPED, STOPPING):
        return f"endpoint {endpoint.name!r} is {status} and will not wake; restart it first"
    return None


def _update_timeout(endpoint: Endpoint) -> float:
    # Covers GPU queueing plus deploy and start; the workflow enforces the startup timeout itself.
    return float(endpoint.startup_timeout_seconds) + 30.0


def perform_action(endpoint: Endpoint, action: str, wait: bool = False, timeout: float | None = None) -> dict:
    """Send the action to the endpoint's workflow. Raises TemporalUnavailable / WorkflowActionError.

    wake without `wait` and stop/restart/terminate are signals (fire and forget); scale-out and
    wake with `wait` are updates that return once an instance is ready.
    """
    request_id = uuid.uuid4().hex
    timeout = timeout if timeout is not None else _update_timeout(endpoint)
    try:
        if action == "scale-out":
            result = bridge().update(endpoint.name, UPDATE_SCALE_OUT, ScaleOutRequest(request_id=request_id), timeout)
            answer = {"instance_id": _field(result, "instance_id"), "address": _field(result, "address")}
        elif action == "wake" and wait:
            result = bridge().update(endpoint.name, UPDATE_WAKE, WakeRequest(request_id=request_id), timeout)
            answer = {
                "instance_id": _field(result, "instance_id"),
                "address": _field(result, "address"),
                "cold_start": _field(result, "cold_start"),
            }
        else:
            bridge().signal(endpoint.name, _SIGNALS[action],
                            ActionRequest(reason=f"{action} requested from the web app", request_id=request_id))
            answer = {"accepted": True, "request_id": request_id}
    except WorkflowActionError as exc:
        if exc.type == TIMEOUT:  # accepted by the workflow, still under way
            audit.record(f"endpoint.{action}", endpoint=endpoint, detail={"request_id": request_id,
                                                                         "outcome": "accepted, not done in time"})
        raise
    audit.record(f"endpoint.{action}", endpoint=endpoint, detail={"request_id": request_id, **(
        {"instance_id": answer["instance_id"]} if answer.get("instance_id") else {})})
    return answer


def _field(result: Any, name: str) -> Any:
    if isinstance(result, dict):
        return result.get(name)
    return getattr(result, name, None)


# ---- logs ----


def tail_lines(path: str, count: int) -> list[str]:
    """The last `count` lines of a file, oldest first, reading backwards from the end."""
    if count <= 0 or not path or not os.path.isfile(path):
        return []
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        position = handle.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(65536, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:]


def parse_line_count(raw: str | None, default: int = 200) -> int:
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"lines must be a whole number between 1 and {MAX_LOG_LINES}, got {raw!r}") from None
    if not 1 <= value <= MAX_LOG_LINES:
        raise ValueError(f"lines must be between 1 and {MAX_LOG_LINES}, got {value}")
    return value


def endpoint_logs(endpoint: Endpoint, instance_id: str | None, count: int) -> list[dict]:
    """Log lines newest first: the newest instance's lines first, at most `count` in all."""
    instances = [i for i in endpoint.instances if instance_id in (None, "", i.id)]
    instances.sort(key=lambda i: (iso(i.created_at) or "", i.id), reverse=True)
    lines: list[dict] = []
    for instance in instances:
        remaining = count - len(lines)
        if remaining <= 0:
            break
        for line in reversed(tail_lines(instance.log_path, remaining)):
            lines.append({"instance_id": instance.id, "line": line})
    return lines


# ---- spec writes (the only endpoint columns the web app writes) ----


def previous_still_finishing(name: str) -> str | None:
    """A message when a terminated endpoint of this name still has its workflow open.

    Its workflow id is the new endpoint's id too; creating now would attach the new row to
    the old, finishing workflow. Raises TemporalUnavailable when that cannot be checked.
    """
    tombstone = db.session.scalar(select(Endpoint).where(Endpoint.name == name))
    if tombstone is None or tombstone.status != TERMINATED:
        return None
    if bridge().is_running(name):
        return f"the terminated endpoint {name!r} is still being purged; try again in a few seconds"
    return None


def create_endpoint_row(clean: dict, project: Project) -> Endpoint:
    """Insert the endpoint in `project`; a terminated row with the same name is a tombstone and is
    replaced. Raises QuotaExceeded (and keeps nothing) when concurrent creates went past the
    project's quota (webapp/projects.py `over_quota_after_insert`)."""
    from webapp.projects import QuotaExceeded, over_quota_after_insert
    from webapp.spec import changes

    tombstone = db.session.scalar(select(Endpoint).where(Endpoint.name == clean["name"]))
    if tombstone is not None:
        db.session.delete(tombstone)
        db.session.flush()
    from common.revisions import first_revision

    endpoint = Endpoint(**clean, project_id=project.id)
    endpoint.revisions.append(first_revision(endpoint))
    db.session.add(endpoint)
    db.session.commit()
    refusal = over_quota_after_insert(endpoint)
    if refusal:
        db.session.delete(endpoint)
        db.session.commit()
        raise QuotaExceeded(refusal)
    audit.record("endpoint.create", endpoint=endpoint, detail={"changes": changes(None, clean)})
    return endpoint


def update_endpoint_row(endpoint: Endpoint, clean: dict) -> list[str]:
    """Write changed spec fields; returns their names. Immutable fields are never written."""
    from common.models import utcnow
    from common.spec_fields import IMMUTABLE, fields_of

    immutable = set(fields_of(IMMUTABLE))
    changed = []
    for name, value in clean.items():
        if name in immutable:
            continue
        if getattr(endpoint, name) != value:
            setattr(endpoint, name, value)
            changed.append(name)
    if changed:
        endpoint.spec_updated_at = utcnow()
    db.session.commit()
    return changed


@dataclass
class UpdateOutcome:
    """What an update of a spec did (README "Changing an endpoint", "Revisions and updates")."""

    changes: list[dict] = field(default_factory=list)  # {"field", "edit", "from", "to"}
    # Fields whose change needs a restart, while instances run: not saved unless restart=True.
    needs_restart: list[str] = field(default_factory=list)
    saved: bool = False
    restarted: bool = False
    # Saved, but Temporal could not be told (the next action tells it): the reason.
    unnotified: str = ""
    # A change to what runs makes a revision, rolled out by an update (its number and strategy).
    revision: int | None = None
    rollout: int | None = None
    strategy: str | None = None
    # Not saved: another update is in progress (the message says what to do).
    blocked: str = ""

    def json(self) -> dict:
        return {"changes": self.changes, "restart_required": self.needs_restart, "saved": self.saved,
                "restarted": self.restarted, "revision": self.revision, "rollout": self.rollout,
                "strategy": self.strategy, **({"warning": self.unnotified} if self.unnotified else {})}


def has_live_instances(endpoint: Endpoint) -> bool:
    from common.models import INSTANCE_LIVE_STATES

    return any(i.status in INSTANCE_LIVE_STATES for i in endpoint.instances)


def apply_update(endpoint: Endpoint, clean: dict, restart: bool = False, dry_run: bool = False,
                 options=None) -> UpdateOutcome:
    """Save a validated spec over `endpoint`, by edit class: live changes are saved and reach the
    running instances through the workflow (spec_changed); restart-class changes (what runs)
    make a new revision, rolled out by an update (`options`: its strategy, rolling by default),
    which while instances run needs `restart` or a strategy named in `options`; with nothing
    running the new revision takes over at once. `dry_run` says what would happen and does nothing."""
    from common.spec_fields import RESTART
    from webapp.revisions import UpdateOptions, deploy, field_of, make_revision, rollout_in_progress
    from webapp.spec import changes

    outcome = UpdateOutcome(changes=changes(endpoint, clean))
    if not outcome.changes:
        return outcome
    options = options or UpdateOptions()
    running = has_live_instances(endpoint)
    restart_fields = [c["field"] for c in outcome.changes if c["edit"] == RESTART]
    if restart_fields and running and not (restart or options.given):
        outcome.needs_restart = restart_fields
        return outcome
    if restart_fields and (blocker := rollout_in_progress(endpoint)):
        outcome.blocked = blocker
        return outcome
    if dry_run:
        return outcome
    changed = update_endpoint_row(endpoint, clean)
    outcome.saved = True
    audit.record("endpoint.update", endpoint=endpoint, detail={"changes": outcome.changes})
    revision = make_revision(endpoint, "changed: " + ", ".join(restart_fields)) if restart_fields else None
    try:
        notify_spec_changed(endpoint, changed)
        if revision is not None:
            outcome.revision = revision.number
            accepted = deploy(endpoint, revision.number, options)
            outcome.rollout, outcome.strategy = field_of(accepted, "rollout"), options.strategy
            outcome.restarted = running
    except (TemporalUnavailable, WorkflowActionError) as exc:
        outcome.unnotified = f"saved, but the endpoint's workflow was not told ({exc}); any later action tells it"
        if revision is not None:
            outcome.unnotified = (f"saved as revision {revision.number}, but it was not rolled out ({exc}); roll it "
                                  f"out with POST /api/v1/endpoints/{endpoint.name}/deploy?revision={revision.number}")
    return outcome


def restart_message(fields: list[str]) -> str:
    return (f"{', '.join(fields)} {'needs' if len(fields) == 1 else 'need'} a restart of the running instances "
            "to take effect; send the change again with ?restart=true (or confirm it in the UI) to save it and "
            "restart them")


def notify_spec_changed(endpoint: Endpoint, changed: list[str]) -> None:
    from workflows.contracts import SIGNAL_SPEC_CHANGED

    reason = "spec changed: " + ", ".join(changed)
    bridge().signal(endpoint.name, SIGNAL_SPEC_CHANGED, ActionRequest(reason=reason, request_id=uuid.uuid4().hex))
