"""Projects, their members and quotas; users; the audit log's pages (README.md "Accounts and
projects").

Every endpoint and model belongs to a project. Its members have a role: a viewer reads, a
developer creates, changes and acts on endpoints, models and keys, an admin also manages the
members. A site admin (`app.py create-user NAME --admin`) is an admin of every project, makes
users and projects and sets quotas. A project may have `max_endpoints` endpoints at once
(stopped and failed ones count; terminated ones do not) and its instances may hold `max_gpus`
GPUs at once (past it they wait in their pool's queue, which says why: workflows/placement.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from wtforms import BooleanField, IntegerField, SelectField, StringField
from wtforms.validators import Length, NumberRange, Optional

from common import accounts
from common.account_models import (
    ADMIN,
    DEFAULT_MAX_ENDPOINTS,
    DEFAULT_PROJECT,
    DEVELOPER,
    ROLES,
    VIEWER,
    Membership,
    Project,
    User,
)
from common.models import FAILED, INSTANCE_LIVE_STATES, STOPPED, TERMINATED, Endpoint, Instance, ModelVersion
from webapp import audit
from webapp.auth import SIGNED_IN, SITE_ADMIN, access, projects_where, require_role, role_in, visible_project_ids
from webapp.extensions import db

ui_bp = Blueprint("projects", __name__)
api_bp = Blueprint("projects_api", __name__, url_prefix="/api/v1")
# Bounds an admin may set; a quota past them is a typo.
MAX_ENDPOINTS_LIMIT = 100000
MAX_GPUS_LIMIT = 100000


def _error(status: int, message: str, errors: dict | None = None):
    return {"error": message, "errors": errors or {}}, status


# ---- lookups ----


def get_project(name: str, level: str | None = None) -> Project:
    """The project named in the URL, if the user may see it (404 otherwise, as for no project) and
    holds `level` there (default: the view's declared one; 403 otherwise)."""
    project = db.session.scalar(select(Project).where(Project.name == name))
    not_found = f"no project named {name!r}"
    if project is None:
        abort(404, description=not_found)
    require_role(project.id, not_found, level)
    return project


def my_projects() -> list[tuple[Project, str]]:
    """(project, role) of every project the user sees, by name; a site admin sees all as admin."""
    return [(p, role_in(p.id)) for p in projects_where(VIEWER)]


def creation_project(requested: str | None) -> Project:
    """The project a new endpoint or model goes to: the one named (`?project=`, or the form's
    choice), where the user must be a developer; else the only project where they are one; else
    `default` when they are a developer there. Aborts saying what to do otherwise."""
    if requested:
        return get_project(requested, DEVELOPER)
    candidates = projects_where(DEVELOPER)
    if len(candidates) == 1:
        return candidates[0]
    default = next((p for p in candidates if p.name == DEFAULT_PROJECT), None)
    if default is not None:
        return default
    if not candidates:
        abort(403, description="you are not a developer of any project; ask a project admin to add you")
    abort(400, description="name the project: ?project=<name>, one of " + ", ".join(p.name for p in candidates))


def visible(statement, column):
    """`statement` narrowed to the rows of the user's projects (all for a site admin)."""
    ids = visible_project_ids()
    return statement if ids is None else statement.where(column.in_(ids))


# ---- quotas ----


class QuotaExceeded(Exception):
    """A create past the project's endpoint quota; the message has the counts and what to do."""


@dataclass
class EndpointUsage:
    used: int
    stopped: int
    failed: int
    limit: int

    def refusal(self, project: str) -> str | None:
        if self.used < self.limit:
            return None
        return (f"project {project} has reached its endpoint quota: {self.used} of {self.limit} used: "
                f"{self.stopped} stopped, {self.failed} failed — terminate one (stopped and failed endpoints "
                "count until they are terminated), or ask a site admin to raise the quota")

    def json(self) -> dict:
        return {"used": self.used, "limit": self.limit, "stopped": self.stopped, "failed": self.failed}


def endpoint_usage(project: Project, up_to_id: int | None = None) -> EndpointUsage:
    """The project's endpoints that count against its quota (all but terminated ones); with
    `up_to_id`, only those created before or with that row."""
    statement = (select(Endpoint.status, func.count()).where(Endpoint.project_id == project.id,
                                                              Endpoint.status != TERMINATED)
                 .group_by(Endpoint.status))
    if up_to_id is not None:
        statement = statement.where(Endpoint.id <= up_to_id)
    counts = dict(db.session.execute(statement).all())
    return EndpointUsage(sum(counts.values()), counts.get(STOPPED, 0), counts.get(FAILED, 0), project.max_endpoints)


def gpus_held(project: Project) -> int:
    """GPUs the project's live instances hold now."""
    rows = db.session.scalars(select(Instance.gpus).join(Endpoint, Endpoint.id == Instance.endpoint_id)
                              .where(Endpoint.project_id == project.id, Instance.status.in_(INSTANCE_LIVE_STATES)))
    return sum(len(gpus or []) for gpus in rows)


def quota_json(project: Project) -> dict:
    return {"endpoints": endpoint_usage(project).json(),
            "gpus": {"held": gpus_held(project), "limit": project.max_gpus}}


def over_quota_after_insert(endpoint: Endpoint) -> str | None:
    """Checked again once a new endpoint's row is committed: of concurrent creates past the quota,
    the later rows (by id) are refused and removed, so the quota holds even then."""
    project = db.session.get(Project, endpoint.project_id)
    usage = endpoint_usage(project, up_to_id=endpoint.id)
    if usage.used <= usage.limit:
        return None
    return EndpointUsage(usage.used - 1, usage.stopped, usage.failed, usage.limit).refusal(project.name)


def foreign_version_error(version_id: int | None) -> str | None:
    """A model version the user cannot see is answered as one that does not exist."""
    if not version_id:
        return None
    version = db.session.get(ModelVersion, version_id)
    if version is None or role_in(version.model.project_id) is None:
        return f"model version {version_id} does not exist; register one under /api/v1/models first"
    return None


# ---- JSON shapes ----


def project_json(project: Project, with_members: bool = False) -> dict:
    from webapp.views_common import iso

    body = {"name": project.name, "role": role_in(project.id), "max_endpoints": project.max_endpoints,
            "max_gpus": project.max_gpus, "quota": quota_json(project), "created_at": iso(project.created_at)}
    if with_members:
        body["members"] = [{"user": m.user.name, "role": m.role} for m in members(project)]
    return body


def members(project: Project) -> list[Membership]:
    return list(db.session.scalars(select(Membership).join(User).where(Membership.project_id == project.id)
                                   .order_by(User.name)))


def user_json(user: User) -> dict:
    from webapp.views_common import iso

    return {"name": user.name, "is_admin": bool(user.is_admin), "created_at": iso(user.created_at),
            "last_login_at": iso(user.last_login_at),
            "projects": [{"name": m.project.name, "role": m.role} for m in user.memberships]}


# ---- changes (shared by the pages and the API) ----


def _quota_value(raw, name: str, high: int, nullable: bool) -> int | None:
    if raw is None and nullable:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= high:
        extra = ", or null for no limit" if nullable else ""
        raise accounts.AccountError(name, f"{name} must be a whole number between 0 and {high}{extra}")
    return raw


def create_project(name: str, max_endpoints=DEFAULT_MAX_ENDPOINTS, max_gpus=None) -> Project:
    name = (name or "").strip() if isinstance(name, str) else name
    if problem := accounts.project_name_error(name):
        raise accounts.AccountError("name", problem)
    if accounts.get_project(db.session, name) is not None:
        raise accounts.AccountError("name", f"a project named {name!r} exists; choose another name")
    project = Project(name=name, max_endpoints=_quota_value(max_endpoints, "max_endpoints", MAX_ENDPOINTS_LIMIT, False),
                      max_gpus=_quota_value(max_gpus, "max_gpus", MAX_GPUS_LIMIT, True))
    db.session.add(project)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise accounts.AccountError("name", f"a project named {name!r} exists; choose another name") from None
    audit.record("project.create", project=project, target=name,
                 detail={"max_endpoints": project.max_endpoints, "max_gpus": project.max_gpus})
    return project


def set_quota(project: Project, changes: dict) -> dict:
    """Apply {max_endpoints?, max_gpus?}; returns what changed."""
    unknown = set(changes) - {"max_endpoints", "max_gpus"}
    if unknown:
        raise accounts.AccountError(sorted(unknown)[0], f"unknown fields {', '.join(sorted(unknown))}; "
                                                        "send max_endpoints and/or max_gpus")
    changed = {}
    if "max_endpoints" in changes:
        value = _quota_value(changes["max_endpoints"], "max_endpoints", MAX_ENDPOINTS_LIMIT, False)
        if value != project.max_endpoints:
            changed["max_endpoints"] = {"from": project.max_endpoints, "to": value}
            project.max_endpoints = value
    if "max_gpus" in changes:
        value = _quota_value(changes["max_gpus"], "max_gpus", MAX_GPUS_LIMIT, True)
        if value != project.max_gpus:
            changed["max_gpus"] = {"from": project.max_gpus, "to": value}
            project.max_gpus = value
    db.session.commit()
    if changed:
        audit.record("project.quota", project=project, target=project.name, detail=changed)
    return changed


def set_member(project: Project, user_name: str, role: str) -> Membership:
    user = accounts.get_user(db.session, (user_name or "").strip()) if isinstance(user_name, str) else None
    if user is None:
        raise accounts.AccountError("user", f"no user named {user_name!r}; a site admin creates users")
    membership = accounts.set_role(db.session, user, project, role)
    db.session.commit()
    audit.record("project.member", project=project, target=user.name, detail={"role": role})
    return membership


def remove_member(project: Project, user_name: str) -> bool:
    user = accounts.get_user(db.session, user_name)
    membership = user and db.session.scalar(select(Membership).where(Membership.user_id == user.id,
                                                                     Membership.project_id == project.id))
    if not membership:
        return False
    db.session.delete(membership)
    db.session.commit()
    audit.record("project.member_removed", project=project, target=user.name)
    return True


def create_user(body: dict) -> tuple[User, str]:
    """A new user from {name, password?, is_admin?, project?, role?}; returns it and its password
    (generated when not given: shown once)."""
    password = body.get("password") or accounts.generate_password()
    is_admin = body.get("is_admin", False)
    if not isinstance(is_admin, bool):
        raise accounts.AccountError("is_admin", "is_admin must be true or false")
    project = body.get("project", DEFAULT_PROJECT)
    if project is not None and not isinstance(project, str):
        raise accounts.AccountError("project", "project must be a project's name, or null for none")
    if project and accounts.get_project(db.session, project) is None:
        raise accounts.AccountError("project", f"no project named {project!r}; create it first")
    role = body.get("role", DEVELOPER)
    try:
        user = accounts.create_user(db.session, body.get("name") if isinstance(body.get("name"), str) else "",
                                    password if isinstance(password, str) else "", is_admin=is_admin,
                                    project=project or None, role=role if isinstance(role, str) else "")
        db.session.commit()
    except (accounts.AccountError, IntegrityError):
        db.session.rollback()
        raise
    audit.record("user.create", target=user.name, detail={"is_admin": is_admin, "project": project, "role": role})
    return user, password


# ---- pages ----


class ProjectForm(FlaskForm):
    name = StringField("Name", validators=[Length(max=63)])
    max_endpoints = IntegerField("Endpoint quota", default=DEFAULT_MAX_ENDPOINTS,
                                 validators=[NumberRange(0, MAX_ENDPOINTS_LIMIT)])
    max_gpus = IntegerField("GPU quota", validators=[Optional(), NumberRange(0, MAX_GPUS_LIMIT)],
                            description="GPUs its instances may hold at once; empty: no limit.")


class MemberForm(FlaskForm):
    user = StringField("User", validators=[Length(max=63)])
    role = SelectField("Role", choices=[(r, r) for r in ROLES], default=DEVELOPER)


class UserForm(FlaskForm):
    name = StringField("Name", validators=[Length(max=63)])
    project = StringField("Project", default=DEFAULT_PROJECT, validators=[Length(max=63)])
    role = SelectField("Role", choices=[(r, r) for r in ROLES], default=DEVELOPER)
    is_admin = BooleanField("Site admin")


@ui_bp.get("/projects")
@access(SIGNED_IN)
def projects_page():
    """Your projects with your role and their quotas; a site admin sees all and creates them."""
    return render_template("projects.html", projects=my_projects(), quota=quota_json,
                           form=ProjectForm(formdata=None) if current_user.is_admin else None)


@ui_bp.post("/projects")
@access(SITE_ADMIN)
def create_project_page():
    """Create a project."""
    form = ProjectForm()
    if form.validate_on_submit():
        try:
            project = create_project(form.name.data, form.max_endpoints.data, form.max_gpus.data)
        except accounts.AccountError as exc:
            flash(str(exc), "error")
        else:
            flash(f"Project {project.name} created.", "ok")
            return redirect(url_for("projects.project_page", project=project.name))
    else:
        flash("; ".join(f"{k}: {', '.join(v)}" for k, v in form.errors.items()), "error")
    return redirect(url_for("projects.projects_page"))


@ui_bp.get("/projects/<project>")
@access(VIEWER)
def project_page(project: str):
    """A project: its members, quotas and audit log."""
    row = get_project(project)
    return render_template("project.html", project=row, role=role_in(row.id), members=members(row),
                           quota=quota_json(row), member_form=MemberForm(formdata=None),
                           quota_form=ProjectForm(formdata=None, max_endpoints=row.max_endpoints,
                                                  max_gpus=row.max_gpus),
                           entries=audit.entries(project_id=row.id, limit=100))


@ui_bp.post("/projects/<project>/members")
@access(ADMIN)
def set_member_page(project: str):
    """Add a member, or change a member's role."""
    row = get_project(project)
    form = MemberForm()
    try:
        set_member(row, form.user.data, form.role.data)
        flash(f"{form.user.data} is now a {form.role.data} of {row.name}.", "ok")
    except accounts.AccountError as exc:
        flash(str(exc), "error")
    return redirect(url_for("projects.project_page", project=row.name))


@ui_bp.post("/projects/<project>/members/<user>/remove")
@access(ADMIN)
def remove_member_page(project: str, user: str):
    """Remove a member."""
    row = get_project(project)
    FlaskForm()  # CSRF checked by CSRFProtect before the view runs
    flash(f"{user} removed from {row.name}." if remove_member(row, user) else f"{user} is no member of {row.name}.",
          "ok")
    return redirect(url_for("projects.project_page", project=row.name))


@ui_bp.post("/projects/<project>/quota")
@access(SITE_ADMIN)
def quota_page(project: str):
    """Set a project's quotas."""
    row = get_project(project)
    form = ProjectForm()
    try:
        set_quota(row, {"max_endpoints": form.max_endpoints.data, "max_gpus": form.max_gpus.data})
        flash("Quotas saved.", "ok")
    except accounts.AccountError as exc:
        flash(str(exc), "error")
    return redirect(url_for("projects.project_page", project=row.name))


@ui_bp.get("/users")
@access(SITE_ADMIN)
def users_page():
    """Every user, with a form to create one."""
    users = db.session.scalars(select(User).order_by(User.name)).all()
    return render_template("users.html", users=users, form=UserForm(formdata=None))


@ui_bp.post("/users")
@access(SITE_ADMIN)
def create_user_page():
    """Create a user; the generated password is shown once."""
    form = UserForm()
    try:
        user, password = create_user({"name": form.name.data or "", "project": form.project.data or None,
                                      "role": form.role.data, "is_admin": bool(form.is_admin.data)})
    except accounts.AccountError as exc:
        flash(str(exc), "error")
        return redirect(url_for("projects.users_page"))
    return render_template("user_created.html", user=user, password=password)


@ui_bp.get("/audit")
@access(SITE_ADMIN)
def audit_page():
    """The whole audit log, newest first."""
    return render_template("audit.html", entries=audit.entries(limit=500))


# ---- API ----


def _json_object():
    body = request.get_json(force=True) if request.get_data(cache=True) else None
    return body if isinstance(body, dict) else None


@api_bp.get("/projects")
@access(SIGNED_IN)
def api_list_projects():
    """The projects you see (all, for a site admin), with your role and their quotas."""
    return {"projects": [project_json(p) for p, _ in my_projects()]}


@api_bp.post("/projects")
@access(SITE_ADMIN)
def api_create_project():
    """Create a project: {"name", "max_endpoints" (default 20), "max_gpus" (default null: no limit)}."""
    body = _json_object()
    if body is None:
        return _error(400, 'send a JSON object such as {"name": "ml-team"}')
    try:
        project = create_project(body.get("name"), body.get("max_endpoints", DEFAULT_MAX_ENDPOINTS),
                                 body.get("max_gpus"))
    except accounts.AccountError as exc:
        return _error(400, str(exc), exc.errors)
    return project_json(project, with_members=True), 201


@api_bp.get("/projects/<project>")
@access(VIEWER)
def api_get_project(project: str):
    """A project: your role, its quotas and usage, its members."""
    return project_json(get_project(project), with_members=True)


@api_bp.patch("/projects/<project>")
@access(SITE_ADMIN)
def api_update_project(project: str):
    """Set a project's quotas: {"max_endpoints", "max_gpus" (null: no limit)}."""
    row = get_project(project)
    body = _json_object()
    if body is None:
        return _error(400, 'send a JSON object such as {"max_endpoints": 30}')
    try:
        changed = set_quota(row, body)
    except accounts.AccountError as exc:
        return _error(400, str(exc), exc.errors)
    return {**project_json(row, with_members=True), "changes": changed}


@api_bp.put("/projects/<project>/members/<user>")
@access(ADMIN)
def api_set_member(project: str, user: str):
    """Add a member or change a member's role: {"role": "viewer" | "developer" | "admin"}."""
    row = get_project(project)
    body = _json_object()
    if body is None:
        return _error(400, 'send a JSON object such as {"role": "developer"}')
    try:
        membership = set_member(row, user, body.get("role") if isinstance(body.get("role"), str) else "")
    except accounts.AccountError as exc:
        return _error(404 if exc.field == "user" else 400, str(exc), exc.errors)
    return {"project": row.name, "user": membership.user.name, "role": membership.role}


@api_bp.delete("/projects/<project>/members/<user>")
@access(ADMIN)
def api_remove_member(project: str, user: str):
    """Remove a member from a project."""
    row = get_project(project)
    if not remove_member(row, user):
        return _error(404, f"{user!r} is no member of project {row.name}")
    return {"project": row.name, "removed": user}


@api_bp.get("/users")
@access(SITE_ADMIN)
def api_list_users():
    """Every user with their projects and roles."""
    return {"users": [user_json(u) for u in db.session.scalars(select(User).order_by(User.name))]}


@api_bp.post("/users")
@access(SITE_ADMIN)
def api_create_user():
    """Create a user: {"name", "password" (generated when left out, and answered once), "is_admin",
    "project" (default "default"; null for none), "role" (default developer)}."""
    body = _json_object()
    if body is None:
        return _error(400, 'send a JSON object such as {"name": "ana", "project": "ml-team", "role": "developer"}')
    try:
        user, password = create_user(body)
    except accounts.AccountError as exc:
        return _error(400, str(exc), exc.errors)
    except IntegrityError:
        return _error(400, "a user of that name exists", {"name": "a user of that name exists"})
    return {**user_json(user), "password": password}, 201


@api_bp.get("/audit")
@access(SITE_ADMIN)
def api_audit():
    """The audit log, newest first (?project=<name>, ?endpoint=<name>, ?limit=1-1000, default 200)."""
    try:
        limit = audit.parse_limit(request.args.get("limit"))
    except ValueError as exc:
        return _error(400, str(exc), {"limit": str(exc)})
    project_id = None
    if name := request.args.get("project"):
        row = accounts.get_project(db.session, name)
        if row is None:
            return {"entries": []}
        project_id = row.id
    rows = audit.entries(project_id=project_id, endpoint_name=request.args.get("endpoint") or None, limit=limit)
    return {"entries": [audit.entry_json(e) for e in rows]}


@api_bp.get("/endpoints/<name>/audit")
@access(VIEWER)
def api_endpoint_audit(name: str):
    """What was done to an endpoint, by whom, when and from where; newest first (?limit)."""
    from webapp.views_common import get_endpoint

    endpoint = get_endpoint(name)
    try:
        limit = audit.parse_limit(request.args.get("limit"))
    except ValueError as exc:
        return _error(400, str(exc), {"limit": str(exc)})
    return {"entries": [audit.entry_json(e) for e in audit.entries(endpoint=endpoint, limit=limit)]}
