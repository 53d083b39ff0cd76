"""The JSON Schemas of the API's bodies (OpenAPI 3.1 `components.schemas`), derived from what
already defines them: the spec fields from their declarations (common/spec_fields.py: type,
default, bounds, choices, length, help, edit class), states from common/models.py, route
templates from common/routes.py, and the answers' keys from the functions that build them
(webapp/views_common.py `endpoint_json`, `instance_json`; webapp/registry.py `model_json`).
tests/test_openapi.py checks real answers against these schemas, so a key added to an answer
without its schema fails there.
"""
from __future__ import annotations

from typing import Any

from common.models import ENDPOINT_STATES, HOST_DOWN, HOST_DRAINING, HOST_UP, INSTANCE_STATES
from common.revisions import REVISION_FIELDS, REVISION_STATES, STRATEGIES
from common.route_values import PARAM_TYPES
from common.routes import CALL_STYLES, METHODS
from common.spec_fields import BOOL, CHOICE, EDIT_CLASSES, ENV, FLOAT, INT, NAMES, REF, ROUTES, SPEC, TEXT, SpecField
from webapp.spec import ENV_KEY_RE, ENV_VALUE_MAX, NAME_RE
from webapp.views_common import ACTIONS

# Text the API refuses: control characters (a multi-line field may hold tab and line breaks).
SINGLE_LINE = r"^[^\x00-\x1f\x7f]*$"
MULTI_LINE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
NAME = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": NAME_RE.pattern}
TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


# A traffic split: revision number (as a string key) -> whole percent; the shares sum to 100.
TRAFFIC = {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
           "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100},
           "description": "Revision number -> percent of requests; the shares sum to 100 (README.md "
                          "\"Revisions and updates\")."}


def obj(properties: dict[str, Any], *, required: tuple[str, ...] | str = "all", description: str = "",
        additional: bool = False, example: dict | None = None) -> dict:
    """An object schema; by default every property is required and no other key is allowed."""
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": list(properties) if required == "all" else list(required),
                              "additionalProperties": additional}
    if description:
        schema["description"] = description
    if example is not None:
        schema["examples"] = [example]
    return schema


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


# ---- spec fields --------------------------------------------------------------------------------


def spec_field_schema(spec_field: SpecField, bounds: tuple[float, float] | None = None) -> dict:
    """The schema of one declared field; `bounds` narrows a number's range (the settings do, for
    startup_timeout_seconds: README.md "Spec limits")."""
    f = spec_field
    schema: dict[str, Any] = {"title": f.label}
    if f.help:
        schema["description"] = f.help
    if f.kind == TEXT:
        schema.update(type="string", maxLength=f.max_length, pattern=MULTI_LINE if f.multiline else SINGLE_LINE)
    elif f.kind == CHOICE:
        schema.update(type="string", enum=list(f.choices))
    elif f.kind in (INT, FLOAT, REF):
        low, high = bounds or (f.low, f.high)
        schema["type"] = {INT: "integer", FLOAT: "number", REF: ["integer", "null"]}[f.kind]
        schema["exclusiveMinimum" if f.above_low else "minimum"] = low
        schema["maximum"] = high
    elif f.kind == BOOL:
        schema["type"] = "boolean"
    elif f.kind in (ENV, ROUTES):
        schema.update(array(ref("EnvVar" if f.kind == ENV else "Route")))
    elif f.kind == NAMES:
        schema.update(array({**NAME, "maxLength": f.max_length}), maxItems=int(f.high), uniqueItems=True)
    if f.name == "name":
        schema.update(NAME)
    else:
        schema["default"] = f.default
    schema["x-edit-class"] = f.edit
    return schema


def spec_properties(bounds: dict[str, tuple[float, float]] | None = None) -> dict[str, dict]:
    return {f.name: spec_field_schema(f, (bounds or {}).get(f.name)) for f in SPEC}


def _edit_classes_text() -> str:
    return ("Each field's `x-edit-class` says how it may change once the endpoint exists: "
            "`live` (saved and followed within seconds), `restart` (needs the running instances "
            "restarted: PATCH with ?restart=true), `immutable` (fixed at creation).")


# ---- the answers --------------------------------------------------------------------------------


def _instance() -> dict:
    count = {"type": ["integer", "null"], "minimum": 1}
    return obj({
        "id": {"type": "string", "description": "Short id, e.g. xykemlvy."},
        "status": {"type": "string", "enum": list(INSTANCE_STATES)},
        "revision": {"type": "integer", "minimum": 0, "description": "The revision it runs (0: none)."},
        "host": {"type": "string"}, "address": {"type": "string", "description": "host:port it is reached at."},
        "gpus": array({"type": "integer"}), "gpu_type": {"type": "string"},
        "created_at": TIMESTAMP, "started_at": TIMESTAMP, "ready_at": TIMESTAMP, "stopped_at": TIMESTAMP,
        "gpu_seconds": {"type": "number", "minimum": 0, "description": "Billed: GPU count x (stopped - ready)."},
        "price_per_hour": {"type": ["number", "null"], "minimum": 0,
                           "description": "Its price per hour, fixed when it became ready; null: never ready."},
        "billed_seconds": {"type": "number", "minimum": 0,
                           "description": "Ready -> stopped (now while it runs); queued and starting time is never "
                                          "billed."},
        "cost": {"type": "number", "minimum": 0, "description": "price_per_hour x billed_seconds / 3600."},
        "queue_position": {**count, "description": "Place in the GPU queue while queued."},
        "reason": {"type": "string", "description": "What the readiness probe last saw, or why it failed."},
    })


def _endpoint_state() -> dict[str, dict]:
    return {
        "project": {**NAME, "description": "The project it belongs to (README.md \"Accounts and projects\")."},
        "status": {"type": "string", "enum": list(ENDPOINT_STATES)},
        "status_reason": {"type": "string"},
        "queue_position": {"type": ["integer", "null"], "minimum": 1},
        "url": {"type": "string", "format": "uri", "description": "Where the proxy serves it."},
        "created_at": TIMESTAMP, "spec_updated_at": TIMESTAMP, "stopped_at": TIMESTAMP,
        "purge_at": {**TIMESTAMP, "description": "When a stopped endpoint is purged."},
        "workflow_id": {"type": "string", "description": "endpoint-<name>, for the Temporal CLI."},
        "has_api_keys": {"type": "boolean"},
        "usage": obj({
            "gpu_seconds": {"type": "number", "minimum": 0},
            "billed_seconds": {"type": "number", "minimum": 0, "description": "Ready -> stopped of every instance."},
            "cost": {"type": "number", "minimum": 0, "description": "Running total of its instances' cost."},
            "cost_this_month": {"type": "number", "minimum": 0, "description": "The part billed this month (UTC)."},
            "currency": {"type": "string"},
            "running": {"type": "boolean", "description": "An instance is billed now: the cost grows."},
        }, description="What it cost (README.md \"Cost\"): billed from ready to stopped, never queued or starting."),
        "revision": {"type": "integer", "minimum": 0, "description": "Its newest revision."},
        "traffic": TRAFFIC,
        "instances": array(ref("Instance")),
    }


def _update_outcome() -> dict[str, dict]:
    change = obj({"field": {"type": "string", "enum": [f.name for f in SPEC]},
                  "edit": {"type": "string", "enum": list(EDIT_CLASSES)}, "from": {}, "to": {}})
    return {
        "changes": {**array(change), "description": "What changed (secret values masked)."},
        "restart_required": {**array({"type": "string"}),
                             "description": "Restart-class fields not saved: send again with ?restart=true."},
        "saved": {"type": "boolean"}, "restarted": {"type": "boolean"},
        "revision": {"type": ["integer", "null"], "description": "The revision a change to what runs made."},
        "rollout": {"type": ["integer", "null"], "description": "The update rolling that revision out."},
        "strategy": {"anyOf": [{"type": "string", "enum": list(STRATEGIES)}, {"type": "null"}]},
        "warning": {"type": "string", "description": "Saved, but the endpoint's workflow was not told."},
    }


def _error() -> dict:
    return obj({
        "error": {"type": "string", "minLength": 1, "description": "What went wrong and what to do."},
        "errors": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "Field or parameter -> what to change."},
        "code": {"type": "integer", "description": "1007: at max instances (as the proxy's route rules say)."},
        "msg": {"type": "string"},
        "endpoint": {**ref("Endpoint"), "description": "The endpoint as saved, when it was saved nevertheless."},
        "quota": {**ref("EndpointQuota"), "description": "A create past the project's endpoint quota: the counts."},
        **_update_outcome(),
    }, required=("error", "errors"), description="Every error under /api/ (README.md \"JSON API\").")


def _route() -> dict:
    param = obj({
        "name": {"type": "string", "minLength": 1, "description": "A Python identifier."},
        "type": {"type": "string", "enum": list(PARAM_TYPES)},
        "required": {"type": "boolean"}, "default": {}, "ge": {"type": "number"}, "le": {"type": "number"},
        "choices": {**array({}), "minItems": 1}, "regex": {"type": "string", "description": "RE2, whole value."},
        "min_length": {"type": "integer", "minimum": 0}, "max_length": {"type": "integer", "minimum": 0},
        "description": {"type": "string"},
    }, required=("name", "type"))
    return obj({
        "method": {"type": "string", "enum": list(METHODS), "default": "POST"},
        "path": {"type": "string", "pattern": "^/"}, "file": {"type": "string", "minLength": 1},
        "function": {"type": "string", "minLength": 1, "description": "A function of the file: a Python identifier."},
        "call": {"type": "string", "enum": list(CALL_STYLES), "default": "keyword"},
        "params": array(param),
    }, required=("path", "file", "function"), description="HTTP verb + path -> file + function (README.md "
                                                           "\"Model code as an endpoint\").")


def _hosts() -> dict[str, dict]:
    gpu = obj({"type": {"type": "string"}, "index": {"type": "integer", "minimum": 0},
               "memory_mb": {"type": ["integer", "null"], "description": "From nvidia-smi; null when declared."},
               "instance": {"type": ["string", "null"], "description": "The instance using it."}})
    count = {"type": "integer", "minimum": 0}
    host = obj({
        "name": {"type": "string"}, "pool": {"type": "string"},
        "state": {"type": "string", "enum": [HOST_UP, HOST_DRAINING, HOST_DOWN]}, "state_reason": {"type": "string"},
        "address": {"type": "string", "description": "The address its instances are reached at."},
        "backend": {"type": "string", "enum": ["process", "docker"]},
        "network_namespaces": {"type": ["string", "null"],
                               "description": "How fixed-port commands are isolated (null: not available)."},
        "gpus": array(gpu),
        "gpu_summary": {"type": "object", "additionalProperties": obj({"total": count, "used": count, "free": count}),
                        "description": "GPU type -> total, used, free."},
        "cpu_cores": {"type": "number"}, "memory_gb": {"type": "number"}, "disk_gb": {"type": "number"},
        "instances": array(obj({"id": {"type": "string"}, "endpoint": NAME,
                                "status": {"type": "string", "enum": list(INSTANCE_STATES)},
                                "gpus": array({"type": "integer"})})),
        "started_at": TIMESTAMP, "last_heartbeat_at": TIMESTAMP,
        "seconds_since_heartbeat": {"type": ["number", "null"]},
    }, description="A machine running a Standby worker (README.md \"Many GPU hosts\").")
    return {
        "Host": host, "HostList": obj({"hosts": array(ref("Host"))}),
        "HostOperation": obj({"host": {"type": "string"}, "operation": {"type": "string", "enum": ["drain", "undrain"]},
                              "message": {"type": "string"}}),
    }


def _revisions() -> dict[str, dict]:
    change = obj({"field": {"type": "string", "enum": list(REVISION_FIELDS)}, "from": {}, "to": {}})
    revision = obj({
        "number": {"type": "integer", "minimum": 1},
        "state": {"type": "string", "enum": list(REVISION_STATES)},
        "state_reason": {"type": "string", "description": "Why it failed or was retired."},
        "traffic": {"type": "integer", "minimum": 0, "maximum": 100, "description": "Its share, in percent."},
        "strategy": {"type": "string", "description": "How it was rolled out (empty: not yet)."},
        "reason": {"type": "string", "description": "Why it was made."},
        "created_at": TIMESTAMP,
        "source": obj({"commit": {"type": "string", "description": "The git commit its ref was resolved to."},
                       "snapshot": {"type": "boolean", "description": "Its source directory was copied."},
                       "pinned_at": TIMESTAMP}),
        "live_instances": {"type": "integer", "minimum": 0},
        "spec": {"type": "object", "description": "What runs: the restart-class fields (secret values null)."},
        "changes": {**array(change), "description": "What differs from the revision before."},
    }, description="An immutable snapshot of what runs (README.md \"Revisions and updates\").")
    return {
        "Revision": revision,
        "RevisionList": obj({"revisions": array(ref("Revision")), "traffic": TRAFFIC}),
        "TrafficSplit": obj({"traffic": TRAFFIC}, example={"traffic": {"1": 90, "2": 10}}),
        "Deployed": obj({"revision": {"type": "integer", "minimum": 1}, "rollout": {"type": ["integer", "null"]},
                         "strategy": {"type": "string", "enum": list(STRATEGIES)}}),
        "RolledBack": obj({"revision": {"type": ["integer", "null"]}, "rollout": {"type": ["integer", "null"]},
                           "message": {"type": "string"}}),
        "Promoted": obj({"rollout": {"type": ["integer", "null"]}, "message": {"type": "string"}}),
        "RollbackRequest": obj({"reason": {"type": "string", "maxLength": 500}}, required=(), additional=True),
        "ScaleRequest": obj({"instance_count": {"type": "integer", "minimum": 0, "maximum": 100}},
                            example={"instance_count": 2}),
    }


def _applied() -> dict:
    return obj({
        "action": {"type": "string", "enum": ["created", "updated", "unchanged", "refused"]},
        "dry_run": {"type": "boolean"},
        "endpoint": {"anyOf": [ref("Endpoint"), {"type": "null"}],
                     "description": "The endpoint after the apply (before, on a dry run); null before it exists."},
        **_update_outcome(),
        "error": {"type": "string"}, "errors": {"type": "object", "additionalProperties": {"type": "string"}},
        "code": {"type": "integer"}, "quota": ref("EndpointQuota"),
    }, required=("action", "dry_run", "endpoint", "changes", "restart_required", "saved", "restarted"),
        description="What /apply did (README.md \"Spec files\"); a refusal also carries `error` and `errors`.")


def _registry() -> dict[str, dict]:
    version = obj({
        "model": NAME, "number": {"type": "integer", "minimum": 1}, "id": {"type": "integer", "minimum": 1},
        "kind": {"type": "string", "enum": ["archive", "git"]}, "created_at": TIMESTAMP,
        "archive_size": {"type": "integer", "minimum": 0}, "archive_sha256": {"type": "string"},
        "archive_path": {"type": "string"}, "git_url": {"type": "string"}, "git_ref": {"type": "string"},
        "resolved_commit": {"type": "string", "description": "Recorded when an instance first clones it."},
    }, required=("model", "number", "id", "kind", "created_at"),
        description="An immutable version: an uploaded archive, or a git URL + ref.")
    model = obj({"name": NAME, "description": {"type": "string"}, "project": NAME, "created_at": TIMESTAMP,
                 "latest_version": {"type": ["integer", "null"]}, "versions": array(ref("ModelVersion"))})
    return {
        "Model": model, "ModelVersion": version, "ModelList": obj({"models": array(ref("Model"))}),
        "NewModel": obj({"name": NAME, "description": {"type": "string", "maxLength": 2000}},
                        required=("name",), additional=True, example={"name": "arith", "description": "adds"}),
        "GitVersion": obj({"git_url": {"type": "string", "minLength": 1}, "git_ref": {"type": "string", "minLength": 1}},
                          additional=True, example={"git_url": "https://github.com/you/model.git", "git_ref": "main"}),
        "ArchiveUpload": obj({"archive": {"type": "string", "contentMediaType": "application/octet-stream",
                                          "description": "A .tar.gz, .tgz or .zip of the model code."}}),
    }


def _metrics() -> dict:
    number = {"type": ["number", "null"]}
    series = array(number)
    usage = obj({name: series for name in ("cpu", "memory", "gpu", "gpu_memory")})
    return obj({
        "range": {"type": "string"}, "step_seconds": {"type": "integer", "minimum": 1},
        "ranges": array({"type": "string"}),
        "t": {**array({"type": "integer"}), "description": "Each point's start, unix seconds."},
        "requests": array({"type": "integer", "minimum": 0}),
        "requests_per_second": array({"type": "number", "minimum": 0}),
        "error_rate_percent": {**series, "description": "5xx answers, % of requests; null without requests."},
        "latency_ms": obj({"p50": series, "p95": series, "p99": series}),
        "queue_wait_ms": obj({"p95": series}),
        "cold_start_requests": array({"type": "integer", "minimum": 0}),
        "instances": {**array({"type": "integer", "minimum": 0}), "description": "Instances serving in each point."},
        "cold_starts": array(obj({"at": {"type": "number"}, "instance_id": {"type": "string"},
                                  "seconds": number})),
        "usage": {"type": "object", "additionalProperties": usage,
                  "description": "Instance id -> CPU, memory, GPU and GPU memory %, one per point."},
    }, description="The endpoint page's charts (README.md \"Metrics\").")


def schemas(request_bounds: dict[str, tuple[float, float]]) -> dict[str, dict]:
    """Every schema of the document; `request_bounds` narrows request fields (see spec_field_schema)."""
    key = {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 64}, "prefix": {"type": "string"},
           "created_at": TIMESTAMP}
    endpoint = obj({**spec_properties(), **_endpoint_state()},
                   description="An endpoint: its spec (secret env values are null), status, URL and instances.")
    return {
        "EndpointSpec": obj(spec_properties(request_bounds), required=("name",),
                            description="A new endpoint's spec; fields left out take their default. "
                                        + _edit_classes_text(),
                            example={"name": "echo", "start_command": "python3 -m http.server $PORT",
                                     "idle_retention_seconds": 120}),
        "EndpointSpecChange": obj(spec_properties(request_bounds), required=(),
                                  description="The spec fields to change; `name` may only repeat the endpoint's. "
                                              + _edit_classes_text(), example={"max_instances": 2}),
        "EnvVar": obj({"key": {"type": "string", "pattern": ENV_KEY_RE.pattern},
                       "value": {"type": ["string", "null"], "maxLength": ENV_VALUE_MAX,
                                 "description": "null for a secret: never shown in an answer; in a change, "
                                                "keeps the stored value."},
                       "secret": {"type": "boolean", "default": False}}, required=("key",)),
        "Route": _route(),
        "Endpoint": endpoint,
        "EndpointPage": obj({"endpoints": array(ref("Endpoint")),
                             "next": {"type": ["string", "null"],
                                      "description": "Pass as ?cursor= for the next page; null on the last page."}}),
        "EndpointUpdated": obj({**endpoint["properties"], **_update_outcome()},
                               required=tuple(endpoint["required"]) + ("changes", "restart_required", "saved",
                                                                        "restarted")),
        "Instance": _instance(),
        "InstanceList": obj({"instances": array(ref("Instance"))}),
        "Event": obj({"at": TIMESTAMP, "kind": {"type": "string"}, "instance_id": {"type": ["string", "null"]},
                      "message": {"type": "string"}}),
        "EventList": obj({"events": array(ref("Event"))}),
        "EndpointMetrics": _metrics(),
        "LogLines": obj({"lines": array(obj({"instance_id": {"type": "string"}, "line": {"type": "string"}}))}),
        "ActionAccepted": obj({"action": {"type": "string", "enum": list(ACTIONS)}, "accepted": {"const": True},
                               "request_id": {"type": "string"}}),
        "InstanceReady": obj({"instance_id": {"type": ["string", "null"]}, "address": {"type": ["string", "null"]},
                              "cold_start": {"type": ["boolean", "null"]}}, required=("instance_id", "address"),
                             description="scale-out, and wake with ?wait=true: the instance that is ready."),
        "WorkflowStatus": obj({"workflow_id": {"type": "string"},
                               "state": {"type": "object", "description": "The workflow's `status` query."}}),
        "ApiKey": obj(key),
        "NewApiKey": obj({**key, "key": {"type": "string", "description": "Shown in this answer only."}}),
        "ApiKeyList": obj({"keys": array(ref("ApiKey"))}),
        "ApiKeyRequest": obj({"name": {"type": ["string", "null"], "maxLength": 64}}, required=(), additional=True,
                             example={"name": "ci"}),
        "Revoked": obj({"revoked": {"type": "integer"}}),
        "Error": _error(),
        "Applied": _applied(),
        **_hosts(),
        **_registry(),
        **_revisions(),
    }
