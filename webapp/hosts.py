"""Hosts and pools (docs/architecture.md "Hosts and pools"): the hosts page, `GET /api/v1/hosts`,
and an operator's drain / undrain of a host (also from the Temporal CLI: a `drain_host` signal
to the pool's workflow, `pool-<name>`).

What a host has comes from the database (its worker writes it); what is in use, from the live
instances placed there; its state (up, draining, down), from its pool's workflow.
"""
from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, flash, redirect, render_template, request, url_for
from sqlalchemy import select

from common.models import INSTANCE_LIVE_STATES, Endpoint, Host, Instance
from common.temporal_bridge import TemporalUnavailable, WorkflowActionError
from webapp import audit
from webapp.auth import SIGNED_IN, SITE_ADMIN, access, visible_project_ids
from webapp.extensions import bridge, db
from webapp.forms import ActionForm
from workflows.pool import SIGNAL_DRAIN, SIGNAL_UNDRAIN, HostRef, pool_workflow_id

api_bp = Blueprint("hosts_api", __name__, url_prefix="/api/v1")
ui_bp = Blueprint("hosts", __name__)
OPERATIONS = {"drain": SIGNAL_DRAIN, "undrain": SIGNAL_UNDRAIN}


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()


def hosts_json() -> list[dict]:
    """Every host with its GPUs (used and free per type) and the instances placed on it. Another
    project's instances count as used but are not named (webapp/auth.py: they do not exist for you)."""
    hosts = db.session.scalars(select(Host).order_by(Host.pool, Host.name)).all()
    shown = visible_project_ids()
    rows = db.session.execute(
        select(Instance.id, Instance.host, Instance.status, Instance.gpus, Instance.gpu_type, Endpoint.name,
               Endpoint.project_id)
        .join(Endpoint, Endpoint.id == Instance.endpoint_id)
        .where(Instance.status.in_(INSTANCE_LIVE_STATES), Instance.host != "")).all()
    on_host: dict[str, list] = {}
    for row in rows:
        on_host.setdefault(row.host, []).append(row)
    now = datetime.now(timezone.utc)
    out = []
    for host in hosts:
        placed = on_host.get(host.name, [])
        used = {(row.gpu_type, index): row.id for row in placed for index in (row.gpus or [])}
        gpus = [{**gpu, "instance": used.get((gpu["type"], gpu["index"]))} for gpu in host.gpus or []]
        summary: dict[str, dict] = {}
        for gpu in gpus:
            entry = summary.setdefault(gpu["type"], {"total": 0, "used": 0, "free": 0})
            entry["total"] += 1
            entry["used" if gpu["instance"] else "free"] += 1
        if shown is not None:
            foreign = {row.id for row in placed if row.project_id not in shown}
            placed = [row for row in placed if row.id not in foreign]
            gpus = [{**gpu, "instance": None if gpu["instance"] in foreign else gpu["instance"]} for gpu in gpus]
        seen = host.last_heartbeat_at
        seen = seen if seen is None or seen.tzinfo else seen.replace(tzinfo=timezone.utc)
        out.append({
            "name": host.name, "pool": host.pool, "state": host.state, "state_reason": host.state_reason,
            "address": host.advertise_address, "backend": host.backend, "network_namespaces": host.netns or None,
            "gpus": gpus, "gpu_summary": summary,
            "cpu_cores": host.cpu_cores, "memory_gb": host.memory_gb, "disk_gb": host.disk_gb,
            "instances": [{"id": row.id, "endpoint": row.name, "status": row.status, "gpus": row.gpus or []}
                          for row in placed],
            "started_at": _iso(host.started_at), "last_heartbeat_at": _iso(host.last_heartbeat_at),
            "seconds_since_heartbeat": None if seen is None else round((now - seen).total_seconds(), 1),
        })
    return out


def _operate(name: str, operation: str) -> tuple[str, int]:
    """Drain or undrain through the host's pool; returns (message, HTTP status)."""
    host = db.session.get(Host, name)
    if host is None:
        return f"no host named {name!r}", 404
    try:
        bridge().signal_workflow(pool_workflow_id(host.pool), OPERATIONS[operation],
                                 HostRef(name, f"{operation}ed from the web app"))
    except (TemporalUnavailable, WorkflowActionError) as exc:
        return f"could not {operation} {name}: {exc}", 503
    audit.record(f"host.{operation}", target=name)
    what = "takes no new instances; those running finish" if operation == "drain" else "takes new instances again"
    return f"host {name} {what}", 202


@api_bp.get("/hosts")
@access(SIGNED_IN)
def list_hosts():
    """Every host: pool, state, GPUs used/free per type, instances on it."""
    return {"hosts": hosts_json()}


@api_bp.post("/hosts/<name>/<operation>")
@access(SITE_ADMIN)
def host_operation(name: str, operation: str):
    """drain (no new instances; those running finish) or undrain a host."""
    if operation not in OPERATIONS:
        return {"error": f"unknown operation {operation!r}; use drain or undrain", "errors": {}}, 404
    message, status = _operate(name, operation)
    if status >= 400:
        return {"error": message, "errors": {}}, status
    return {"host": name, "operation": operation, "message": message}, status


@ui_bp.get("/hosts")
@access(SIGNED_IN)
def hosts_page():
    """The hosts page: every host of every pool."""
    return render_template("hosts.html", hosts=hosts_json(), form=ActionForm())


@ui_bp.post("/hosts/<name>/<operation>")
@access(SITE_ADMIN)
def host_button(name: str, operation: str):
    """The drain / undrain buttons."""
    ActionForm().validate_on_submit()
    if operation not in OPERATIONS:
        flash(f"Unknown operation {operation}.", "error")
    else:
        message, status = _operate(name, operation)
        flash(message[0].upper() + message[1:] + ".", "error" if status >= 400 else "ok")
    return redirect(request.referrer or url_for("hosts.hosts_page"))
