"""Who is asking, and what they may do (README.md "Accounts and projects").

- **Signing in.** The UI signs in with a name and password (Flask-Login keeps the session in the
  signed cookie; its id is bound to the password hash, so a new password signs out every
  session). The JSON API takes the same session (the UI's pages poll it) or a personal token,
  `Authorization: Bearer sbt_...` (common/accounts.py). Without either, every API call is a
  JSON 401 and every page redirects to the login form.
- **Every view declares who may call it** with `@access(level)`: `PUBLIC`, `SIGNED_IN` (any user;
  lists show only what the user's projects hold), a project role (`viewer`, `developer`,
  `admin`: checked against the project of the endpoint, model or project the URL names, by
  `require_role`), or `SITE_ADMIN`. `check_declared` refuses to build an app with a view that
  declares nothing, so a new route cannot forget.
- **Another project's things do not exist**: naming one answers 404, as for a name nobody uses,
  never a 403 that would confirm it. A member whose role is too weak gets a 403 saying which
  role it needs. A site admin is an admin of every project.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Callable
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import LoginManager, current_user, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from common import accounts
from common.account_models import ADMIN, DEVELOPER, ROLES, VIEWER, ApiToken, Membership, Project, User, role_at_least
from common.models import utcnow
from webapp.api_keys import validate_key_name  # a token's name is checked as a key's
from webapp.extensions import db

PUBLIC, SIGNED_IN, SITE_ADMIN = "public", "signed-in", "site-admin"
LEVELS = (PUBLIC, SIGNED_IN, VIEWER, DEVELOPER, ADMIN, SITE_ADMIN)
# Flask's own views, and ours that anyone may reach.
_BUILTIN_PUBLIC = {"static"}
# A token's last-used time is written at most this often.
LAST_USED_RESOLUTION = timedelta(seconds=60)

login_manager = LoginManager()
bp = Blueprint("auth", __name__)
api_bp = Blueprint("auth_api", __name__, url_prefix="/api/v1")


def access(level: str) -> Callable:
    """Declare who may call a view (see the module's docstring)."""
    if level not in LEVELS:
        raise ValueError(f"unknown access level {level!r}; use one of {', '.join(LEVELS)}")

    def mark(view: Callable) -> Callable:
        view.access_level = level
        return view

    return mark


def view_level(app: Flask, endpoint: str) -> str | None:
    if endpoint in _BUILTIN_PUBLIC:
        return PUBLIC
    return getattr(app.view_functions.get(endpoint), "access_level", None)


def check_declared(app: Flask) -> None:
    """Every route's view says who may call it; a route that does not is a bug caught at start."""
    missing = sorted({rule.endpoint for rule in app.url_map.iter_rules() if view_level(app, rule.endpoint) is None})
    if missing:
        raise RuntimeError("views without an access level (decorate them with webapp.auth.access): "
                           + ", ".join(missing))


def route_table(app: Flask) -> list[tuple[str, str, str, str]]:
    """(rule, methods, access level, view) of every route: docs/architecture.md "Access control"
    lists them, and tests/test_accounts.py checks that list against this."""
    return [(rule.rule, ", ".join(sorted(rule.methods - {"HEAD", "OPTIONS"})), view_level(app, rule.endpoint) or "",
             rule.endpoint) for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint))]


# ---- who is asking ----


@login_manager.user_loader
def _load_session_user(session_id: str) -> User | None:
    user_id, _, _stamp = session_id.partition(":")
    if not user_id.isdigit():
        return None
    user = db.session.get(User, int(user_id))
    # The id carries a stamp of the password hash: a session from before a password change is void.
    return user if user is not None and user.get_id() == session_id else None


def _api_refusal(message: str):
    from webapp import api_error

    body, status = api_error(401, message)
    return body, status, {"WWW-Authenticate": 'Bearer realm="standby"'}


def _token_user(header: str) -> tuple[User | None, str]:
    """(the user of an `Authorization` header's token, why not)."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None, "send a personal token as `Authorization: Bearer <token>` (create one on your account page)"
    if token.startswith("sk-"):
        return None, ("that is an endpoint key, for calling an endpoint through the proxy; the API needs a "
                      "personal token (sbt_...) from your account page")
    row = accounts.find_token(db.session, token)
    if row is None:
        return None, "the token is not valid: revoked, or never issued; create one on your account page"
    now = utcnow()
    last = row.last_used_at
    if last is None or now - (last if last.tzinfo else last.replace(tzinfo=now.tzinfo)) >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        db.session.commit()
    g.auth_via = f"token {row.prefix}…"
    return row.user, ""


def authenticate():
    """Before every view: the caller's identity, or the answer that asks for one."""
    api = request.path.startswith("/api/")
    level = view_level(current_app, request.endpoint) if request.endpoint else None
    header = request.headers.get("Authorization")
    if header is not None and (api or level != PUBLIC):
        user, problem = _token_user(header)
        if user is None:
            return _api_refusal(problem) if api else (problem, 401, {"Content-Type": "text/plain; charset=utf-8"})
        g._login_user = user  # Flask-Login's current_user for this request, without a session
    elif current_user.is_authenticated:
        g.auth_via = "session"
    g.access_level = level
    if level == PUBLIC or request.endpoint is None:
        return None  # no such route (404) or method (405): that answer, which says what is wrong
    if not current_user.is_authenticated:
        if api:
            return _api_refusal("sign in: send a personal token as `Authorization: Bearer <token>` "
                                "(README.md \"Accounts and projects\")")
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    if level == SITE_ADMIN and not current_user.is_admin:
        abort(403, description="only a site admin may do this")
    return None


# ---- what they may do ----


def memberships() -> dict[int, str]:
    """{project id: role} of the signed-in user (read once per request)."""
    if "memberships" not in g:
        rows = db.session.execute(select(Membership.project_id, Membership.role)
                                  .where(Membership.user_id == current_user.id)).all()
        g.memberships = {project_id: role for project_id, role in rows}
    return g.memberships


def role_in(project_id: int) -> str | None:
    """The signed-in user's role in a project (a site admin is an admin everywhere), or None."""
    if not current_user.is_authenticated:
        return None
    if current_user.is_admin:
        return ADMIN
    return memberships().get(project_id)


def visible_project_ids() -> set[int] | None:
    """The projects whose things the user sees; None: all of them (a site admin)."""
    if not current_user.is_authenticated:
        return set()
    if current_user.is_admin:
        return None
    return set(memberships())


def require_role(project_id: int, not_found: str, level: str | None = None) -> str:
    """Abort unless the user holds `level` (default: the view's declared one) in the project:
    404 with `not_found` when they are no member (the thing does not exist for them), 403 when
    their role is too weak. Returns their role."""
    role = role_in(project_id)
    if role is None:
        abort(404, description=not_found)
    level = level or getattr(g, "access_level", None) or VIEWER
    if level == SITE_ADMIN:
        if not current_user.is_admin:
            abort(403, description="only a site admin may do this")
    elif level in ROLES and not role_at_least(role, level):
        project = db.session.get(Project, project_id)
        abort(403, description=f"you are a {role} of project {project.name if project else project_id}; "
                               f"this needs the role {level} or above")
    return role


def projects_where(level: str) -> list[Project]:
    """The projects where the user holds at least `level`, by name."""
    projects = db.session.scalars(select(Project).order_by(Project.name)).all()
    return [p for p in projects if role_at_least(role_in(p.id), level)]


# ---- pages: sign in and out ----


class LoginForm(FlaskForm):
    name = StringField("User name", validators=[DataRequired(), Length(max=63)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=accounts.MAX_PASSWORD_LENGTH)])


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (never another site's URL)."""
    if not target:
        return url_for("ui.list_endpoints")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("ui.list_endpoints")
    return target


def throttle():
    return current_app.extensions["login_throttle"]


@bp.route("/login", methods=["GET", "POST"])
@access(PUBLIC)
def login():
    """The sign-in form. Repeated wrong passwords are slowed down (webapp/login_throttle.py)."""
    form = LoginForm()
    no_users = db.session.scalar(select(User.id).limit(1)) is None
    if request.method == "GET" or not form.validate_on_submit():
        status = 400 if request.method == "POST" else 200
        return render_template("login.html", form=form, no_users=no_users, next=request.args.get("next", "")), status
    name, address = form.name.data.strip(), request.remote_addr or ""
    wait = throttle().wait_seconds(name, address)
    if wait:
        form.password.errors = [f"Too many wrong passwords: wait {wait} s before trying again."]
        return render_template("login.html", form=form, no_users=no_users,
                               next=request.args.get("next", "")), 429, {"Retry-After": str(wait)}
    user = accounts.get_user(db.session, name)
    if not accounts.password_matches(user, form.password.data):
        throttle().failed(name, address)
        from webapp import audit

        audit.record("auth.login_failed", target=name, user=user, via="login form")
        form.password.errors = ["Wrong user name or password."]
        return render_template("login.html", form=form, no_users=no_users, next=request.args.get("next", "")), 401
    throttle().succeeded(name, address)
    login_user(user)
    g.auth_via = "session"
    user.last_login_at = utcnow()
    db.session.commit()
    return redirect(_safe_next(request.args.get("next")))


@bp.post("/logout")
@access(PUBLIC)
def logout():
    """Sign out (a POST with the form's CSRF token, so another site cannot sign you out)."""
    logout_user()
    flash("Signed out.", "ok")
    return redirect(url_for("auth.login"))


# ---- personal tokens and the password: the account page and the API ----


class TokenForm(FlaskForm):
    token_name = StringField("Token name", validators=[Length(max=64)], description="Optional, e.g. laptop or ci.")


class PasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired()])
    new = PasswordField("New password", validators=[DataRequired()],
                        description=f"At least {accounts.MIN_PASSWORD_LENGTH} characters.")


def my_tokens() -> list[ApiToken]:
    return list(db.session.scalars(select(ApiToken).where(ApiToken.user_id == current_user.id,
                                                          ApiToken.revoked_at.is_(None))
                                   .order_by(ApiToken.created_at, ApiToken.id)))


def token_json(row: ApiToken) -> dict:
    from webapp.views_common import iso

    return {"id": row.id, "name": row.name, "prefix": row.prefix, "created_at": iso(row.created_at),
            "last_used_at": iso(row.last_used_at)}


def _new_token(name: str) -> tuple[ApiToken, str]:
    from webapp import audit

    row, plaintext = accounts.create_token(db.session, current_user, name)
    db.session.commit()
    audit.record("token.create", target=f"{row.prefix}… {name}".strip())
    return row, plaintext


def _revoke_token(token_id: int) -> ApiToken | None:
    from webapp import audit

    row = db.session.get(ApiToken, token_id)
    if row is None or row.user_id != current_user.id or row.revoked_at is not None:
        return None
    row.revoked_at = utcnow()
    db.session.commit()
    audit.record("token.revoke", target=f"{row.prefix}… {row.name}".strip())
    return row


def _account_page(status: int = 200, password_form: PasswordForm | None = None):
    from webapp.projects import my_projects

    return render_template("account.html", tokens=my_tokens(), token_form=TokenForm(formdata=None),
                           password_form=password_form or PasswordForm(formdata=None),
                           projects=my_projects()), status


@bp.get("/account")
@access(SIGNED_IN)
def account():
    """Your account: projects and roles, personal API tokens, password."""
    return _account_page()


@bp.post("/account/tokens")
@access(SIGNED_IN)
def create_token_page():
    """Create a personal token and show it once."""
    form = TokenForm()
    name, problem = validate_key_name(form.token_name.data)
    if problem:
        flash(problem, "error")
        return redirect(url_for("auth.account"))
    row, plaintext = _new_token(name)
    return render_template("token_created.html", token=row, plaintext=plaintext,
                           api=request.host_url.rstrip("/") + "/api/v1")


@bp.post("/account/tokens/<int:token_id>/revoke")
@access(SIGNED_IN)
def revoke_token_page(token_id: int):
    """Revoke one of your tokens: it is refused from the next call on."""
    row = _revoke_token(token_id)
    flash(f"Token {row.prefix}… revoked." if row else "No such active token.", "ok" if row else "error")
    return redirect(url_for("auth.account"))


@bp.post("/account/password")
@access(SIGNED_IN)
def change_password():
    """Change your password; every other session of yours is signed out."""
    from webapp import audit

    form = PasswordForm()
    if not form.validate_on_submit():
        return _account_page(400, form)
    if not accounts.password_matches(current_user, form.current.data):
        form.current.errors = ["That is not your current password."]
        return _account_page(400, form)
    if problem := accounts.password_error(form.new.data):
        form.new.errors = [problem]
        return _account_page(400, form)
    user = current_user._get_current_object()
    user.password_hash = accounts.hash_password(form.new.data)
    db.session.commit()
    login_user(user)  # this session carries the new stamp; the others are void
    audit.record("user.change_password", target=user.name)
    flash("Password changed; your other sessions are signed out.", "ok")
    return redirect(url_for("auth.account"))


@api_bp.get("/me")
@access(SIGNED_IN)
def me():
    """Who you are: your name, whether you are a site admin, your projects and roles."""
    from webapp.projects import my_projects

    return {"name": current_user.name, "is_admin": bool(current_user.is_admin), "via": g.get("auth_via", ""),
            "projects": [{"name": p.name, "role": role} for p, role in my_projects()]}


@api_bp.get("/tokens")
@access(SIGNED_IN)
def list_tokens():
    """Your active personal tokens (prefix, name, created, last used); never the tokens themselves."""
    return {"tokens": [token_json(row) for row in my_tokens()]}


@api_bp.post("/tokens")
@access(SIGNED_IN)
def create_token():
    """Create a personal token; the token itself is in this answer only."""
    body = request.get_json(force=True) if request.get_data(cache=True) else None
    if body is not None and not isinstance(body, dict):
        return {"error": 'the body must be a JSON object such as {"name": "ci"}', "errors": {}}, 400
    name, problem = validate_key_name((body or {}).get("name"))
    if problem:
        return {"error": problem, "errors": {"name": problem}}, 400
    row, plaintext = _new_token(name)
    return {**token_json(row), "token": plaintext}, 201


@api_bp.delete("/tokens/<int:token_id>")
@access(SIGNED_IN)
def revoke_token(token_id: int):
    """Revoke one of your tokens: it is refused from the next call on."""
    row = _revoke_token(token_id)
    if row is None:
        return {"error": f"you have no active token with id {token_id}", "errors": {}}, 404
    return {"revoked": token_id}


def init_app(app: Flask) -> None:
    from webapp.login_throttle import LoginThrottle

    settings = app.extensions["standby_settings"]
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    app.extensions["login_throttle"] = LoginThrottle(
        max_failures=settings.login_max_failures, base_seconds=settings.login_lock_seconds,
        max_seconds=settings.login_max_lock_seconds)
    app.before_request(authenticate)
    app.register_blueprint(bp)
    app.register_blueprint(api_bp)
    app.extensions["csrf"].exempt(api_bp)

    @app.context_processor
    def _who():
        return {"current_user": current_user}
