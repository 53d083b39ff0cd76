"""The Standby web app: UI (server-rendered) and JSON API over the endpoint specs.

The web app writes only the spec (and API keys) and talks to Temporal; worker activities
write observed state (DESIGN.md "Who owns what").
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from flask import Flask, request
from flask_wtf import CSRFProtect
from werkzeug.exceptions import HTTPException

from common.config import Settings, load_settings
from common.db import engine_options, install_sqlite_pragmas
from webapp.extensions import db
from webapp.temporal_bridge import TemporalBridge

csrf = CSRFProtect()


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
    app.json.sort_keys = False  # keep spec fields in DESIGN.md order
    app.config.from_mapping(
        SECRET_KEY=None,
        # Forms stay valid while a user reads a long review page.
        WTF_CSRF_TIME_LIMIT=None,
        SQLALCHEMY_RECORD_QUERIES=False,
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

    from webapp import api, ui

    app.register_blueprint(ui.bp)
    app.register_blueprint(api.bp)
    csrf.exempt(api.bp)  # API clients send JSON, not forms; CSRF protects the cookie-based UI
    try:
        from webapp.registry import bp as registry_bp  # model registry (issue 4), when present
    except ImportError:
        registry_bp = None
    if registry_bp is not None:
        app.register_blueprint(registry_bp)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        """JSON errors under /api/; the HTML error page elsewhere."""
        if request.path.startswith("/api/"):
            return {"error": exc.description or exc.name, "errors": {}}, exc.code
        return exc

    @app.get("/healthz")
    def healthz():
        """Liveness for `app.py up` and load balancers."""
        return {"ok": True}

    return app
