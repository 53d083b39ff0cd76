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
from workflows.placement import CPU_CLASS
from workflows.pool import QUERY_QUEUE, SIGNAL_DRAIN, SIGNAL_UNDRAIN, HostRef, PoolView, pool_workflow_id

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


def placement_forecast(spec: dict) -> list[str]:
    """What would happen to the endpoint's next instance now, per pool, as its pool sees it
    (the review page says it before the user confirms: README.md "Many GPU hosts"): it starts
    at once on a host with room, or queues at a position behind the requests of its class."""
    gpu_count = int(spec.get("gpu_count") or 0)
    kind = spec.get("gpu_type") if gpu_count else CPU_CLASS
    needs = (f"{gpu_count} {kind} GPU{'s' if gpu_count > 1 else ''}" if gpu_count else "no GPU")
    out = []
    for pool in spec.get("pools") or []:
        try:
            view: PoolView = bridge().query_workflow(pool_workflow_id(pool), QUERY_QUEUE, PoolView)
        except (TemporalUnavailable, WorkflowActionError) as exc:
            out.append(f"Pool {pool}: could not ask it where an instance would go ({exc}).")
            continue
        ahead = sum(1 for entry in view.queue if entry.kind == kind)
        room = [h for h in view.hosts if h.state == "up"
                and len(h.free_gpus.get(kind, [])) >= gpu_count
                and h.free_cpu_cores >= float(spec.get("cpu_cores") or 0)
                and h.free_memory_gb >= float(spec.get("memory_gb") or 0)
                and h.free_disk_gb >= float(spec.get("disk_gb") or 0)]
        if room and not ahead:
            out.append(f"Pool {pool}: an instance ({needs}) would start at once; {len(room)} of its "
                       f"{len(view.hosts)} host{'s' if len(view.hosts) != 1 else ''} "
                       f"ha{'ve' if len(room) != 1 else 's'} room now.")
        else:
            free = sum(len(h.free_gpus.get(kind, [])) for h in view.hosts if h.state == "up") if gpu_count else None
            out.append(f"Pool {pool}: an instance ({needs}) would queue at position {ahead + 1}"
                       + (f" ({free} {kind} free across the pool's hosts now)" if free is not None else
                          " (no host has the CPU, memory and disk free now)")
                       + "; it starts when a host of the pool frees room, first come first served.")
    return out


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
