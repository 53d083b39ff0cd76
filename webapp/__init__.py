"""The Standby web app: UI (server-rendered) and JSON API over the endpoint specs.

The web app writes only the spec (and API keys) and talks to Temporal; worker activities
write observed state (docs/architecture.md "Who owns what").
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from flask import Flask, Request, request
from flask.json.provider import DefaultJSONProvider
from flask_wtf import CSRFProtect
from werkzeug.exceptions import BadRequest, HTTPException, InternalServerError
from werkzeug.routing import IntegerConverter

from common import strict_json
from common.config import Settings, load_settings
from common.db import engine_options, install_sqlite_pragmas
from common.models import MAX_ROW_ID
from common.temporal_bridge import TemporalBridge
from webapp.extensions import db

csrf = CSRFProtect()
# JSON bodies (specs with routes, keys, models) are a few KB; 1 MiB is generous. The registry's
# upload views raise it to the archive limit for themselves.
MAX_JSON_BODY_BYTES = 1024 * 1024


class StrictJSONProvider(DefaultJSONProvider):
    """Standard JSON only (common/strict_json.py): request bodies with NaN, ±Infinity or deep
    nesting are refused, and an answer can never carry NaN / Infinity."""

    # Spec fields keep their declared order (docs/architecture.md "The JSON API").
    sort_keys = False

    def dumps(self, obj, **kwargs):
        kwargs["allow_nan"] = False
        return super().dumps(obj, **kwargs)

    def loads(self, s, **kwargs):
        return strict_json.loads(s)


class StandbyRequest(Request):
    def on_json_loading_failed(self, e: ValueError | None):
        """Say why a body is not accepted as JSON (Flask does so only in debug mode)."""
        if e is not None:
            raise BadRequest(f"the body is not valid JSON ({str(e)[:200]}); send a JSON object")
        return super().on_json_loading_failed(e)


class RowIdConverter(IntegerConverter):
    """`<int:...>` in our URLs: a key id or a version number, both Integer columns. A larger number
    names nothing: the URL does not match (404) instead of overflowing the database driver (500)."""

    def __init__(self, map, **kwargs):
        super().__init__(map, **{"max": MAX_ROW_ID, **kwargs})


def api_error(status: int, message: str):
    """The JSON API's error answer (the same shape as webapp/api.py's)."""
    return {"error": message, "errors": {}}, status


def _secret_key(settings: Settings) -> str:
    """A configured key, else one generated once and kept in the data dir so restarts keep sessions."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.data_dir / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process (gunicorn worker) wrote it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key


def create_app(test_config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.request_class = StandbyRequest
    # `//` in a path is a 404 (JSON under /api/), not a redirect Flask answers with an HTML page
    # past the app's error handlers.
    app.url_map.merge_slashes = False
    app.url_map.converters["int"] = RowIdConverter
    app.json_provider_class = StrictJSONProvider
    app.json = StrictJSONProvider(app)
    app.config.from_mapping(
        SECRET_KEY=None,
        # Forms stay valid while a user reads a long review page.
        WTF_CSRF_TIME_LIMIT=None,
        SQLALCHEMY_RECORD_QUERIES=False,
        MAX_CONTENT_LENGTH=MAX_JSON_BODY_BYTES,
        # The session cookie (webapp/auth.py) is not sent on another site's POSTs at all.
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.config.from_prefixed_env()
    if test_config:
        app.config.from_mapping(test_config)

    settings: Settings = app.config.get("STANDBY_SETTINGS") or load_settings()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = _secret_key(settings)
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.database_url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(settings.database_url)
    app.extensions["standby_settings"] = settings
    app.extensions["temporal_bridge"] = app.config.get("STANDBY_BRIDGE") or TemporalBridge(settings)

    # The schema is not created here: `app.py web` and `up` upgrade it before gunicorn imports
    # this (README.md "Upgrading").
    db.init_app(app)
    with app.app_context():
        install_sqlite_pragmas(db.engine)
    csrf.init_app(app)

    from webapp import api, auth, hosts, projects, prometheus, registry, request_guard, ui

    request_guard.install(app, api_error)
    auth.init_app(app)  # after the request guard: a refused Host or URL is answered before sign-in

    app.register_blueprint(ui.bp)
    app.register_blueprint(api.bp)
    csrf.exempt(api.bp)  # API clients send JSON, not forms; CSRF protects the cookie-based UI
    app.register_blueprint(registry.bp)
    app.register_blueprint(hosts.ui_bp)
    app.register_blueprint(hosts.api_bp)
    csrf.exempt(hosts.api_bp)
    app.register_blueprint(projects.ui_bp)
    app.register_blueprint(projects.api_bp)
    csrf.exempt(projects.api_bp)
    app.register_blueprint(prometheus.bp)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        """JSON errors under /api/ (405, 413, 414 and 500 included); the HTML error page elsewhere."""
        if request.path.startswith("/api/"):
            response = exc.get_response()  # keeps headers such as Allow on a 405
            response.set_data(app.json.dumps({"error": exc.description or exc.name, "errors": {}}))
            response.content_type = "application/json"
            return response
        return exc

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        """A bug: logged with its traceback, answered with a JSON 500 under /api/."""
        if isinstance(exc, HTTPException):
            return http_error(exc)
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return http_error(InternalServerError("internal error; the web app's log has the details"))

    @app.get("/healthz")
    @auth.access(auth.PUBLIC)
    def healthz():
        """Liveness for `app.py up` and load balancers."""
        return {"ok": True}

    auth.check_declared(app)
    return app
