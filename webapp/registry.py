"""Model registry (issue 4): models with immutable versions, as UI pages and a JSON API.

A version is an uploaded archive (stored under `models_dir/<model>/<n>/` with its size and
SHA-256) or a git URL + ref (cloned at provision, where the resolved commit is recorded).
"""
from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path

from flask import Blueprint, abort, flash, has_request_context, redirect, render_template, request, url_for
from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge
from wtforms import SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length

from common.archives import ArchiveError, archive_kind, copy_limited, human_size, inspect_archive
from common.git_source import git_ref_error, git_url_error
from common.models import DEFAULT_PROJECT_ID, Model, ModelVersion
from webapp import audit
from webapp.auth import DEVELOPER, SIGNED_IN, VIEWER, access, projects_where, require_role, visible_project_ids
from webapp.extensions import db, settings
from webapp.projects import creation_project
from webapp.request_guard import allows_upload
from webapp.views_common import iso

bp = Blueprint("registry", __name__)

MODEL_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
# Multipart framing around the file; the archive limit itself is checked while copying.
_MULTIPART_SLACK = 1024 * 1024


class RegistryError(ValueError):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


# ---- rules ------------------------------------------------------------------------------------


def model_name_error(name: str) -> str | None:
    if not name:
        return "give the model a name"
    if len(name) > 63 or not MODEL_NAME_RE.match(name):
        return "use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
    return None


# ---- storage ----------------------------------------------------------------------------------


def get_model(name: str) -> Model:
    """The model the URL names, if the user may see it (another project's is a 404) and holds the
    view's role in its project (webapp/auth.py)."""
    model = db.session.scalar(select(Model).where(Model.name == name))
    not_found = f"no model named {name!r}"
    if model is None:
        abort(404, description=not_found)
    require_role(model.project_id, not_found)
    return model


def get_version(model: Model, number: int) -> ModelVersion:
    version = db.session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == number))
    if version is None:
        abort(404, description=f"model {model.name!r} has no version {number}")
    return version


def create_model(name: str, description: str, project_id: int = DEFAULT_PROJECT_ID) -> Model:
    name = (name or "").strip()
    error = model_name_error(name)
    if error is None and db.session.scalar(select(Model.id).where(Model.name == name)) is not None:
        error = f"a model named {name!r} already exists; choose another name or add a version to it"
    if error:
        raise RegistryError({"name": error})
    model = Model(name=name, description=(description or "").strip(), project_id=project_id)
    db.session.add(model)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise RegistryError({"name": f"a model named {name!r} already exists"}) from None
    if has_request_context():
        audit.record("model.create", project=project_id, target=name)
    return model


def _add_version(model: Model, **fields) -> ModelVersion:
    """Insert with the next number; a concurrent insert of the same number retries once."""
    for attempt in range(2):
        number = (db.session.scalar(select(func.max(ModelVersion.number))
                                    .where(ModelVersion.model_id == model.id)) or 0) + 1
        version = ModelVersion(model_id=model.id, number=number, **fields)
        db.session.add(version)
        try:
            db.session.commit()
            if has_request_context():
                audit.record("model.version", project=model.project_id, target=f"{model.name} v{number}",
                             detail={"kind": fields.get("kind"), "git_url": fields.get("git_url", ""),
                                     "git_ref": fields.get("git_ref", "")})
            return version
        except IntegrityError:
            db.session.rollback()
            if attempt:
                raise
    raise AssertionError("unreachable")


def add_archive_version(model: Model, upload: FileStorage | None) -> ModelVersion:
    if upload is None or not upload.filename:
        raise RegistryError({"archive": "choose a .tar.gz, .tgz or .zip file to upload"})
    config = settings()
    try:
        kind = archive_kind(upload.filename)
    except ArchiveError as exc:
        raise RegistryError({"archive": str(exc)}) from None
    model_dir = config.models_dir / model.name
    model_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".tar.gz" if kind == "tar.gz" else ".zip"
    staging = model_dir / f".upload-{secrets.token_hex(8)}{suffix}"
    try:
        stored = copy_limited(upload.stream, staging, config.model_max_archive_bytes)
        inspect_archive(staging, kind, config.model_max_unpacked_bytes)
    except ArchiveError as exc:
        staging.unlink(missing_ok=True)
        raise RegistryError({"archive": str(exc)}) from None
    # The number is only known once the row exists; the file moves in right after.
    relative = None
    try:
        version = _add_version(model, kind="archive", archive_size=stored.size, archive_sha256=stored.sha256)
        relative = Path(model.name) / str(version.number) / f"archive{suffix}"
        target = config.models_dir / relative
        if target.parent.exists():
            shutil.rmtree(target.parent)  # left by a crash before its row was committed
        target.parent.mkdir(parents=True)
        staging.rename(target)
        version.archive_path = str(relative)
        db.session.commit()
    except BaseException:
        staging.unlink(missing_ok=True)
        if relative is not None:
            shutil.rmtree(config.models_dir / relative.parent, ignore_errors=True)
            db.session.rollback()
            leftover = db.session.get(ModelVersion, version.id)
            if leftover is not None and not leftover.archive_path:
                db.session.delete(leftover)
                db.session.commit()
        raise
    return version


def add_git_version(model: Model, git_url: str, git_ref: str) -> ModelVersion:
    git_url, git_ref = (git_url or "").strip(), (git_ref or "").strip()
    errors = {}
    if error := git_url_error(git_url, settings().allow_file_git):
        errors["git_url"] = error
    if error := git_ref_error(git_ref):
        errors["git_ref"] = error
    if errors:
        raise RegistryError(errors)
    return _add_version(model, kind="git", git_url=git_url, git_ref=git_ref)


def version_json(version: ModelVersion, model_name: str) -> dict:
    body = {"model": model_name, "number": version.number, "id": version.id, "kind": version.kind,
            "created_at": iso(version.created_at)}
    if version.kind == "archive":
        body.update(archive_size=version.archive_size, archive_sha256=version.archive_sha256,
                    archive_path=version.archive_path)
    else:
        body.update(git_url=version.git_url, git_ref=version.git_ref, resolved_commit=version.resolved_commit)
    return body


def model_json(model: Model, with_versions: bool = True) -> dict:
    from webapp.views_common import project_name

    body = {"name": model.name, "description": model.description, "project": project_name(model.project_id),
            "created_at": iso(model.created_at),
            "latest_version": model.versions[-1].number if model.versions else None}
    if with_versions:
        body["versions"] = [version_json(v, model.name) for v in model.versions]
    return body


def version_choices() -> list[tuple[int, str]]:
    """(ModelVersion.id, label) for the endpoint form's "model version" select: the versions of the
    user's projects."""
    statement = select(ModelVersion, Model.name).join(Model).order_by(Model.name, ModelVersion.number.desc())
    if (ids := visible_project_ids()) is not None:
        statement = statement.where(Model.project_id.in_(ids))
    rows = db.session.execute(statement).all()
    return [(v.id, f"{name} v{v.number} ({v.git_ref if v.kind == 'git' else 'archive'})") for v, name in rows]


def _too_large_message() -> str:
    return f"the archive is larger than the limit of {human_size(settings().model_max_archive_bytes)}"


# The views that take an archive upload; every other request keeps the app's JSON body limit.
_UPLOAD_VIEWS = ("registry.upload_version", "registry.api_create_version")


@bp.url_value_preprocessor
def _limit_upload_size(endpoint, values) -> None:
    # Runs before any before_request hook (CSRF reads the form there), so werkzeug refuses an
    # oversize body from its Content-Length instead of spooling it to disk first.
    if request.method == "POST" and endpoint in _UPLOAD_VIEWS:
        request.max_content_length = settings().model_max_archive_bytes + _MULTIPART_SLACK


@bp.errorhandler(RequestEntityTooLarge)
def _too_large(exc):
    """An oversize upload is the user's to fix: 400 with the limit, like any other bad archive."""
    if request.endpoint not in _UPLOAD_VIEWS:
        if request.path.startswith("/api/"):
            return _api_error(413, f"the request body is larger than {human_size(request.max_content_length or 0)}")
        return exc
    if request.path.startswith("/api/"):
        return _api_error(400, "invalid version", {"archive": _too_large_message()})
    model = db.session.scalar(select(Model).where(Model.name == (request.view_args or {}).get("name")))
    if model is None:
        return _too_large_message(), 400
    form = ArchiveVersionForm(formdata=None)
    _form_errors(form, {"archive": _too_large_message()})
    return _render_model(model, archive_form=form, status=400)


# ---- UI ---------------------------------------------------------------------------------------


def _visible_models() -> list[Model]:
    statement = select(Model).order_by(Model.name)
    if (ids := visible_project_ids()) is not None:
        statement = statement.where(Model.project_id.in_(ids))
    return list(db.session.scalars(statement))


class ModelForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=63)],
                       description="Lowercase letters, digits and '-'; used in version references.")
    description = TextAreaField("Description", validators=[Length(max=2000)])
    project = SelectField("Project", validate_choice=False, description="Its members see and use the model.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.project.choices = [(p.name, p.name) for p in projects_where(DEVELOPER)]


class ArchiveVersionForm(FlaskForm):
    archive = FileField("Archive", validators=[FileRequired("choose a .tar.gz, .tgz or .zip file")],
                        description="A .tar.gz, .tgz or .zip of the model code (route files at its root).")


class GitVersionForm(FlaskForm):
    git_url = StringField("Git URL", validators=[DataRequired()],
                          description="https://, ssh://, file:// or user@host:path; cloned when an instance starts.")
    git_ref = StringField("Ref", default="main", validators=[DataRequired()],
                          description="Branch, tag or commit; the commit it resolves to is recorded.")


def _form_errors(form: FlaskForm, errors: dict[str, str]) -> None:
    for field_name, message in errors.items():
        field = getattr(form, field_name, None)
        if field is not None:
            field.errors = [*field.errors, message] if isinstance(field.errors, list) else [message]


@bp.get("/models")
@access(SIGNED_IN)
def list_models():
    """The models of your projects, with their versions."""
    models = _visible_models()
    return render_template("registry/models.html", models=models)


@bp.route("/models/new", methods=["GET", "POST"])
@access(DEVELOPER)
def new_model():
    """Create a model (its versions are added on its page)."""
    form = ModelForm()
    if form.validate_on_submit():
        project = creation_project(form.project.data or None)
        try:
            model = create_model(form.name.data, form.description.data, project.id)
        except RegistryError as exc:
            _form_errors(form, exc.errors)
        else:
            flash(f"Model {model.name} created. Add a first version.", "ok")
            return redirect(url_for("registry.show_model", name=model.name))
    return render_template("registry/new_model.html", form=form), 400 if form.errors else 200


def _render_model(model: Model, archive_form=None, git_form=None, status: int = 200):
    return render_template("registry/model.html", model=model,
                           archive_form=archive_form or ArchiveVersionForm(),
                           git_form=git_form or GitVersionForm(formdata=None),
                           max_archive_bytes=settings().model_max_archive_bytes), status


@bp.get("/models/<name>")
@access(VIEWER)
def show_model(name: str):
    """A model's versions, with forms to add one."""
    return _render_model(get_model(name))


@bp.post("/models/<name>/versions/upload")
@access(DEVELOPER)
def upload_version(name: str):
    """Add a version from an uploaded archive."""
    model = get_model(name)
    form = ArchiveVersionForm()
    try:
        if form.validate_on_submit():
            version = add_archive_version(model, form.archive.data)
            flash(f"Version {version.number} of {model.name} stored ({version.archive_size} bytes).", "ok")
            return redirect(url_for("registry.show_model", name=model.name))
    except RegistryError as exc:
        form = ArchiveVersionForm(formdata=None)
        _form_errors(form, exc.errors)
    return _render_model(model, archive_form=form, status=400)


@bp.post("/models/<name>/versions/git")
@access(DEVELOPER)
def register_git_version(name: str):
    """Add a version that points at a git URL + ref."""
    model = get_model(name)
    form = GitVersionForm()
    if form.validate_on_submit():
        try:
            version = add_git_version(model, form.git_url.data, form.git_ref.data)
        except RegistryError as exc:
            _form_errors(form, exc.errors)
        else:
            flash(f"Version {version.number} of {model.name} registered ({version.git_ref}).", "ok")
            return redirect(url_for("registry.show_model", name=model.name))
    return _render_model(model, git_form=form, status=400)


# ---- JSON API ---------------------------------------------------------------------------------


def _api_error(status: int, message: str, errors: dict | None = None):
    return {"error": message, "errors": errors or {}}, status


@bp.post("/api/v1/models")
@access(DEVELOPER)
def api_create_model():
    """Create a model: {"name", "description"}, in the project ?project= names (by default the only
    project where you are a developer, else `default`)."""
    project = creation_project(request.args.get("project"))
    body = request.get_json(force=True) if request.get_data(cache=True) else None
    if not isinstance(body, dict):
        return _api_error(400, "send a JSON object: {\"name\": ..., \"description\": ...}")
    try:
        model = create_model(str(body.get("name") or ""), str(body.get("description") or ""), project.id)
    except RegistryError as exc:
        return _api_error(400, "invalid model", exc.errors)
    return model_json(model), 201


@bp.get("/api/v1/models")
@access(SIGNED_IN)
def api_list_models():
    """The models of your projects, with their versions."""
    models = _visible_models()
    return {"models": [model_json(m) for m in models]}


@bp.get("/api/v1/models/<name>")
@access(VIEWER)
def api_get_model(name: str):
    """One model with its versions."""
    return model_json(get_model(name))


@bp.post("/api/v1/models/<name>/versions")
@allows_upload
@access(DEVELOPER)
def api_create_version(name: str):
    """Add a version: multipart with an `archive` file, or JSON {"git_url", "git_ref"}."""
    model = get_model(name)
    try:
        if request.mimetype == "multipart/form-data":
            version = add_archive_version(model, request.files.get("archive"))
        elif request.is_json:
            body = request.get_json()
            if not isinstance(body, dict):
                return _api_error(400, "send a JSON object: {\"git_url\": ..., \"git_ref\": ...}")
            version = add_git_version(model, str(body.get("git_url") or ""), str(body.get("git_ref") or ""))
        else:
            return _api_error(400, "send multipart/form-data with an 'archive' file, "
                                   "or application/json with git_url and git_ref")
    except RegistryError as exc:
        return _api_error(400, "invalid version", exc.errors)
    return version_json(version, model.name), 201


@bp.get("/api/v1/models/<name>/versions/<int:number>")
@access(VIEWER)
def api_get_version(name: str, number: int):
    """One version."""
    model = get_model(name)
    return version_json(get_version(model, number), model.name)


_API_VIEWS = (api_create_model, api_list_models, api_get_model, api_create_version, api_get_version)


@bp.record_once
def _exempt_api_from_csrf(state) -> None:
    # API clients authenticate per request and send JSON, not forms with a CSRF token.
    csrf = state.app.extensions.get("csrf")
    if csrf is not None:
        for view in _API_VIEWS:
            csrf.exempt(view)
