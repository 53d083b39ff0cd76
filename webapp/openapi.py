"""The OpenAPI 3.1 document of /api/v1, served at /api/v1/openapi.json and shown at /docs/api.

Nothing in it is written twice: the paths and methods come from the app's URL map, each
operation's description from its view's docstring, the schemas from the declarations
(webapp/openapi_schemas.py). What is written here is what only the views know: the parameters
they read, the bodies they take and the answers they give, errors included. A route of the API
with no entry in OPERATIONS is left out of the document, and tests/test_openapi.py fails naming
it, so a new route gets documented.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from flask import Flask

from common.models import ENDPOINT_STATES, MAX_ROW_ID
from common.spec_fields import BY_NAME, ENVIRONMENTS
from webapp import MAX_JSON_BODY_BYTES
from common.metrics_store import RANGES
from webapp.listing import DEFAULT_LIMIT, MAX_LIMIT
from webapp import openapi_accounts
from webapp.auth import PUBLIC, SIGNED_IN, VIEWER, view_level
from webapp.openapi_schemas import NAME, ref, schemas
from webapp.request_guard import MAX_URL_LENGTH, MUTATING_METHODS
from webapp.views_common import ACTIONS, MAX_LOG_LINES

API_PREFIX = "/api/v1"
JSON = "application/json"
TAGS = (
    ("endpoints", "Endpoints: create, read, change, act on them."),
    ("keys", "API keys of an endpoint (README.md \"Calling an endpoint\")."),
    ("revisions", "Revisions, the traffic split and updates: rolling, blue-green, canary, rollback, scale "
                  "(README.md \"Revisions and updates\")."),
    ("models", "The model registry: models and their immutable versions."),
    ("hosts", "GPU hosts and their pools (README.md \"Many GPU hosts\")."),
    ("accounts", "You, your personal tokens, projects with their members and quotas, users, the audit log "
                 "(README.md \"Accounts and projects\")."),
    ("meta", "This document."),
)
# What an error status means on any operation; an operation says more where it can.
ERRORS = {
    400: "Bad input: `errors` maps each field or parameter to what to change. Also a body that is not "
         "standard JSON, or a Host not in STANDBY_ALLOWED_HOSTS.",
    401: "No valid credentials: send a personal token as `Authorization: Bearer <token>` (or sign in to the UI).",
    403: "Your role does not allow it (the message names the role it needs), or refused as cross-site: a browser "
         "said the request comes from another site (Origin, Sec-Fetch-Site).",
    404: "Nothing has that name, or it belongs to a project you are no member of.",
    413: f"The body is larger than {MAX_JSON_BODY_BYTES // 1024 // 1024} MiB.",
    414: f"The URL is longer than {MAX_URL_LENGTH} characters: send large values in a JSON body.",
    415: "The body is not application/json (send JSON, or no body).",
}
TEMPORAL_ERRORS = {
    502: "Temporal refused the request.",
    503: "Temporal is not reachable; nothing was done.",
    504: "Temporal did not answer in time.",
}


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    ok: dict[int, tuple[str, dict]]  # status -> (when, schema)
    errors: dict[int, str] = field(default_factory=dict)  # status -> when, beyond ERRORS
    query: tuple[dict, ...] = ()
    body: dict[str, dict] | None = None  # media type -> schema
    body_required: bool = True
    # The app's JSON body limit (413); an upload view has the archive limit instead, refused with a 400.
    body_limit: bool = True
    # The schema of its error answers, where they say more than an Error does (apply's outcome).
    error_schema: dict = field(default_factory=lambda: ref("Error"))
    # The media type of its successful answers (a download is not JSON).
    ok_media: str = JSON


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _flag(name: str, description: str) -> dict:
    return _query(name, {"type": "boolean", "default": False}, description + " (true, 1 or yes)")


UPDATE_QUERY = (
    _query("strategy", {"type": "string", "enum": ["rolling", "blue-green", "canary"], "default": "rolling"},
           "How the new revision rolls out; naming one also confirms a change to what runs while instances run."),
    _query("steps", {"type": "string", "pattern": "^[0-9]{1,3}(,[0-9]{1,3})*$"},
           "canary: increasing percentages, e.g. 10,50 (100 follows)."),
    _query("pause", {"type": "string"}, "canary: seconds each step is watched before the next, or `manual` "
                                        "(wait for promote)."),
    _query("settle", {"type": "number", "minimum": 0}, "Seconds each new instance serves before the next step."),
    _query("window", {"type": "number", "minimum": 0}, "blue-green: seconds the old set is kept after the switch."),
    _query("error_rate", {"type": "number", "minimum": 0, "maximum": 1},
           "The new instances' error rate above which the update rolls back."),
)
UPDATE_ERRORS = {409: "The endpoint is terminated or failed, or another update is in progress.",
                 **TEMPORAL_ERRORS}

LIST_QUERY = (
    _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
           "Endpoints a page holds, in name order."),
    _query("cursor", {"type": "string"}, "The `next` of the previous page; left out: the first page."),
    _query("status", {"type": "string", "enum": list(ENDPOINT_STATES)}, "Only endpoints in this state."),
    _query("environment", {"type": "string", "enum": list(ENVIRONMENTS)}, "Only endpoints with this environment."),
    _query("prefix", {"type": "string", "maxLength": BY_NAME["name"].max_length, "pattern": "^[a-z0-9-]*$"},
           "Only endpoints whose name starts with this."),
    _query("project", {"type": "string", "maxLength": 63}, "Only this project's endpoints."),
)
CREATE_IN = _query("project", {"type": "string"},
                   "The project it goes to; left out: the only project where you are a developer, else `default`.")
QUOTA_REFUSED = ("past the project's endpoint quota: `quota` has the counts (stopped and failed endpoints count; "
                 "terminate one)")

OPERATIONS: dict[str, Operation] = {
    "api.create_endpoint": Operation(
        "Create an endpoint", "endpoints", {201: ("Created; its workflow started.", ref("Endpoint"))},
        {404: "No project of the name ?project= gives, or you are no member of it.",
         409: "A terminated endpoint of this name is still being purged: try again in a few seconds; or "
              + QUOTA_REFUSED + ".",
         **TEMPORAL_ERRORS,
         503: "Saved, but Temporal is not reachable: `endpoint` is the saved endpoint, and any later action "
              "starts its workflow."},
        query=(CREATE_IN,), body={JSON: ref("EndpointSpec")}),
    "api.list_endpoints": Operation(
        "List endpoints, a page at a time", "endpoints",
        {200: ("A page; `next` is null on the last one.", ref("EndpointPage"))}, query=LIST_QUERY),
    "api.show_endpoint": Operation("Get an endpoint", "endpoints", {200: ("The endpoint.", ref("Endpoint"))}),
    "api.update_endpoint": Operation(
        "Change an endpoint's spec", "endpoints", {200: ("Saved (or nothing changed).", ref("EndpointUpdated"))},
        {409: "The endpoint is terminated or failed; restart-class fields changed while instances run "
              "(`restart_required` names them: send again with ?restart=true or a ?strategy); or another update "
              "is in progress.",
         503: "Saved, but the endpoint's workflow could not be told (`warning` says why); any later action "
              "tells it."},
        query=(_flag("restart", "Save restart-class changes and roll the new revision out (rolling)"),
               *UPDATE_QUERY),
        body={JSON: ref("EndpointSpecChange")}),
    "api.endpoint_action": Operation(
        "Act on an endpoint: stop, restart, terminate, wake, scale-out", "endpoints",
        {200: ("scale-out, or wake with ?wait=true: an instance is ready.", ref("InstanceReady")),
         202: ("Sent to the endpoint's workflow.", ref("ActionAccepted"))},
        {404: "No such endpoint, or no such action.",
         409: "Not allowed in the endpoint's state (a stopped endpoint does not wake; a failed one can only be "
              "terminated), at max instances (`code` 1007), or the endpoint is not serving.",
         **TEMPORAL_ERRORS, 502: "Temporal refused the request, or the instance failed to start.",
         504: "The instance was not ready in time (it keeps starting)."},
        query=(_flag("wait", "wake: answer once an instance is ready"),)),
    "api.workflow_status": Operation(
        "What the endpoint's workflow holds", "endpoints", {200: ("Its `status` query.", ref("WorkflowStatus"))},
        TEMPORAL_ERRORS),
    "api.list_instances": Operation(
        "List an endpoint's instances", "endpoints", {200: ("Newest first.", ref("InstanceList"))}),
    "api.list_events": Operation("An endpoint's event timeline", "endpoints", {200: ("Newest first.", ref("EventList"))}),
    "api.logs": Operation(
        "Instance log lines", "endpoints", {200: ("Newest first.", ref("LogLines"))},
        {404: "No such endpoint, or it has no such instance."},
        query=(_query("instance", {"type": "string"}, "One instance's lines only."),
               _query("lines", {"type": "integer", "minimum": 1, "maximum": MAX_LOG_LINES, "default": 200},
                      "How many lines, at most."))),
    "api.download_instance_log": Operation(
        "Download an instance's log", "endpoints",
        {200: ("The log as text (an attachment).", {"type": "string"})},
        {404: "No such endpoint, or it has no such instance."}, ok_media="text/plain"),
    "api.download_logs": Operation(
        "Download every instance's log as an archive", "endpoints",
        {200: ("A .tar.gz: <name>-logs/<instance>.log for each instance, and instances.tsv.",
               {"type": "string", "contentMediaType": "application/gzip"})}, ok_media="application/gzip"),
    "api.endpoint_metrics": Operation(
        "An endpoint's metrics over a range", "endpoints", {200: ("One value per point, oldest first.",
                                                                   ref("EndpointMetrics"))},
        query=(_query("range", {"type": "string", "enum": list(RANGES), "default": "1h"},
                      "1h (a point a minute), 24h (5 minutes), 7d (an hour)."),)),
    "api.create_key": Operation(
        "Create an API key", "keys", {201: ("The key, shown this once.", ref("NewApiKey"))},
        {409: "The endpoint is terminated."}, body={JSON: ref("ApiKeyRequest")}, body_required=False),
    "api.list_keys": Operation("List an endpoint's active keys", "keys", {200: ("Never the keys themselves.",
                                                                               ref("ApiKeyList"))}),
    "api.revoke_key": Operation(
        "Revoke an API key", "keys", {200: ("Revoked: the proxy refuses it from now on.", ref("Revoked"))},
        {404: "No such endpoint, or it has no active key with that id."}),
    "registry.api_create_model": Operation(
        "Create a model", "models", {201: ("Created, without versions.", ref("Model"))},
        {404: "No project of the name ?project= gives, or you are no member of it."},
        query=(CREATE_IN,), body={JSON: ref("NewModel")}),
    "registry.api_list_models": Operation("List models", "models", {200: ("With their versions.", ref("ModelList"))}),
    "registry.api_get_model": Operation("Get a model", "models", {200: ("With its versions.", ref("Model"))}),
    "registry.api_create_version": Operation(
        "Add a model version", "models", {201: ("The new version.", ref("ModelVersion"))},
        {400: "A bad archive (damaged, encrypted, too large, a zip bomb) or git URL / ref: `errors` says which."},
        body={"multipart/form-data": ref("ArchiveUpload"), JSON: ref("GitVersion")}, body_limit=False),
    "registry.api_get_version": Operation("Get a model version", "models", {200: ("The version.", ref("ModelVersion"))}),
    "api.apply_spec": Operation(
        "Create or update an endpoint from a whole spec", "endpoints",
        {200: ("Updated, unchanged, or (with ?dry_run=true) what would be done.", ref("Applied")),
         201: ("Created.", ref("Applied"))},
        {400: "The spec is invalid: `errors` maps each field to what to change (`action` is refused); or "
              "?project= names another project than the endpoint's.",
         404: "No project of the name ?project= gives, or you are no member of it.",
         409: "Restart-class fields changed while instances run (`restart_required` names them: send again with "
              "?restart=true), the endpoint failed, a terminated one of this name is still being purged, or "
              + QUOTA_REFUSED + ".",
         **TEMPORAL_ERRORS,
         503: "Saved, but Temporal is not reachable or the workflow was not told (`warning`, `error` say which)."},
        query=(_flag("dry_run", "Answer what would be done and change nothing"),
               _flag("restart", "Allow restart-class changes while instances run, rolling the new revision out"),
               CREATE_IN, *UPDATE_QUERY),
        body={JSON: ref("EndpointSpec")},
        # Its own refusals say what it did (`action` refused) beside the error; the request
        # checks in front of every view (403, 413, 415, bad JSON) answer a plain Error.
        error_schema={"anyOf": [ref("Applied"), ref("Error")]}),
    "hosts_api.list_hosts": Operation("List hosts", "hosts", {200: ("By pool, then name.", ref("HostList"))}),
    "hosts_api.host_operation": Operation(
        "Drain or undrain a host", "hosts", {202: ("Sent to the host's pool.", ref("HostOperation"))},
        {404: "No such host, or no such operation (drain, undrain).",
         503: "Temporal is not reachable (or refused): nothing was done."}),
    "api.list_revisions": Operation(
        "List an endpoint's revisions", "revisions",
        {200: ("Newest first, with the traffic split.", ref("RevisionList"))}),
    "api.deploy_revision": Operation(
        "Roll a revision out", "revisions", {202: ("Accepted: the update runs on.", ref("Deployed"))},
        UPDATE_ERRORS,
        query=(_query("revision", {"type": "integer", "minimum": 1},
                      "An existing revision; left out: a new one from the current spec, its source pinned afresh."),
               *UPDATE_QUERY)),
    "api.put_traffic": Operation(
        "Split traffic between revisions", "revisions", {200: ("The split now in place.", ref("TrafficSplit"))},
        {400: "A share that is not a whole percentage, a revision that does not exist, or shares that do not sum "
              "to 100: `errors.traffic` says which.", **UPDATE_ERRORS},
        body={JSON: ref("TrafficSplit")}),
    "api.rollback_endpoint": Operation(
        "Roll back to the last good revision", "revisions", {202: ("Accepted.", ref("RolledBack"))},
        {409: "The endpoint is terminated or failed, or there is no earlier good revision.", **TEMPORAL_ERRORS},
        body={JSON: ref("RollbackRequest")}, body_required=False),
    "api.promote_endpoint": Operation(
        "Promote a canary or end a blue-green window", "revisions", {202: ("Accepted.", ref("Promoted"))},
        {409: "The endpoint is terminated or failed, or no canary or blue-green update is in progress.",
         **TEMPORAL_ERRORS}),
    "api.scale_endpoint": Operation(
        "Set the number of instances", "revisions",
        {200: ("Saved in the spec as instance_count; the workflow follows.", ref("EndpointUpdated"))},
        {409: "The endpoint is terminated or failed.",
         503: "Saved, but the endpoint's workflow could not be told (`warning` says why)."},
        body={JSON: ref("ScaleRequest")}),
    "api.openapi_document": Operation("This document", "meta", {200: ("OpenAPI 3.1.", {"type": "object"})}),
    **openapi_accounts.operations(Operation, _query, _flag),
}

ROW_ID = {"type": "integer", "minimum": 0, "maximum": MAX_ROW_ID}
PATH_PARAMETERS = {
    "name": lambda tag: ({"schema": {"type": "string", "minLength": 1}, "description": "The host's name."}
                         if tag == "hosts" else
                         {"schema": NAME, "description": "The model's name." if tag == "models" else
                          "The endpoint's name."}),
    "action": lambda tag: {"schema": {"type": "string", "enum": list(ACTIONS)}},
    "key_id": lambda tag: {"schema": ROW_ID, "description": "The key's id."},
    "instance_id": lambda tag: {"schema": {"type": "string", "minLength": 1, "maxLength": 16},
                                "description": "The instance's id, e.g. xykemlvy."},
    "number": lambda tag: {"schema": ROW_ID, "description": "The version's number."},
    "operation": lambda tag: {"schema": {"type": "string", "enum": ["drain", "undrain"]}},
    **{name: (lambda tag, p=parameter: p) for name, parameter in openapi_accounts.PATH_PARAMETERS.items()},
}

DESCRIPTION = f"""The JSON API of a Standby web app (README.md "JSON API").

Every error under /api/ is JSON: `{{"error": message, "errors": {{field: message}}}}`, the messages
saying what to change; 405 (a method a path does not have) and 404 (a path that does not exist)
included. Request bodies are standard JSON (no NaN or Infinity, nesting at most 32 levels), at most
{MAX_JSON_BODY_BYTES // 1024 // 1024} MiB (archive uploads: STANDBY_MODEL_MAX_ARCHIVE_BYTES).
Requests that change something carry no body or a JSON body (multipart for archive uploads), else
415, and a browser's cross-site request is refused with 403.

Every call needs credentials: a personal token as `Authorization: Bearer <token>` (or the UI's
session); without them 401. What you see and may do follows your role in each project: another
project's endpoints and models answer 404, as if they did not exist.

Lifecycle actions go through Temporal: while it is unreachable they answer 503 and change nothing,
except create and change, which save the spec and say so."""


def openapi_path(rule: str) -> str:
    """/api/v1/endpoints/<name>/keys/<int:key_id> -> /api/v1/endpoints/{name}/keys/{key_id}"""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule)


def _description(view) -> str:
    return " ".join((inspect.getdoc(view) or "").split())


def _responses(operation: Operation, method: str, has_path_params: bool, level: str | None) -> dict[str, dict]:
    statuses = {400, 401, 414} | ({404} if has_path_params else set())
    if method.upper() in MUTATING_METHODS:
        statuses |= {403, 415} | ({413} if operation.body and operation.body_limit else set())
    if level not in (VIEWER, SIGNED_IN, PUBLIC):  # a role the caller may lack (webapp/auth.py)
        statuses.add(403)
    statuses |= set(operation.errors)
    responses = {str(status): {"description": when, "content": {operation.ok_media: {"schema": schema}}}
                 for status, (when, schema) in operation.ok.items()}
    for status in sorted(statuses):
        when = operation.errors.get(status) or ERRORS[status]
        responses[str(status)] = {"description": when, "content": {JSON: {"schema": operation.error_schema}}}
    return responses


def _operation(app: Flask, endpoint: str, method: str, arguments: list[str]) -> dict:
    operation = OPERATIONS[endpoint]
    parameters = [{"name": arg, "in": "path", "required": True, **PATH_PARAMETERS[arg](operation.tag)}
                  for arg in arguments]
    body: dict[str, Any] = {}
    if operation.body:
        body["requestBody"] = {"required": operation.body_required,
                               "content": {media: {"schema": schema} for media, schema in operation.body.items()}}
    return {
        "operationId": endpoint.split(".")[-1].removeprefix("api_"),
        "summary": operation.summary,
        "description": _description(app.view_functions[endpoint]),
        "tags": [operation.tag],
        **({"parameters": parameters + list(operation.query)} if parameters or operation.query else {}),
        **body,
        "responses": _responses(operation, method, bool(arguments), view_level(app, endpoint)),
    }


def api_rules(app: Flask):
    """(OpenAPI path, method, Flask endpoint, path arguments) of every route under /api/v1."""
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.rule.startswith(API_PREFIX + "/"):
            arguments = re.findall(r"<(?:[^<>:]+:)?([^<>]+)>", rule.rule)
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                yield openapi_path(rule.rule), method.lower(), rule.endpoint, arguments


def build_document(app: Flask) -> dict:
    settings = app.extensions["standby_settings"]
    declared = BY_NAME["startup_timeout_seconds"]
    # The settings narrow what a request may set (README.md "Spec limits").
    request_bounds = {"startup_timeout_seconds": (max(declared.low, settings.min_startup_timeout_seconds),
                                                  min(declared.high, settings.max_startup_timeout_seconds))}
    paths: dict[str, dict] = {}
    for path, method, endpoint, arguments in api_rules(app):
        if endpoint in OPERATIONS:
            paths.setdefault(path, {})[method] = _operation(app, endpoint, method, arguments)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Standby API", "version": "1", "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": paths,
        "components": {"schemas": {**schemas(request_bounds), **openapi_accounts.schemas()},
                       "securitySchemes": openapi_accounts.SECURITY_SCHEMES},
        "security": openapi_accounts.SECURITY,
    }


def document(app: Flask) -> dict:
    """The document of `app`, built once (its routes and settings do not change while it runs)."""
    if "openapi_document" not in app.extensions:
        app.extensions["openapi_document"] = build_document(app)
    return app.extensions["openapi_document"]
