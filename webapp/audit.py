"""The audit log: every change made through the web app, with who made it (user, and whether by
session or which token), what, when and from where (README.md "Accounts and projects").

Entries are written where the change is made, right after it is committed or sent to the
endpoint's workflow (webapp/views_common.py, webapp/api_keys.py, webapp/registry.py,
webapp/projects.py, webapp/auth.py, webapp/hosts.py), so the UI and the API record the same
thing. A site admin reads the whole log (`/audit`, `GET /api/v1/audit`); a project's members read
an endpoint's part of it on its page and at `GET /api/v1/endpoints/<name>/audit`.
"""
from __future__ import annotations

import json
from typing import Any

from flask import g, has_request_context, request
from flask_login import current_user
from sqlalchemy import select

from common.account_models import AuditEntry, Project, User
from common.models import Endpoint, utcnow
from webapp.extensions import db

MAX_LIMIT = 1000


def record(action: str, *, endpoint: Endpoint | None = None, project: Project | int | None = None,
           target: str = "", detail: Any = "", user: User | None = None, via: str | None = None) -> AuditEntry:
    """Write one entry now (its own commit). `detail` is text or a JSON-able value; it must never
    hold a secret value (the spec's changes mask them, webapp/spec.py `changes`)."""
    if user is None and has_request_context() and current_user.is_authenticated:
        user = current_user
    project_id = project.id if isinstance(project, Project) else project
    if project_id is None and endpoint is not None:
        project_id = endpoint.project_id
    project_name = ""
    if project_id is not None:
        row = project if isinstance(project, Project) else db.session.get(Project, project_id)
        project_name = row.name if row is not None else ""
    entry = AuditEntry(
        at=utcnow(), user_id=user.id if user is not None else None, user_name=user.name if user is not None else "",
        via=(via if via is not None else g.get("auth_via", "")) if has_request_context() else (via or ""),
        remote_addr=(request.remote_addr or "")[:64] if has_request_context() else "",
        action=action, project_id=project_id, project_name=project_name,
        endpoint_name=endpoint.name if endpoint is not None else "", target=str(target)[:255],
        detail=detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False, default=str))
    db.session.add(entry)
    db.session.commit()
    return entry


def entry_json(entry: AuditEntry) -> dict:
    from webapp.views_common import iso

    return {"id": entry.id, "at": iso(entry.at), "user": entry.user_name, "via": entry.via,
            "remote_addr": entry.remote_addr, "action": entry.action, "project": entry.project_name or None,
            "endpoint": entry.endpoint_name or None, "target": entry.target, "detail": entry.detail}


def entries(*, endpoint: Endpoint | None = None, project_id: int | None = None, endpoint_name: str | None = None,
            limit: int = 200) -> list[AuditEntry]:
    """Newest first. An endpoint's entries are those of its name in its project (a name used again
    after a terminate, in another project, shows none of the earlier endpoint's)."""
    statement = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
    if endpoint is not None:
        statement = statement.where(AuditEntry.endpoint_name == endpoint.name,
                                    AuditEntry.project_id == endpoint.project_id)
    if project_id is not None:
        statement = statement.where(AuditEntry.project_id == project_id)
    if endpoint_name is not None:
        statement = statement.where(AuditEntry.endpoint_name == endpoint_name)
    return list(db.session.scalars(statement))


def parse_limit(raw: str | None, default: int = 200) -> int:
    if raw in (None, ""):
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number between 1 and {MAX_LIMIT}, got {raw[:20]!r}")
    return int(raw)
