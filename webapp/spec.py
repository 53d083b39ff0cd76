"""The one validation of an endpoint spec, shared by the create/edit forms and the JSON API.

`validate_spec` takes loosely typed input (JSON values from the API, strings from a form)
and returns `(clean, errors)`: `clean` holds every spec field with its proper type, ready
to be written to an `Endpoint`; `errors` maps a field name (DESIGN.md "Spec fields") to a
message that says what to change. Nothing here touches Temporal; the database is only read
(name uniqueness) and only when a session is given.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

from common.config import Settings, load_settings
from common.models import TERMINATED, Endpoint

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENVIRONMENTS = ("development", "staging", "production")
BALANCING = ("round_robin", "least_connections", "ip_hash", "random")
SOURCE_KINDS = ("server", "routes")
# Set by the backend for every instance; a user value would break port allocation / GPU pinning.
RESERVED_ENV_KEYS = {"PORT", "CUDA_VISIBLE_DEVICES"}
MAX_GPUS = 4

DEFAULTS: dict[str, Any] = {
    "description": "",
    "environment": "development",
    "source_kind": "server",
    "start_command": "",
    "image": "",
    "port": 8080,
    "source_dir": "",
    "env": [],
    "gpu_type": "",
    "gpu_count": 0,
    "cpu_cores": 1.0,
    "memory_gb": 1.0,
    "disk_gb": 10,
    "min_instances": 0,
    "max_instances": 1,
    "idle_retention_seconds": 600,
    "startup_timeout_seconds": 1200,
    # Empty: ready when the port answers HTTP below 500 (README "Readiness"); set: 200 there.
    "health_path": "",
    "health_interval_seconds": 10,
    "max_concurrency": 0,
    "balancing": "round_robin",
    "sticky_sessions": False,
    "hold_queue_size": 100,
    # Routes source (issue 4); carried through untouched unless source_kind is "routes".
    "git_url": "",
    "git_ref": "",
    "model_version_id": None,
    "routes": [],
}
SPEC_FIELDS = ("name",) + tuple(DEFAULTS)
IMMUTABLE_FIELDS = ("name", "disk_gb")


class _Invalid(Exception):
    pass


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise _Invalid(f"must be {what}, not true/false")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise _Invalid(f"must be {what}, got {value!r}")


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise _Invalid(f"must be {what}, not true/false")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _Invalid(f"must be {what}, got {value!r}")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "on", "yes", "1", "y"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "off", "no", "0", "n", ""):
        return False
    raise _Invalid(f"must be true or false, got {value!r}")


def _as_str(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid(f"must be text, got {type(value).__name__}")
    return value.strip()


def _int_at_least(low: int, what: str = "a whole number") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        number = _as_int(value, what)
        if number < low:
            raise _Invalid(f"must be at least {low}, got {number}")
        return number

    return check


def _positive_float(value: Any) -> float:
    number = _as_float(value, "a number")
    if not number > 0:
        raise _Invalid(f"must be greater than 0, got {number:g}")
    return number


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _as_str(value)
        if text not in options:
            raise _Invalid(f"must be one of {', '.join(options)}; got {text!r}")
        return text

    return check


def _port(value: Any) -> int:
    number = _as_int(value, "a port number")
    if not 1 <= number <= 65535:
        raise _Invalid(f"must be between 1 and 65535, got {number}")
    return number


def _gpu_count(value: Any) -> int:
    number = _as_int(value, "a whole number")
    if not 0 <= number <= MAX_GPUS:
        raise _Invalid(f"must be between 0 and {MAX_GPUS}, got {number}")
    return number


def _health_path(value: Any) -> str:
    text = _as_str(value)
    if text and (not text.startswith("/") or any(c.isspace() for c in text)):
        raise _Invalid(f"must be empty (any HTTP answer below 500 on the port means ready) or a path "
                       f"starting with '/' and without spaces that answers 200 when ready, e.g. /health; "
                       f"got {text!r}")
    return text


def _source_dir(value: Any) -> str:
    text = _as_str(value)
    if text and not os.path.isdir(text):
        raise _Invalid(f"{text!r} is not a directory on this host; give an existing directory or leave it empty")
    return os.path.abspath(text) if text else ""


def _description(value: Any) -> str:
    text = _as_str(value)
    if len(text) > 2000:
        raise _Invalid(f"must be at most 2000 characters, got {len(text)}")
    return text


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else _as_int(value, "an id")


def _list(value: Any) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"must be a list, got {type(value).__name__}")
    return value


FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "description": _description,
    "environment": _choice(ENVIRONMENTS),
    "source_kind": _choice(SOURCE_KINDS),
    "start_command": _as_str,
    "image": _as_str,
    "port": _port,
    "source_dir": _source_dir,
    "gpu_type": _as_str,
    "gpu_count": _gpu_count,
    "cpu_cores": _positive_float,
    "memory_gb": _positive_float,
    "disk_gb": _int_at_least(1),
    "min_instances": _int_at_least(0),
    "max_instances": _int_at_least(1),
    "idle_retention_seconds": _int_at_least(1, "a whole number of seconds"),
    # Range checked in _cross_checks: the bounds come from settings.
    "startup_timeout_seconds": _int_at_least(1, "a whole number of seconds"),
    "health_path": _health_path,
    "health_interval_seconds": _int_at_least(1, "a whole number of seconds"),
    "max_concurrency": _int_at_least(0),
    "balancing": _choice(BALANCING),
    "sticky_sessions": _as_bool,
    "hold_queue_size": _int_at_least(1),
    "git_url": _as_str,
    "git_ref": _as_str,
    "model_version_id": _optional_int,
    "routes": _list,
}


def spec_of(endpoint: Endpoint) -> dict[str, Any]:
    """The stored spec of an endpoint as a dict of spec fields (secret values included)."""
    return {name: getattr(endpoint, name) for name in SPEC_FIELDS}


def _clean_env(value: Any, previous: list[dict]) -> list[dict]:
    """Validate env entries; a secret entry without a value keeps the previously stored one."""
    items = _list(value)
    stored = {item["key"]: item.get("value", "") for item in previous or [] if item.get("secret")}
    clean, seen = [], set()
    for position, item in enumerate(items, start=1):
        where = f"variable {position}"
        if not isinstance(item, dict):
            raise _Invalid(f"{where} must be an object with key, value and secret")
        unknown = set(item) - {"key", "value", "secret"}
        if unknown:
            raise _Invalid(f"{where} has unknown fields {', '.join(sorted(unknown))}; use key, value, secret")
        key = _as_str(item.get("key"))
        if not ENV_KEY_RE.match(key):
            raise _Invalid(f"{where}: key {key!r} must be letters, digits and _ and not start with a digit")
        if key in RESERVED_ENV_KEYS:
            raise _Invalid(f"{where}: {key} is set by Standby for every instance; remove it")
        if key in seen:
            raise _Invalid(f"{key} is given twice; keep one")
        seen.add(key)
        try:
            secret = _as_bool(item.get("secret", False))
        except _Invalid as exc:
            raise _Invalid(f"{key}: secret {exc}") from None
        raw = item.get("value")
        if raw is None and secret:
            if key not in stored:
                raise _Invalid(f"{key}: a new secret needs a value")
            raw = stored[key]
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            raise _Invalid(f"{key}: value must be text, got {type(raw).__name__}")
        clean.append({"key": key, "value": raw, "secret": secret})
    return clean


def _check_name(value: Any, existing: Endpoint | None, session) -> str:
    name = _as_str(value)
    if existing is not None:
        if name and name != existing.name:
            raise _Invalid("cannot be changed after creation; create a new endpoint instead")
        return existing.name
    if not name:
        raise _Invalid("is required: a DNS-style name such as my-model")
    if len(name) > 63 or not NAME_RE.match(name):
        raise _Invalid(
            "must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        )
    if session is not None:
        from sqlalchemy import select

        other = session.scalar(select(Endpoint).where(Endpoint.name == name))
        if other is not None and other.status != TERMINATED:
            raise _Invalid(f"{name!r} is taken by another endpoint; choose another name")
    return name


def _validate_routes_source(clean: dict, errors: dict, session=None) -> None:
    """A routes source: a model version or a git URL, and valid route templates (stored
    normalized, so the API and the form keep the same thing)."""
    from common.models import ModelVersion
    from common.routes import normalize_routes, validate_routes

    version_id = clean.get("model_version_id")
    if not version_id and not clean.get("git_url"):
        errors.setdefault("routes", "a routes source needs a registered model version or a git URL")
    if version_id and session is not None and session.get(ModelVersion, version_id) is None:
        errors.setdefault("model_version_id", f"model version {version_id} does not exist; "
                                              "register one under /api/v1/models first")
    route_errors = validate_routes(clean.get("routes") or [])
    for field, message in route_errors.items():
        errors.setdefault(field, message)
    if not route_errors:
        clean["routes"] = normalize_routes(clean.get("routes") or [])


def validate_spec(
    data: dict,
    *,
    existing: Endpoint | None,
    inventory: Any = None,
    settings: Settings | None = None,
    session=None,
    previous_env: list[dict] | None = None,
) -> tuple[dict, dict[str, str]]:
    """Validate a whole spec (create) or a partial one over `existing` (update).

    `inventory` is the GPU inventory from `workers.gpus.load_inventory`; None skips the fit
    check. `session` enables the name-uniqueness check. `previous_env` supplies stored secret
    values when there is no `existing` row yet (a draft being re-edited).
    """
    settings = settings or load_settings()
    errors: dict[str, str] = {}
    if not isinstance(data, dict):
        return {}, {"spec": "must be a JSON object of spec fields"}
    unknown = sorted(set(data) - set(SPEC_FIELDS))
    if unknown:
        errors["unknown_fields"] = f"unknown fields: {', '.join(unknown)}; allowed: {', '.join(SPEC_FIELDS)}"

    base = spec_of(existing) if existing is not None else dict(DEFAULTS)
    merged = {**base, **{k: v for k, v in data.items() if k in SPEC_FIELDS}}
    clean: dict[str, Any] = {}

    try:
        clean["name"] = _check_name(data.get("name"), existing, session)
    except _Invalid as exc:
        errors["name"] = f"name {exc}"
    if existing is not None and "disk_gb" in data:
        try:
            if _as_int(data["disk_gb"], "a whole number") != existing.disk_gb:
                errors["disk_gb"] = "disk_gb cannot be changed after creation; create a new endpoint for another disk size"
        except _Invalid as exc:
            errors["disk_gb"] = f"disk_gb {exc}"

    for field, check in FIELD_CHECKS.items():
        if field in errors:
            continue
        value = merged.get(field)
        if value is None and DEFAULTS[field] is not None:
            value = DEFAULTS[field]
        try:
            clean[field] = check(value)
        except _Invalid as exc:
            errors[field] = f"{field} {exc}"
    try:
        env_source = previous_env if previous_env is not None else (existing.env if existing else [])
        clean["env"] = _clean_env(merged.get("env"), env_source)
    except _Invalid as exc:
        errors["env"] = f"env: {exc}"

    _cross_checks(clean, errors, settings, inventory, session)
    return (clean if not errors else {}), errors


def _cross_checks(clean: dict, errors: dict, settings: Settings, inventory: Any, session=None) -> None:
    low, high = settings.min_startup_timeout_seconds, settings.max_startup_timeout_seconds
    timeout = clean.get("startup_timeout_seconds")
    if timeout is not None and not low <= timeout <= high:
        errors["startup_timeout_seconds"] = (
            f"startup_timeout_seconds must be between {_minutes(low)} and {_minutes(high)} minutes "
            f"({low}-{high} seconds), got {timeout} seconds"
        )
    low_n, high_n = clean.get("min_instances"), clean.get("max_instances")
    if low_n is not None and high_n is not None and high_n < low_n:
        errors["max_instances"] = f"max_instances ({high_n}) must be at least min_instances ({low_n})"

    if clean.get("source_kind") == "server":
        if "start_command" in clean and not clean["start_command"] and not clean.get("image"):
            errors["start_command"] = ("start_command is required: the shell command that starts your server, "
                                       "e.g. python -m http.server 8080 (with port 8080)")
        elif clean.get("start_command") and settings.backend == "process":
            from workers.ports import fixed_port_refusal, namespace_mode, uses_port_placeholder

            if not uses_port_placeholder(clean["start_command"]) and namespace_mode() is None:
                errors["start_command"] = "start_command: " + fixed_port_refusal(clean.get("port") or 8080)
    elif clean.get("source_kind") == "routes":
        _validate_routes_source(clean, errors, session)

    gpu_count = clean.get("gpu_count")
    if clean.get("gpu_type") and gpu_count == 0:
        errors.setdefault("gpu_count", "gpu_count must be 1 or more when a gpu_type is chosen (or clear gpu_type)")
    if inventory is not None and gpu_count and "gpu_type" in clean:
        try:
            from workers.gpus import check_request_fits
        except ImportError:
            return
        problem = check_request_fits(inventory, clean["gpu_type"], gpu_count)
        if problem:
            errors["gpu_count"] = problem


def _minutes(seconds: int) -> str:
    return f"{seconds / 60:g}"
