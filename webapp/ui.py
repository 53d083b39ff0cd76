"""Server-rendered UI: endpoint list, create (form -> review -> confirm), detail, edit, actions, keys."""
from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from markupsafe import Markup
from sqlalchemy.exc import IntegrityError

from common.models import ENDPOINT_STATES, FAILED, TERMINATED, ApiKey, Endpoint
from common.temporal_bridge import TIMEOUT, TemporalUnavailable, WorkflowActionError
from common.routes import normalize_routes
from common.account_models import role_at_least
from webapp import api_keys, audit
from webapp.api_docs import code_spans, reference
from webapp.drafts import drop_draft, load_draft, save_draft
from webapp.auth import DEVELOPER, SIGNED_IN, VIEWER, access, role_in, visible_project_ids
from webapp.extensions import bridge, db, gpu_inventory, settings
from webapp.forms import ActionForm, ApiKeyForm, ConfirmForm, EndpointForm, TerminateForm
from webapp.listing import UI_DEFAULT_LIMIT, InvalidListQuery, ListQuery, Page, endpoint_page, parse_list_query
from webapp import revisions as rev
from webapp.openapi import document
from webapp.projects import QuotaExceeded, creation_project, endpoint_usage, foreign_version_error, my_projects, quota_json
from webapp.routes_view import model_version_label, param_summary, route_examples
from common.spec_fields import ENVIRONMENTS, SPEC
from webapp.spec import spec_of, validate_spec
from webapp.views_common import (
    SECRET_MASK,
    action_refusal,
    apply_update,
    create_endpoint_row,
    endpoint_url,
    get_endpoint,
    instance_json,
    iso,
    perform_action,
    previous_still_finishing,
    project_name,
    recent_events,
    usage_json,
)
from workflows.contracts import ERR_REPLICA_QUOTA
from workflows.warm_windows import describe as describe_window
from workflows.warm_windows import safe_parse

bp = Blueprint("ui", __name__)
UI_ACTIONS = ("stop", "restart", "wake", "scale-out")
# The UI does not hold a page for a whole cold start: scale-out keeps going in the workflow.
UI_UPDATE_WAIT_SECONDS = 15.0


@bp.app_template_filter("money")
def money_filter(value) -> str:
    """A cost as the pages show it: 4 decimals below 1 (a few seconds of a GPU), else 2."""
    amount = float(value or 0.0)
    return f"{amount:,.4f}" if amount < 1 else f"{amount:,.2f}"


@bp.app_template_filter("duration")
def duration_filter(seconds) -> str:
    seconds = int(seconds or 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


@bp.app_template_filter("clock")
def clock_filter(unix_seconds) -> str:
    """A point's start in the tables: UTC, to the minute (the day too when not today)."""
    at = datetime.fromtimestamp(float(unix_seconds), tz=timezone.utc)
    today = datetime.now(timezone.utc).date() == at.date()
    return at.strftime("%H:%M:%S UTC" if today else "%Y-%m-%d %H:%M UTC")


@bp.app_template_filter("ms")
def ms_filter(value) -> str:
    return "—" if value is None else f"{value:.1f}"


@bp.app_template_filter("pct")
def pct_filter(value) -> str:
    return "—" if value is None else f"{value:.1f}"


@bp.app_template_filter("when")
def when_filter(value) -> str:
    text = iso(value)
    return text.replace("T", " ")[:19] + " UTC" if text else "—"


bp.add_app_template_filter(code_spans, "code_spans")


@bp.app_context_processor
def template_globals():
    return {"SECRET_MASK": SECRET_MASK, "param_summary": param_summary, "model_version_label": model_version_label,
            "SPEC": SPEC, "spec_value": spec_value}


def spec_value(decl, value) -> str:
    """A spec field's value as the review and detail pages show it."""
    if decl.kind == "bool":
        return "yes" if value else "no"
    if decl.kind == "choice":
        return decl.choice_label(value or "")
    if decl.kind == "ref":
        return model_version_label(value) if value else "—"
    if decl.kind == "names":
        return ", ".join(value or ())
    if decl.form_unit and isinstance(value, (int, float)):
        unit, scale = decl.form_unit
        return f"{value / scale:g} {unit} ({value} s)"
    if decl.name == "max_concurrency" and not value:
        return "unlimited"
    if decl.name == "health_path" and not value:
        return "none: any HTTP answer below 500 on the port means ready"
    if decl.kind == "text" and decl.name not in ("name", "description") and value:
        return Markup("<code>{}</code>").format(value)  # commands, paths, URLs: as typed
    return f"{value:g}" if isinstance(value, float) else str(value)


def _normalized(clean: dict) -> dict:
    """Valid route templates with their defaults written out, so the review shows what is stored."""
    if clean and clean.get("source_kind") == "routes":
        clean["routes"] = normalize_routes(clean["routes"])
    return clean


def _validate(form: EndpointForm, existing: Endpoint | None, previous_env=None):
    data, form_errors = form.to_spec(editing=existing is not None)
    clean, errors = validate_spec(
        data, existing=existing, inventory=gpu_inventory(), settings=settings(),
        session=db.session, previous_env=previous_env,
    )
    if "model_version_id" not in errors and (problem := foreign_version_error(clean.get("model_version_id"))):
        errors["model_version_id"] = problem
    errors = {**errors, **form_errors}
    return _normalized(clean), errors


def _temporal_message(exc: WorkflowActionError) -> str:
    if exc.type == ERR_REPLICA_QUOTA:
        return "Scale-out refused: the endpoint already runs its maximum number of instances."
    return f"The endpoint's workflow refused: {exc}"


@bp.get("/")
@access(SIGNED_IN)
def index():
    """Home: the endpoint list."""
    return redirect(url_for("ui.list_endpoints"))


@bp.get("/endpoints")
@access(SIGNED_IN)
def list_endpoints():
    """One page of endpoints with live status badges, a filter form and a link to the next page."""
    try:
        query = parse_list_query(request.args, default_limit=UI_DEFAULT_LIMIT)
    except InvalidListQuery as exc:
        return _endpoint_list(Page(), ListQuery(limit=UI_DEFAULT_LIMIT), exc.errors), 400
    return _endpoint_list(endpoint_page(query, visible_project_ids()), query, {})


def _endpoint_list(page: Page, query: ListQuery, problems: dict[str, str]):
    now = datetime.now(timezone.utc)
    return render_template("endpoints.html", page=page, query=query, problems=problems, args=request.args,
                           statuses=ENDPOINT_STATES, environments=ENVIRONMENTS, default_limit=UI_DEFAULT_LIMIT,
                           projects=my_projects(), quota=quota_json, project_name=project_name,
                           usage_of=lambda endpoint: usage_json(endpoint, now))


@bp.get("/docs/api")
@access(SIGNED_IN)
def api_docs():
    """The JSON API's reference, rendered from its OpenAPI document (works without JavaScript)."""
    return render_template("api_docs.html", docs=reference(document(current_app)))


@bp.route("/endpoints/new", methods=["GET", "POST"])
@access(DEVELOPER)
def new_endpoint():
    """Create form; a valid submit shows the review page, nothing is created yet."""
    form = EndpointForm()
    if request.method == "GET":
        return render_template("form.html", form=form, editing=None, general=[])
    project = creation_project(form.project.data or None)
    draft = load_draft(settings().data_dir, form.draft.data)
    clean, errors = _validate(form, None, previous_env=(draft or {}).get("env"))
    if errors:
        general = form.apply_spec_errors(errors)
        return render_template("form.html", form=form, editing=None, general=general), 400
    if draft is not None:
        drop_draft(settings().data_dir, form.draft.data)
    token = save_draft(settings().data_dir, {**clean, DRAFT_PROJECT: project.name})
    return _review(clean, token, project=project)


# The project a new endpoint goes to, kept in its draft beside the spec.
DRAFT_PROJECT = "_project"


def _review(spec: dict, token: str, problem: str | None = None, project=None):
    # formdata=None: the request being answered carries its own (empty) draft field, which
    # would otherwise win over the token and leave the Create button without its draft.
    confirm = ConfirmForm(formdata=None, draft=token)
    from webapp.hosts import placement_forecast

    return render_template("review.html", spec=spec, confirm=confirm, draft=token, problem=problem,
                           project=project, forecast=placement_forecast(spec))


@bp.post("/endpoints/new/back")
@access(DEVELOPER)
def back_to_form():
    """From the review page back to the prefilled form (secrets stay on the server)."""
    confirm = ConfirmForm()
    draft = load_draft(settings().data_dir, confirm.draft.data)
    if draft is None:
        flash("That draft has expired; please fill the form again.", "error")
        return redirect(url_for("ui.new_endpoint"))
    form = EndpointForm(formdata=None)
    form.project.data = draft.pop(DRAFT_PROJECT, None)
    form.fill_from_spec(draft)
    form.draft.data = confirm.draft.data
    return render_template("form.html", form=form, editing=None, general=[])


@bp.post("/endpoints/new/confirm")
@access(DEVELOPER)
def confirm_endpoint():
    """Create the reviewed endpoint and start its workflow."""
    confirm = ConfirmForm()
    token = confirm.draft.data
    draft = load_draft(settings().data_dir, token)
    if draft is None:
        flash("That draft has expired; please fill the form again.", "error")
        return redirect(url_for("ui.new_endpoint"))
    # Checked again: another endpoint may have taken the name, or a GPU check changed, or the
    # user's role in the project.
    project = creation_project(draft.pop(DRAFT_PROJECT, None))
    clean, errors = validate_spec(
        draft, existing=None, inventory=gpu_inventory(), settings=settings(), session=db.session, previous_env=draft["env"]
    )
    if "model_version_id" not in errors and (problem := foreign_version_error(clean.get("model_version_id"))):
        errors["model_version_id"] = problem
    clean = _normalized(clean)
    if errors:
        form = EndpointForm(formdata=None)
        form.project.data = project.name
        form.fill_from_spec(draft)
        form.draft.data = token
        general = form.apply_spec_errors(errors)
        return render_template("form.html", form=form, editing=None, general=general), 400
    if refusal := endpoint_usage(project).refusal(project.name):
        return _review(clean, token, problem=refusal, project=project), 409
    try:
        blocker = previous_still_finishing(clean["name"])
    except (TemporalUnavailable, WorkflowActionError) as exc:
        blocker = str(exc)
    if blocker:
        return _review(clean, token, problem=blocker, project=project), 409
    try:
        endpoint = create_endpoint_row(clean, project)
    except QuotaExceeded as exc:
        return _review(clean, token, problem=str(exc), project=project), 409
    except IntegrityError:
        db.session.rollback()
        flash(f"The name {clean['name']} is taken by another endpoint; choose another name.", "error")
        return redirect(url_for("ui.new_endpoint"))
    drop_draft(settings().data_dir, token)
    try:
        bridge().start_endpoint(endpoint.name)
        flash(f"Endpoint {endpoint.name} created.", "ok")
    except (TemporalUnavailable, WorkflowActionError) as exc:
        flash(f"Endpoint {endpoint.name} saved, but its workflow did not start: {exc}. "
              "Use restart once Temporal is back.", "error")
    return redirect(url_for("ui.show_endpoint", name=endpoint.name))


def _detail_context(endpoint: Endpoint) -> dict:
    now = datetime.now(timezone.utc)
    keys = api_keys.active_keys(db.session, endpoint)
    url = endpoint_url(endpoint)
    role = role_in(endpoint.project_id)
    revisions = rev.revisions_json(endpoint)
    return {
        "revisions": revisions,
        "rollout": next((r for r in revisions if r["state"] == "deploying"), None),
        "endpoint": endpoint,
        "project": project_name(endpoint.project_id),
        "role": role,
        "can_change": role_at_least(role, DEVELOPER),
        "audit_entries": audit.entries(endpoint=endpoint, limit=50),
        "events": recent_events(endpoint, limit=100),
        "url": url,
        "keys": keys,
        "route_examples": route_examples(endpoint.routes, url, bool(keys)) if endpoint.source_kind == "routes" else [],
        "actions": [a for a in UI_ACTIONS if action_refusal(endpoint, a) is None],
        "can_terminate": endpoint.status != TERMINATED,
        "action_form": ActionForm(),
        "key_form": ApiKeyForm(),
        "usage": usage_json(endpoint, now),
        "instance_usage": {i.id: instance_json(i, now) for i in endpoint.instances},
        "prices_configured": settings().price_list.configured,
        "log_max_mib": settings().log_max_bytes // (1024 * 1024), "log_keep": settings().log_keep,
        "warm_windows": [describe_window(w, now) for w in safe_parse(endpoint.warm_windows or "")],
    }


@bp.get("/endpoints/<name>")
@access(VIEWER)
def show_endpoint(name: str):
    """Detail page: status, instances, events, metrics (?range=1h|24h|7d), connect panel, logs, keys."""
    import time

    from common.metrics_store import RANGES
    from webapp.charts import DEFAULT_RANGE, endpoint_metrics, table_rows, usage_rows

    endpoint = get_endpoint(name)
    range_name = request.args.get("range") or DEFAULT_RANGE
    if range_name not in RANGES:
        flash(f"range must be one of {', '.join(RANGES)}; showing {DEFAULT_RANGE}.", "error")
        range_name = DEFAULT_RANGE
    metrics = endpoint_metrics(db.session, endpoint, range_name, time.time())
    return render_template("detail.html", metrics=metrics, metric_rows=table_rows(metrics),
                           usage_rows=usage_rows(metrics), **_detail_context(endpoint))


@bp.get("/endpoints/<name>/panel")
@access(VIEWER)
def endpoint_panel(name: str):
    """The live part of the detail page (status, instances, events), polled by the page."""
    return render_template("_panel.html", **_detail_context(get_endpoint(name)))


@bp.route("/endpoints/<name>/edit", methods=["GET", "POST"])
@access(DEVELOPER)
def edit_endpoint(name: str):
    """Edit the mutable spec fields; the workflow is told with a spec_changed signal."""
    endpoint = get_endpoint(name)
    if endpoint.status in (TERMINATED, FAILED):
        flash(action_refusal(endpoint, "edit") or "This endpoint cannot be edited.", "error")
        return redirect(url_for("ui.show_endpoint", name=name))
    form = EndpointForm()
    if request.method == "GET":
        form = EndpointForm(formdata=None)
        form.fill_from_spec(spec_of(endpoint))
        return render_template("form.html", form=form, editing=endpoint, general=[])
    clean, errors = _validate(form, endpoint)
    if errors:
        general = form.apply_spec_errors(errors)
        form.keep_immutable(spec_of(endpoint))  # disabled inputs are not submitted
        return render_template("form.html", form=form, editing=endpoint, general=general), 400
    outcome = apply_update(endpoint, clean)
    if outcome.needs_restart:
        # Restart-class changes while instances run: the user confirms the restart first.
        token = save_draft(settings().data_dir, clean)
        return render_template("edit_confirm.html", endpoint=endpoint, outcome=outcome, draft=token,
                               confirm=ConfirmForm(formdata=None, draft=token))
    return _after_update(endpoint, outcome)


@bp.post("/endpoints/<name>/edit/confirm")
@access(DEVELOPER)
def confirm_edit(name: str):
    """Save the reviewed restart-class changes and restart the instances."""
    endpoint = get_endpoint(name)
    confirm = ConfirmForm()
    draft = load_draft(settings().data_dir, confirm.draft.data)
    if draft is None:
        flash("That edit has expired; please make it again.", "error")
        return redirect(url_for("ui.edit_endpoint", name=name))
    try:
        options = rev.parse_options(request.form)
    except rev.OptionsError as exc:
        flash(f"Update options: {exc}", "error")
        return render_template("edit_confirm.html", endpoint=endpoint, outcome=apply_update(
            endpoint, draft, dry_run=True), draft=confirm.draft.data, confirm=ConfirmForm(formdata=None,
                                                                                          draft=confirm.draft.data)), 400
    drop_draft(settings().data_dir, confirm.draft.data)
    clean, errors = validate_spec(draft, existing=endpoint, inventory=gpu_inventory(), settings=settings(),
                                  session=db.session)
    if errors:
        flash("The endpoint changed meanwhile: " + "; ".join(errors.values()), "error")
        return redirect(url_for("ui.edit_endpoint", name=name))
    return _after_update(endpoint, apply_update(endpoint, clean, restart=True, options=options))


def _after_update(endpoint: Endpoint, outcome):
    if not outcome.changes:
        flash("Nothing changed.", "ok")
    elif outcome.blocked:
        flash(f"Not saved: {outcome.blocked}.", "error")
    elif outcome.revision is not None and not outcome.unnotified:
        flash(f"Saved: {', '.join(c['field'] for c in outcome.changes)}; revision {outcome.revision} is rolling out "
              f"({outcome.strategy}).", "ok")
    elif outcome.unnotified:
        flash(f"Saved ({', '.join(c['field'] for c in outcome.changes)}), {outcome.unnotified}.", "error")
    else:
        flash(f"Saved: {', '.join(c['field'] for c in outcome.changes)}"
              + ("; the instances are restarting." if outcome.restarted else "."), "ok")
    return redirect(url_for("ui.show_endpoint", name=endpoint.name))


@bp.post("/endpoints/<name>/action/<action>")
@access(DEVELOPER)
def endpoint_action(name: str, action: str):
    """stop, restart, wake, scale-out buttons."""
    endpoint = get_endpoint(name)
    if action not in UI_ACTIONS:
        flash(f"Unknown action {action}.", "error")
        return redirect(url_for("ui.show_endpoint", name=name))
    refusal = action_refusal(endpoint, action)
    if refusal:
        flash(refusal[0].upper() + refusal[1:] + ".", "error")
        return redirect(url_for("ui.show_endpoint", name=name))
    try:
        result = perform_action(endpoint, action, timeout=UI_UPDATE_WAIT_SECONDS)
        if action == "scale-out":
            flash(f"New instance {result['instance_id']} is ready.", "ok")
        else:
            flash(f"{action.capitalize()} requested.", "ok")
    except WorkflowActionError as exc:
        if exc.type == TIMEOUT:
            flash("Scale-out accepted; the new instance is still starting.", "ok")
        else:
            flash(_temporal_message(exc), "error")
    except TemporalUnavailable as exc:
        flash(str(exc), "error")
    return redirect(url_for("ui.show_endpoint", name=name))


REVISION_ACTIONS = ("rollback", "promote", "deploy", "scale")


@bp.post("/endpoints/<name>/revisions/<action>")
@access(DEVELOPER)
def revision_action(name: str, action: str):
    """Rollback, Promote, Redeploy and Scale buttons of the revisions card."""
    endpoint = get_endpoint(name)
    if action not in REVISION_ACTIONS or endpoint.status in (TERMINATED, FAILED):
        flash(f"{action.capitalize()} is not possible here.", "error")
        return redirect(url_for("ui.show_endpoint", name=name))
    try:
        if action == "rollback":
            result = rev.rollback(endpoint, "requested from the web app")
            flash(rev.field_of(result, "message") or "Rolling back.", "ok")
        elif action == "promote":
            flash(rev.field_of(rev.promote(endpoint), "message") or "Promoted.", "ok")
        elif action == "deploy":
            blocker = rev.rollout_in_progress(endpoint)
            if blocker:
                flash(blocker[0].upper() + blocker[1:] + ".", "error")
            else:
                number = rev.make_revision(endpoint, "redeployed: source pinned afresh").number
                rev.deploy(endpoint, number, rev.UpdateOptions())
                flash(f"Revision {number} is rolling out.", "ok")
        else:
            raw = (request.form.get("instance_count") or "").strip()
            count = int(raw) if raw.isdigit() and len(raw) < 4 else -1
            low, high = endpoint.min_instances, endpoint.max_instances
            if count < 0 or (count and not low <= count <= high):
                flash(f"Instances must be from {low} to {high} (0 = automatic), got {raw or 'nothing'}.", "error")
            else:
                outcome = apply_update(endpoint, {"instance_count": count})
                flash(outcome.unnotified or f"Scaled to {count or 'automatic'} instance(s).",
                      "error" if outcome.unnotified else "ok")
    except WorkflowActionError as exc:
        flash(f"The endpoint's workflow refused: {exc.message}", "error")
    except TemporalUnavailable as exc:
        flash(str(exc), "error")
    return redirect(url_for("ui.show_endpoint", name=name))


@bp.route("/endpoints/<name>/terminate", methods=["GET", "POST"])
@access(DEVELOPER)
def terminate_endpoint(name: str):
    """Confirmation step: type the name to terminate (purges everything now)."""
    endpoint = get_endpoint(name)
    form = TerminateForm()
    if request.method == "POST":
        if (form.confirm_name.data or "").strip() != endpoint.name:
            form.confirm_name.errors = [f"Type {endpoint.name} exactly to confirm."]
            return render_template("terminate.html", endpoint=endpoint, form=form), 400
        refusal = action_refusal(endpoint, "terminate")
        if refusal:
            flash(refusal, "error")
            return redirect(url_for("ui.show_endpoint", name=name))
        try:
            perform_action(endpoint, "terminate")
            flash(f"Terminating {endpoint.name}.", "ok")
        except (TemporalUnavailable, WorkflowActionError) as exc:
            flash(str(exc), "error")
        return redirect(url_for("ui.show_endpoint", name=name))
    return render_template("terminate.html", endpoint=endpoint, form=form)


@bp.post("/endpoints/<name>/keys")
@access(DEVELOPER)
def create_key(name: str):
    """Create an API key and show it once (rendered, never stored in the session)."""
    endpoint = get_endpoint(name)
    form = ApiKeyForm()
    key_name, problem = api_keys.validate_key_name(form.key_name.data)
    if problem or endpoint.status == TERMINATED:
        flash(problem or "This endpoint is terminated.", "error")
        return redirect(url_for("ui.show_endpoint", name=name))
    row, plaintext = api_keys.create_key(db.session, endpoint, key_name)
    db.session.commit()
    audit.record("key.create", endpoint=endpoint, target=f"{row.prefix}… {key_name}".strip())
    return render_template("key_created.html", endpoint=endpoint, key=row, plaintext=plaintext, url=endpoint_url(endpoint))


@bp.post("/endpoints/<name>/keys/<int:key_id>/revoke")
@access(DEVELOPER)
def revoke_key(name: str, key_id: int):
    """Revoke a key."""
    endpoint = get_endpoint(name)
    ActionForm()  # CSRF checked by CSRFProtect before the view runs
    key = db.session.get(ApiKey, key_id)
    if key is None or key.endpoint_id != endpoint.id or key.revoked_at is not None:
        flash("No such active key.", "error")
    else:
        api_keys.revoke_key(db.session, key)
        db.session.commit()
        audit.record("key.revoke", endpoint=endpoint, target=f"{key.prefix}… {key.name}".strip())
        flash(f"Key {key.prefix}… revoked.", "ok")
    return redirect(url_for("ui.show_endpoint", name=name))
