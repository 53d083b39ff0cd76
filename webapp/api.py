"""JSON API under /api/v1 (docs/architecture.md "The JSON API").

Errors are JSON: {"error": ..., "errors": {...}}."""
from __future__ import annotations

from flask import Blueprint, current_app, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from common.models import FAILED, TERMINATED, ApiKey, Endpoint
from common.temporal_bridge import TIMEOUT, TemporalUnavailable, WorkflowActionError
from common.account_models import Project
from webapp import api_keys, audit
from webapp.auth import DEVELOPER, SIGNED_IN, VIEWER, access, require_role, role_in, visible_project_ids
from webapp.extensions import bridge, db, gpu_inventory, settings
from webapp.listing import InvalidListQuery, endpoint_page, parse_list_query
from webapp.openapi import document
from webapp.projects import QuotaExceeded, creation_project, endpoint_usage, foreign_version_error
from webapp.spec import DEFAULTS, changes, validate_spec
from webapp.views_common import (
    ACTIONS,
    UpdateOutcome,
    action_refusal,
    apply_update,
    create_endpoint_row,
    endpoint_json,
    endpoint_logs,
    event_json,
    get_endpoint,
    instance_json,
    parse_line_count,
    perform_action,
    previous_still_finishing,
    project_name,
    recent_events,
    restart_message,
)
from webapp import revisions as rev
from workflows.contracts import (
    ERR_BAD_SPLIT,
    ERR_NO_ROLLOUT,
    ERR_NOT_SERVING,
    ERR_NOTHING_TO_ROLL_BACK,
    ERR_REPLICA_QUOTA,
    ERR_ROLLOUT_ACTIVE,
    ERR_START_FAILED,
)

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def error(status: int, message: str, errors: dict | None = None, **extra):
    return {"error": message, "errors": errors or {}, **extra}, status


def _json_body():
    """The request's JSON object, or None. A body that is not standard JSON (NaN, Infinity,
    nesting past common/strict_json.py's limit) raises BadRequest saying why (a JSON 400)."""
    if not request.get_data(cache=True):
        return None
    body = request.get_json(force=True)
    if not isinstance(body, dict):
        return None
    return body


def workflow_error(exc: Exception, endpoint: Endpoint | None = None):
    """Map bridge exceptions to HTTP answers."""
    if isinstance(exc, TemporalUnavailable):
        extra = {"endpoint": endpoint_json(endpoint)} if endpoint is not None else {}
        return error(503, str(exc), **extra)
    assert isinstance(exc, WorkflowActionError)
    if exc.type == ERR_REPLICA_QUOTA:
        return error(409, exc.message, code=1007, msg="deployment replica quota exceeded")
    if exc.type in (ERR_NOT_SERVING, ERR_ROLLOUT_ACTIVE, ERR_NO_ROLLOUT, ERR_NOTHING_TO_ROLL_BACK):
        return error(409, exc.message)
    if exc.type == ERR_BAD_SPLIT:
        return error(400, exc.message, {"traffic": exc.message})
    if exc.type == ERR_START_FAILED:
        return error(502, f"the instance failed to start: {exc.message}")
    if exc.type == TIMEOUT:
        return error(504, exc.message)
    return error(502, f"Temporal refused the request ({exc.type}): {exc.message}")


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _validated(body: dict, existing: Endpoint | None) -> tuple[dict, dict]:
    clean, errors = validate_spec(body, existing=existing, inventory=gpu_inventory(), settings=settings(),
                                  session=db.session)
    if "model_version_id" not in errors and (problem := foreign_version_error(clean.get("model_version_id"))):
        errors["model_version_id"] = problem
    return clean, errors


def _invalid_spec(errors: dict):
    return error(400, "invalid endpoint spec: " + "; ".join(errors.values()), errors)


def _quota_refusal(message: str, project: Project):
    return error(409, message, {"project": message}, quota=endpoint_usage(project).json())


def _create(clean: dict, project: Project) -> tuple[Endpoint | None, tuple | None]:
    """Insert a validated spec in `project` and start its workflow: (the endpoint, None), or what
    to answer instead (with the endpoint when it was saved but its workflow could not be started)."""
    if refusal := endpoint_usage(project).refusal(project.name):
        return None, _quota_refusal(refusal, project)
    try:
        blocker = previous_still_finishing(clean["name"])
    except (TemporalUnavailable, WorkflowActionError) as exc:
        return None, workflow_error(exc)
    if blocker:
        return None, error(409, blocker, {"name": blocker})
    try:
        endpoint = create_endpoint_row(clean, project)
    except QuotaExceeded as exc:
        return None, _quota_refusal(str(exc), project)
    except IntegrityError:
        db.session.rollback()
        return None, error(400, "invalid endpoint spec",
                           {"name": f"name {clean['name']!r} is taken by another endpoint; choose another name"})
    try:
        bridge().start_endpoint(endpoint.name)
    except (TemporalUnavailable, WorkflowActionError) as exc:
        # The spec row is kept: any later action (wake, restart...) starts the workflow.
        return endpoint, workflow_error(exc, endpoint)
    return endpoint, None


@bp.post("/endpoints")
@access(DEVELOPER)
def create_endpoint():
    """Create an endpoint and start its workflow, in the project ?project= names (by default the
    only project where you are a developer, else `default`); past the project's endpoint quota,
    409 with the counts."""
    project = creation_project(request.args.get("project"))
    body = _json_body()
    if body is None:
        return error(400, "the request body must be a JSON object of spec fields")
    clean, errors = _validated(body, None)
    if errors:
        return _invalid_spec(errors)
    endpoint, failure = _create(clean, project)
    return failure or (endpoint_json(endpoint), 201)


@bp.get("/endpoints")
@access(SIGNED_IN)
def list_endpoints():
    """One page of endpoints in name order (?limit, ?cursor from the last answer's `next`,
    filters ?status, ?environment, ?prefix); `next` is null on the last page."""
    try:
        page = endpoint_page(parse_list_query(request.args), visible_project_ids())
    except InvalidListQuery as exc:
        return error(400, str(exc), exc.errors)
    return {"endpoints": [endpoint_json(e) for e in page.endpoints], "next": page.next_cursor}


@bp.get("/endpoints/<name>")
@access(VIEWER)
def show_endpoint(name: str):
    """One endpoint: spec, status, url, instances."""
    return endpoint_json(get_endpoint(name))


@bp.patch("/endpoints/<name>")
@access(DEVELOPER)
def update_endpoint(name: str):
    """Change spec fields by their edit class: live ones at once (the workflow is told and the
    running instances follow), restart-class ones with ?restart=true while instances run
    (409 saying so otherwise), immutable ones never (400 naming them)."""
    endpoint = get_endpoint(name)
    if endpoint.status in (TERMINATED, FAILED):
        return error(409, action_refusal(endpoint, "edit") or f"endpoint {name!r} is {endpoint.status}")
    body = _json_body()
    if body is None:
        return error(400, "the request body must be a JSON object of spec fields to change")
    clean, errors = _validated(body, endpoint)
    if errors:
        return _invalid_spec(errors)
    try:
        options = rev.parse_options(request.args)
    except rev.OptionsError as exc:
        return error(400, "invalid update options: " + str(exc), exc.errors)
    outcome = apply_update(endpoint, clean, restart=_flag("restart"), options=options)
    if outcome.needs_restart:
        return _restart_refusal(outcome, **outcome.json())
    if outcome.blocked:
        return error(409, outcome.blocked, **outcome.json())
    if outcome.unnotified:  # saved, but the running instances do not know yet: say so
        return error(503, outcome.unnotified, endpoint=endpoint_json(endpoint), **outcome.json())
    return {**endpoint_json(endpoint), **outcome.json()}


def _restart_refusal(outcome: UpdateOutcome, **extra):
    fields = outcome.needs_restart
    return error(409, restart_message(fields), {f: restart_message([f]) for f in fields}, **extra)


@bp.post("/apply")
@access(DEVELOPER)
def apply_spec():
    """Create or update an endpoint from a whole spec (README "Spec files"); ?dry_run=true answers
    the same and changes nothing, ?restart=true allows restart-class changes while instances run."""
    dry_run = _flag("dry_run")
    body = _json_body()
    if body is None:
        return _applied("refused", dry_run, None, UpdateOutcome(),
                        error(400, "the request body must be a JSON object: a whole endpoint spec"))
    name = body.get("name")
    endpoint = db.session.scalar(select(Endpoint).where(Endpoint.name == name.strip())) \
        if isinstance(name, str) else None
    if endpoint is not None and role_in(endpoint.project_id) is None:
        endpoint = None  # another project's: for this user the name is taken, nothing more
    if endpoint is None or endpoint.status == TERMINATED:
        return _apply_new(body, dry_run)
    require_role(endpoint.project_id, f"no endpoint named {name!r}", DEVELOPER)
    if (wanted := request.args.get("project")) and wanted != project_name(endpoint.project_id):
        message = (f"endpoint {endpoint.name} belongs to project {project_name(endpoint.project_id)}; an endpoint "
                   "cannot move to another project (create it there under another name)")
        return _applied("refused", dry_run, endpoint, UpdateOutcome(), error(400, message, {"project": message}))
    # Declarative: the spec is the whole spec, so a field it leaves out goes back to its default
    # (the pools: this installation's default pool). A secret variable without a value keeps the
    # stored value (webapp/spec.py _clean_env).
    clean, errors = _validated({**DEFAULTS, "pools": [settings().pool], **body}, endpoint)
    if errors:
        return _applied("refused", dry_run, endpoint, UpdateOutcome(), _invalid_spec(errors))
    # A failed endpoint is never written (it can only be terminated); an equal spec is still unchanged.
    failed = endpoint.status == FAILED
    try:
        options = rev.parse_options(request.args)
    except rev.OptionsError as exc:
        return _applied("refused", dry_run, endpoint, UpdateOutcome(),
                        error(400, "invalid update options: " + str(exc), exc.errors))
    outcome = apply_update(endpoint, clean, restart=_flag("restart"), dry_run=dry_run or failed, options=options)
    if not outcome.changes:
        return _applied("unchanged", dry_run, endpoint, outcome)
    if failed:
        return _applied("refused", dry_run, endpoint, outcome, error(409, action_refusal(endpoint, "edit")))
    if outcome.needs_restart:
        return _applied("refused", dry_run, endpoint, outcome, _restart_refusal(outcome))
    if outcome.blocked:
        return _applied("refused", dry_run, endpoint, outcome, error(409, outcome.blocked))
    if outcome.unnotified:
        return _applied("updated", dry_run, endpoint, outcome, error(503, outcome.unnotified))
    return _applied("updated", dry_run, endpoint, outcome)


def _apply_new(body: dict, dry_run: bool):
    project = creation_project(request.args.get("project"))
    clean, errors = _validated(body, None)
    if errors:
        return _applied("refused", dry_run, None, UpdateOutcome(), _invalid_spec(errors))
    outcome = UpdateOutcome(changes=changes(None, clean, {"pools": [settings().pool]}))
    if dry_run:
        if refusal := endpoint_usage(project).refusal(project.name):
            return _applied("refused", dry_run, None, outcome, _quota_refusal(refusal, project))
        return _applied("created", dry_run, None, outcome)
    endpoint, failure = _create(clean, project)
    outcome.saved = endpoint is not None
    return _applied("created" if outcome.saved else "refused", dry_run, endpoint, outcome, failure, 201)


def _applied(action: str, dry_run: bool, endpoint: Endpoint | None, outcome: UpdateOutcome,
             failure: tuple | None = None, status: int = 200):
    """The answer of /apply: what it did, the endpoint (none before it is created) and the changes,
    with the error of a failure (`failure`: an `error(...)` answer) and its status."""
    body = {"action": action, "dry_run": dry_run, "endpoint": endpoint_json(endpoint) if endpoint else None,
            **outcome.json()}
    if failure is not None:
        failure_body, status = failure
        body.update({k: v for k, v in failure_body.items() if k != "endpoint"})
    return body, status


@bp.post("/endpoints/<name>/<action>")
@access(DEVELOPER)
def endpoint_action(name: str, action: str):
    """stop, restart, terminate, wake (?wait=true waits for a ready instance), scale-out."""
    if action not in ACTIONS:
        return error(404, f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    endpoint = get_endpoint(name)
    refusal = action_refusal(endpoint, action)
    if refusal:
        return error(409, refusal)
    wait = _flag("wait")
    try:
        result = perform_action(endpoint, action, wait=wait)
    except (TemporalUnavailable, WorkflowActionError) as exc:
        return workflow_error(exc)
    if action == "scale-out" or (action == "wake" and wait):
        return result, 200
    return {"action": action, **result}, 202


# ---- revisions and updates (README.md "Revisions and updates") ----


@bp.get("/endpoints/<name>/revisions")
@access(VIEWER)
def list_revisions(name: str):
    """Revisions, newest first: each with its state, traffic share, pinned source, spec (secret
    values masked) and changes from the one before; and the traffic split."""
    endpoint = get_endpoint(name)
    return {"revisions": rev.revisions_json(endpoint), "traffic": rev.traffic_of(endpoint)}


def _updatable(endpoint: Endpoint):
    if endpoint.status in (TERMINATED, FAILED):
        return error(409, action_refusal(endpoint, "edit") or f"endpoint {endpoint.name!r} is {endpoint.status}")
    return None


@bp.post("/endpoints/<name>/deploy")
@access(DEVELOPER)
def deploy_revision(name: str):
    """Roll a revision out: ?revision=N deploys an existing one (one not rolled out, or an older
    one), else a new revision is made from the current spec (its git ref resolved and source
    directory copied afresh). ?strategy, ?steps, ?pause, ?settle, ?window, ?error_rate as for
    PATCH."""
    endpoint = get_endpoint(name)
    refusal = _updatable(endpoint)
    if refusal:
        return refusal
    try:
        options = rev.parse_options(request.args)
    except rev.OptionsError as exc:
        return error(400, "invalid update options: " + str(exc), exc.errors)
    raw = (request.args.get("revision") or "").strip()
    known = {r.number for r in endpoint.revisions}
    number = None
    if raw:
        number = int(raw) if raw.isdigit() and len(raw) < 10 else None
        if number not in known:
            have = ", ".join(str(n) for n in sorted(known)) or "none"
            return error(400, f"revision must name one of this endpoint's revisions ({have}), got {raw!r}",
                         {"revision": f"no revision {raw!r}"})
    blocker = rev.rollout_in_progress(endpoint)
    if blocker:
        return error(409, blocker)
    if number is None:
        number = rev.make_revision(endpoint, "redeployed: source pinned afresh").number
    try:
        accepted = rev.deploy(endpoint, number, options)
    except (TemporalUnavailable, WorkflowActionError) as exc:
        return workflow_error(exc, endpoint)
    return {"revision": number, "rollout": rev.field_of(accepted, "rollout"), "strategy": options.strategy}, 202


@bp.put("/endpoints/<name>/traffic")
@access(DEVELOPER)
def put_traffic(name: str):
    """Split traffic between revisions: {"traffic": {"1": 90, "2": 10}}, whole percentages that sum
    to 100. A revision given a share and no instance wakes on its first request."""
    endpoint = get_endpoint(name)
    refusal = _updatable(endpoint)
    if refusal:
        return refusal
    body = _json_body()
    if body is None or set(body) != {"traffic"}:
        message = 'the body must be {"traffic": {"<revision>": <percent>, ...}}, e.g. {"traffic": {"1": 90, "2": 10}}'
        return error(400, message, {"traffic": message})
    try:
        split = rev.checked_split(endpoint, body["traffic"])
    except rev.SplitError as exc:
        return error(400, str(exc), {"traffic": str(exc)})
    blocker = rev.rollout_in_progress(endpoint)
    if blocker:
        return error(409, blocker)
    try:
        result = rev.set_traffic(endpoint, split)
    except (TemporalUnavailable, WorkflowActionError) as exc:
        return workflow_error(exc, endpoint)
    answered = rev.field_of(result, "traffic") or split
    return {"traffic": {str(k): v for k, v in sorted(answered.items(), key=lambda kv: int(kv[0]))}}


@bp.post("/endpoints/<name>/rollback")
@access(DEVELOPER)
def rollback_endpoint(name: str):
    """All traffic back to the last good revision: an update in progress rolls back at once; a
    split made by hand returns to it; after an update finished, the revision before it comes back
    (a rolling update)."""
    endpoint = get_endpoint(name)
    refusal = _updatable(endpoint)
    if refusal:
        return refusal
    body = _json_body() or {}
    reason = body.get("reason") if isinstance(body.get("reason"), str) else ""
    try:
        result = rev.rollback(endpoint, reason[:500])
    except (TemporalUnavailable, WorkflowActionError) as exc:
        return workflow_error(exc, endpoint)
    return {"revision": rev.field_of(result, "revision"), "rollout": rev.field_of(result, "rollout") or None,
            "message": rev.field_of(result, "message") or ""}, 202


@bp.post("/endpoints/<name>/promote")
@access(DEVELOPER)
def promote_endpoint(name: str):
    """A canary's next step now (a manual pause, or its pause cut short), or the end of a
    blue-green rollback window."""
    endpoint = get_endpoint(name)
    refusal = _updatable(endpoint)
    if refusal:
        return refusal
    try:
        result = rev.promote(endpoint)
    except (TemporalUnavailable, WorkflowActionError) as exc:
        return workflow_error(exc, endpoint)
    return {"rollout": rev.field_of(result, "rollout"), "message": rev.field_of(result, "message") or ""}, 202


@bp.post("/endpoints/<name>/scale")
@access(DEVELOPER)
def scale_endpoint(name: str):
    """Set the number of instances (manual scale, saved in the spec as `instance_count`):
    {"instance_count": N} from min to max instances, fewer stopping the extra ones at once; 0 goes
    back to automatic scaling."""
    endpoint = get_endpoint(name)
    refusal = _updatable(endpoint)
    if refusal:
        return refusal
    body = _json_body()
    count = body.get("instance_count") if body is not None and set(body) == {"instance_count"} else None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        message = 'the body must be {"instance_count": N}, a whole number (0 for automatic scaling)'
        return error(400, message, {"instance_count": message})
    low, high = endpoint.min_instances, endpoint.max_instances
    if count and not low <= count <= high:
        message = (f"instance_count must be between min_instances ({low}) and max_instances ({high}), or 0 for "
                   f"automatic scaling; got {count}")
        return error(400, message, {"instance_count": message})
    outcome = apply_update(endpoint, {"instance_count": count})
    if outcome.unnotified:
        return error(503, outcome.unnotified, endpoint=endpoint_json(endpoint), **outcome.json())
    return {**endpoint_json(endpoint), **outcome.json()}


@bp.get("/endpoints/<name>/workflow")
@access(VIEWER)
def workflow_status(name: str):
    """What the endpoint's workflow holds right now (its `status` query): desired state,
    generation, pending wake, in-flight requests per instance."""
    endpoint = get_endpoint(name)
    try:
        return {"workflow_id": endpoint.workflow_id, "state": bridge().query_status(name)}
    except (TemporalUnavailable, WorkflowActionError) as exc:
        return workflow_error(exc, endpoint)


@bp.get("/endpoints/<name>/instances")
@access(VIEWER)
def list_instances(name: str):
    """Instances of an endpoint, newest first."""
    return {"instances": [instance_json(i) for i in get_endpoint(name).instances]}


@bp.get("/endpoints/<name>/events")
@access(VIEWER)
def list_events(name: str):
    """Event timeline, newest first."""
    return {"events": [event_json(e) for e in recent_events(get_endpoint(name))]}


@bp.get("/endpoints/<name>/logs")
@access(VIEWER)
def logs(name: str):
    """Instance log lines, newest first (?instance=<id>&lines=N)."""
    endpoint = get_endpoint(name)
    instance_id = request.args.get("instance") or None
    if instance_id and all(i.id != instance_id for i in endpoint.instances):
        return error(404, f"endpoint {name!r} has no instance {instance_id!r}")
    try:
        count = parse_line_count(request.args.get("lines"))
    except ValueError as exc:
        return error(400, str(exc), {"lines": str(exc)})
    return {"lines": endpoint_logs(endpoint, instance_id, count)}


@bp.get("/endpoints/<name>/logs/<instance_id>.log")
@access(VIEWER)
def download_instance_log(name: str, instance_id: str):
    """One instance's whole log as a text file (its rotated parts joined, oldest first)."""
    from flask import Response

    from webapp.logs_export import instance_log_chunks

    endpoint = get_endpoint(name)
    instance = next((i for i in endpoint.instances if i.id == instance_id), None)
    if instance is None:
        return error(404, f"endpoint {name!r} has no instance {instance_id!r}")
    return Response(instance_log_chunks(instance), mimetype="text/plain",
                    headers={"Content-Disposition": f'attachment; filename="{name}-{instance.id}.log"'})


@bp.get("/endpoints/<name>/logs.tar.gz")
@access(VIEWER)
def download_logs(name: str):
    """Every instance's log of the endpoint as a .tar.gz, e.g. before terminating it (which deletes them)."""
    from flask import Response

    from webapp.logs_export import endpoint_archive, stream_file

    endpoint = get_endpoint(name)
    return Response(stream_file(endpoint_archive(endpoint)), mimetype="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{name}-logs.tar.gz"'})


@bp.get("/endpoints/<name>/metrics")
@access(VIEWER)
def endpoint_metrics(name: str):
    """Request rate, latency p50/p95/p99, error rate, instances over time with their cold starts,
    and CPU, memory and GPU use per instance (?range=1h|24h|7d), for charts."""
    import time

    from common.metrics_store import RANGES
    from webapp.charts import DEFAULT_RANGE
    from webapp.charts import endpoint_metrics as metrics_of

    endpoint = get_endpoint(name)
    range_name = request.args.get("range") or DEFAULT_RANGE
    if range_name not in RANGES:
        problem = f"range must be one of {', '.join(RANGES)}, got {range_name[:20]!r}"
        return error(400, problem, {"range": problem})
    return metrics_of(db.session, endpoint, range_name, time.time())


@bp.post("/endpoints/<name>/keys")
@access(DEVELOPER)
def create_key(name: str):
    """Create an API key; the key itself is in this answer only."""
    endpoint = get_endpoint(name)
    if endpoint.status == TERMINATED:
        return error(409, f"endpoint {name!r} is terminated")
    body = request.get_json(force=True) if request.get_data(cache=True) else None
    if body is not None and not isinstance(body, dict):
        return error(400, 'the body must be a JSON object such as {"name": "ci"}')
    key_name, problem = api_keys.validate_key_name((body or {}).get("name"))
    if problem:
        return error(400, problem, {"name": problem})
    row, plaintext = api_keys.create_key(db.session, endpoint, key_name)
    db.session.commit()
    audit.record("key.create", endpoint=endpoint, target=f"{row.prefix}… {key_name}".strip())
    return {**api_keys.key_json(row), "key": plaintext}, 201


@bp.get("/endpoints/<name>/keys")
@access(VIEWER)
def list_keys(name: str):
    """Active keys (prefix, name, created); never the keys themselves."""
    endpoint = get_endpoint(name)
    return {"keys": [api_keys.key_json(k) for k in api_keys.active_keys(db.session, endpoint)]}


@bp.delete("/endpoints/<name>/keys/<int:key_id>")
@access(DEVELOPER)
def revoke_key(name: str, key_id: int):
    """Revoke a key: the proxy refuses it from now on."""
    endpoint = get_endpoint(name)
    key = db.session.get(ApiKey, key_id)
    if key is None or key.endpoint_id != endpoint.id or key.revoked_at is not None:
        return error(404, f"endpoint {name!r} has no active key with id {key_id}")
    api_keys.revoke_key(db.session, key)
    db.session.commit()
    audit.record("key.revoke", endpoint=endpoint, target=f"{key.prefix}… {key.name}".strip())
    return {"revoked": key_id}


@bp.get("/openapi.json")
@access(SIGNED_IN)
def openapi_document():
    """This API in OpenAPI 3.1: every route, its parameters, bodies and answers, errors included; the spec
    fields' schemas come from their declarations (common/spec_fields.py). Read it as a page at /docs/api."""
    return document(current_app)
