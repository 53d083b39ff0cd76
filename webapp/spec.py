"""The one validation of an endpoint spec, shared by the create/edit forms and the JSON API.

`validate_spec` takes loosely typed input (JSON values from the API, strings from a form)
and returns `(clean, errors)`: `clean` holds every spec field with its proper type, ready
to be written to an `Endpoint`; `errors` maps a field name (DESIGN.md "Spec fields") to a
message that says what to change. Nothing here touches Temporal; the database is only read
(name uniqueness) and only when a session is given.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, NamedTuple

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


class Limit(NamedTuple):
    low: float
    high: float
    why: str  # said in the error message when the value is too large
    above_low: bool = False  # low itself is excluded ("more than 0")


DAY = 24 * 3600
# The range of every numeric spec field, in one place: what the lifecycle can schedule (its
# timers are Temporal durations; 30 days of idle retention is longer than anyone keeps a GPU
# idle), what one host can hold, and what fits a 32-bit database column. README.md ("Spec
# limits") lists the same table. startup_timeout_seconds is narrowed further by the settings
# STANDBY_MIN/MAX_STARTUP_TIMEOUT_SECONDS.
NUMERIC_LIMITS: dict[str, Limit] = {
    "port": Limit(1, 65535, "a TCP port"),
    "gpu_count": Limit(0, MAX_GPUS, "GPUs per instance"),
    "cpu_cores": Limit(0, 1024, "cores of one host", above_low=True),
    "memory_gb": Limit(0, 4096, "4 TB, memory of one host", above_low=True),
    "disk_gb": Limit(1, 65536, "64 TB"),
    "min_instances": Limit(0, 100, "instances per endpoint"),
    "max_instances": Limit(1, 100, "instances per endpoint"),
    "idle_retention_seconds": Limit(1, 30 * DAY, "30 days"),
    "startup_timeout_seconds": Limit(1, DAY, "1 day; the settings narrow it further"),
    "health_interval_seconds": Limit(1, DAY, "1 day"),
    "max_concurrency": Limit(0, 100_000, "requests in flight per instance; 0 means unlimited"),
    "hold_queue_size": Limit(1, 100_000, "requests held during a cold start"),
    "model_version_id": Limit(1, 2**31 - 1, "the range of an id"),
}
# The longest text of each string field (the database column's size where it has one). Single-line
# fields refuse control characters; none may hold NUL, which PostgreSQL text and process
# environments cannot carry.
TEXT_LIMITS: dict[str, tuple[int, bool]] = {  # field: (max characters, may span lines)
    "description": (2000, True),
    "start_command": (8192, True),
    "image": (255, False),
    "source_dir": (4096, False),
    "gpu_type": (64, False),
    "health_path": (255, False),
    "git_url": (2048, False),
    "git_ref": (255, False),
}
ENV_VALUE_MAX = 32768
# Digits of a whole number we read at all: more than any limit above needs, far fewer than the
# thousands Python refuses to convert.
_MAX_DIGITS = 20


class _Invalid(Exception):
    pass


def _shown(value: Any) -> str:
    """A value in a message: short, and never a walk through a deeply nested one."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'list' if isinstance(value, list) else 'object'}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise _Invalid(f"must be {what}, not true/false")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and len(value) <= _MAX_DIGITS + 8 and re.fullmatch(r"\s*-?\d{1,20}\s*", value):
        return int(value)
    raise _Invalid(f"must be {what}, got {_shown(value)}")


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise _Invalid(f"must be {what}, not true/false")
    if isinstance(value, int):  # exact JSON integers; past float range they are simply too large
        return float(value) if abs(value) < 10**_MAX_DIGITS else (math.inf if value > 0 else -math.inf)
    number = None
    if isinstance(value, float):
        number = value
    elif isinstance(value, str) and len(value) <= 64:
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise _Invalid(f"must be {what}, got {_shown(value)}")
    if not math.isfinite(number):
        raise _Invalid(f"must be a finite number (not NaN or Infinity), got {_shown(value)}")
    return number


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "on", "yes", "1", "y"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "off", "no", "0", "n", ""):
        return False
    raise _Invalid(f"must be true or false, got {_shown(value)}")


def _as_str(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid(f"must be text, got {type(value).__name__}")
    return value.strip()


def _text(field: str, then: Callable[[str], Any] | None = None) -> Callable[[Any], Any]:
    """A string field within TEXT_LIMITS; `then` checks its content further."""
    longest, multiline = TEXT_LIMITS[field]

    def check(value: Any) -> Any:
        text = _as_str(value)
        if len(text) > longest:
            raise _Invalid(f"must be at most {longest} characters, got {len(text)}")
        allowed = "\t\r\n" if multiline else ""
        if any((ord(ch) < 32 and ch not in allowed) or ord(ch) == 127 for ch in text):
            raise _Invalid("must not contain control characters" + ("" if multiline else " or line breaks"))
        return then(text) if then else text

    return check


def _number(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:g}"
    return str(int(value)) if abs(value) < 10**16 else f"{float(value):g}"


def _in_range(field: str, number: float) -> None:
    limit = NUMERIC_LIMITS[field]
    if limit.above_low and not number > limit.low:
        raise _Invalid(f"must be greater than {_number(limit.low)} and at most {_number(limit.high)}, "
                       f"got {_number(number)}")
    low, high = _number(limit.low), _number(limit.high)
    if number < limit.low:
        raise _Invalid(f"must be between {low} and {high}: at least {low}, got {_number(number)}")
    if number > limit.high:
        raise _Invalid(f"must be between {low} and {high}: at most {high} ({limit.why}), got {_number(number)}")


def _bounded_int(field: str, what: str = "a whole number") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        number = _as_int(value, what)
        _in_range(field, number)
        return number

    return check


def _bounded_float(field: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = _as_float(value, "a number")
        _in_range(field, number)
        return number

    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _as_str(value)
        if text not in options:
            raise _Invalid(f"must be one of {', '.join(options)}; got {_shown(text)}")
        return text

    return check


def _health_path(text: str) -> str:
    if text and (not text.startswith("/") or any(c.isspace() for c in text)):
        raise _Invalid(f"must be empty (any HTTP answer below 500 on the port means ready) or a path "
                       f"starting with '/' and without spaces that answers 200 when ready, e.g. /health; "
                       f"got {_shown(text)}")
    return text


def _source_dir(text: str) -> str:
    if text and not os.path.isdir(text):
        raise _Invalid(f"{text!r} is not a directory on this host; give an existing directory or leave it empty")
    return os.path.abspath(text) if text else ""


def _model_version_id(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return _bounded_int("model_version_id", "an id")(value)


def _list(value: Any) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"must be a list, got {type(value).__name__}")
    return value


def _routes(value: Any) -> list:
    from common.strict_json import has_non_finite

    routes = _list(value)
    if has_non_finite(routes):
        raise _Invalid("hold NaN or Infinity; use finite numbers (or leave the bound out)")
    return routes


FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "description": _text("description"),
    "environment": _choice(ENVIRONMENTS),
    "source_kind": _choice(SOURCE_KINDS),
    "start_command": _text("start_command"),
    "image": _text("image"),
    "port": _bounded_int("port", "a port number"),
    "source_dir": _text("source_dir", _source_dir),
    "gpu_type": _text("gpu_type"),
    "gpu_count": _bounded_int("gpu_count"),
    "cpu_cores": _bounded_float("cpu_cores"),
    "memory_gb": _bounded_float("memory_gb"),
    "disk_gb": _bounded_int("disk_gb"),
    "min_instances": _bounded_int("min_instances"),
    "max_instances": _bounded_int("max_instances"),
    "idle_retention_seconds": _bounded_int("idle_retention_seconds", "a whole number of seconds"),
    # Also checked in _cross_checks against the bounds from settings.
    "startup_timeout_seconds": _bounded_int("startup_timeout_seconds", "a whole number of seconds"),
    "health_path": _text("health_path", _health_path),
    "health_interval_seconds": _bounded_int("health_interval_seconds", "a whole number of seconds"),
    "max_concurrency": _bounded_int("max_concurrency"),
    "balancing": _choice(BALANCING),
    "sticky_sessions": _as_bool,
    "hold_queue_size": _bounded_int("hold_queue_size"),
    "git_url": _text("git_url"),
    "git_ref": _text("git_ref"),
    "model_version_id": _model_version_id,
    "routes": _routes,
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
        if "\x00" in raw or len(raw) > ENV_VALUE_MAX:
            raise _Invalid(f"{key}: value must be at most {ENV_VALUE_MAX} characters, without NUL")
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


def _validate_routes_source(clean: dict, errors: dict, settings: Settings, session=None) -> None:
    """A routes source: a model version or a git URL + ref (checked by common/git_source.py, as
    the registry does), and valid route templates (stored normalized, so the API and the form
    keep the same thing)."""
    from common.git_source import git_ref_error, git_url_error
    from common.routes import normalize_routes, validate_routes

    version_id = clean.get("model_version_id")
    if clean.get("git_url") or not version_id:
        if problem := git_url_error(clean.get("git_url", ""), settings.allow_file_git):
            either = "" if clean.get("git_url") else " (or choose a registered model version)"
            errors.setdefault("git_url", f"git_url: {problem}{either}")
        if problem := git_ref_error(clean.get("git_ref", "")):
            errors.setdefault("git_ref", f"git_ref: {problem}")
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

    version_id = clean.get("model_version_id")
    if version_id and session is not None:
        from common.models import ModelVersion

        if session.get(ModelVersion, version_id) is None:
            errors.setdefault("model_version_id", f"model version {version_id} does not exist; "
                                                  "register one under /api/v1/models first")
    if clean.get("source_kind") == "server":
        if "start_command" in clean and not clean["start_command"] and not clean.get("image"):
            errors["start_command"] = ("start_command is required: the shell command that starts your server, "
                                       "e.g. python -m http.server 8080 (with port 8080)")
        elif clean.get("start_command") and settings.backend == "process":
            from workers.ports import fixed_port_refusal, namespace_mode, uses_port_placeholder

            if not uses_port_placeholder(clean["start_command"]) and namespace_mode() is None:
                errors["start_command"] = "start_command: " + fixed_port_refusal(clean.get("port") or 8080)
    elif clean.get("source_kind") == "routes":
        _validate_routes_source(clean, errors, settings, session)

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
