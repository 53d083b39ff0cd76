"""The one validation of an endpoint spec, shared by the create/edit forms and the JSON API.

`validate_spec` takes loosely typed input (JSON values from the API, strings from a form)
and returns `(clean, errors)`: `clean` holds every spec field with its proper type, ready
to be written to an `Endpoint`; `errors` maps a field name (docs/architecture.md "The JSON API") to a
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
from common.secrets import box_for, is_sealed
from common.spec_fields import (  # noqa: F401 (DEFAULTS, SPEC_FIELDS: re-exported for the API)
    BOOL,
    BY_NAME,
    CHOICE,
    DEFAULTS,
    FLOAT,
    IMMUTABLE,
    INT,
    NAMES,
    REF,
    ROUTES,
    SPEC,
    SPEC_FIELDS,
    TEXT,
)

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the backend for every instance; a user value would break port allocation / GPU pinning.
RESERVED_ENV_KEYS = {"PORT", "CUDA_VISIBLE_DEVICES"}


class Limit(NamedTuple):
    low: float
    high: float
    why: str  # said in the error message when the value is too large
    above_low: bool = False  # low itself is excluded ("more than 0")


# The range of every numeric field and the longest of every text field, from the declarations
# (common/spec_fields.py): what the lifecycle can schedule (its timers are Temporal durations),
# what one host can hold, what fits the database column. README.md ("Spec limits") lists them.
# startup_timeout_seconds is narrowed further by STANDBY_MIN/MAX_STARTUP_TIMEOUT_SECONDS.
NUMERIC_LIMITS: dict[str, Limit] = {f.name: Limit(f.low, f.high, f.why, f.above_low)
                                    for f in SPEC if f.low is not None}
# Single-line fields refuse control characters; none may hold NUL, which PostgreSQL text and
# process environments cannot carry.
TEXT_LIMITS: dict[str, tuple[int, bool]] = {f.name: (f.max_length, f.multiline)
                                            for f in SPEC if f.kind == TEXT and f.name != "name"}
ENV_VALUE_MAX = 32768
# What only a routes source has besides its model version (which the form keeps for either kind).
ROUTES_SOURCE_FIELDS = ("git_url", "git_ref", "routes")
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


def _warm_windows(text: str) -> str:
    from workflows.warm_windows import parse

    try:
        parse(text)
    except ValueError as exc:
        raise _Invalid(f"{exc}") from None
    return text


# Checks of a field's content beyond its kind and limits.
_CONTENT: dict[str, Callable[[str], Any]] = {"health_path": _health_path, "source_dir": _source_dir,
                                             "warm_windows": _warm_windows}


def _names(f) -> Callable[[Any], list]:
    """A short list of names (pools): a JSON list, or the form's comma-separated text."""
    def check(value: Any) -> list:
        if isinstance(value, str):
            value = [part for part in (p.strip() for p in value.split(",")) if part]
        items = _list(value)
        if not items:
            return list(f.default)
        if len(items) > f.high:
            raise _Invalid(f"may name at most {int(f.high)}, got {len(items)}")
        names = []
        for item in items:
            name = _as_str(item)
            if not name or len(name) > f.max_length or not NAME_RE.match(name):
                raise _Invalid(f"must be names of lowercase letters, digits or '-' (e.g. default), got {_shown(item)}")
            if name in names:
                raise _Invalid(f"names {name!r} twice")
            names.append(name)
        return names

    return check


def _check_for(f) -> Callable[[Any], Any] | None:
    if f.kind == NAMES:
        return _names(f)
    if f.kind == TEXT:
        return _text(f.name, _CONTENT.get(f.name))
    if f.kind == CHOICE:
        return _choice(f.choices)
    if f.kind == INT:
        return _bounded_int(f.name, f.what or "a whole number")
    if f.kind == FLOAT:
        return _bounded_float(f.name)
    if f.kind == BOOL:
        return _as_bool
    if f.kind == REF:
        return _model_version_id
    if f.kind == ROUTES:
        return _routes
    return None  # env: checked with the stored secrets (_clean_env)


FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    f.name: check for f in SPEC if f.name != "name" and (check := _check_for(f)) is not None
}


def spec_of(endpoint: Endpoint) -> dict[str, Any]:
    """The stored spec of an endpoint as a dict of spec fields (secret values included)."""
    return {name: getattr(endpoint, name) for name in SPEC_FIELDS}


def _clean_env(value: Any, previous: list[dict], box=None) -> list[dict]:
    """Validate env entries; a secret entry without a value keeps the previously stored one. With
    `box` (common/secrets.py), secret values come out sealed: a value equal to the stored one
    keeps the stored seal (so sending the same spec again changes nothing), another is sealed."""
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
        if secret and box is not None and raw:
            kept = stored.get(key)
            if kept and (raw == kept or box.matches(kept, raw)):
                raw = kept if is_sealed(kept) else box.seal(kept)  # the same value (or its stored seal)
            else:
                raw = box.seal(raw)
        clean.append({"key": key, "value": raw, "secret": secret})
    return clean


def _check_name(value: Any, existing: Endpoint | None, session) -> str:
    name = _as_str(value)
    if existing is not None:
        if name and name != existing.name:
            raise _Invalid(f"cannot be changed after creation; {BY_NAME['name'].instead}")
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
    if version_id and (clean.get("git_url") or clean.get("git_ref")):
        errors.setdefault("git_url", "git_url: give either a model version or a git URL + ref, not both")
    elif clean.get("git_url") or not version_id:
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
    if existing is None and not data.get("pools"):
        clean["pools"] = [settings.pool]  # the installation's default pool (STANDBY_POOL)
    try:
        env_source = previous_env if previous_env is not None else (existing.env if existing else [])
        clean["env"] = _clean_env(merged.get("env"), env_source, box_for(settings) if settings is not None else None)
    except _Invalid as exc:
        errors["env"] = f"env: {exc}"

    if existing is not None:
        for f in SPEC:
            if f.edit == IMMUTABLE and f.name in data and f.name not in errors and f.name in clean \
                    and clean[f.name] != getattr(existing, f.name):
                errors[f.name] = immutable_message(f.name)
    _cross_checks(clean, errors, settings, inventory, session)
    return (clean if not errors else {}), errors


def immutable_message(name: str) -> str:
    return f"{name} cannot be changed after creation; {BY_NAME[name].instead}"


def changes(existing: Endpoint | None, clean: dict, defaults: dict | None = None) -> list[dict]:
    """What a valid update would change, field by field, with each change's edit class. For a new
    endpoint (`existing` None): the fields it sets to other than their default (`defaults`
    overrides the declared ones: the installation's pool), from nothing."""
    defaults = {**DEFAULTS, **(defaults or {})}
    out = []
    for f in SPEC:
        before = getattr(existing, f.name) if existing is not None else defaults.get(f.name, f.default)
        if f.name in clean and clean[f.name] != before:
            out.append({"field": f.name, "edit": f.edit,
                        "from": _public(f.name, before) if existing is not None else None,
                        "to": _public(f.name, clean[f.name])})
    return out


def _public(name: str, value: Any) -> Any:
    """A value as shown in a diff: secret environment values masked."""
    if name == "env":
        return [{"key": i["key"], "value": None if i.get("secret") else i.get("value", ""),
                 "secret": bool(i.get("secret"))} for i in value or []]
    return value


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
    wanted = clean.get("instance_count")
    if wanted and low_n is not None and high_n is not None and "max_instances" not in errors \
            and not low_n <= wanted <= high_n:
        errors["instance_count"] = (f"instance_count ({wanted}) must be between min_instances ({low_n}) and max_instances "
                               f"({high_n}), or 0 for automatic scaling")

    _check_autoscaling(clean, errors)

    version_id = clean.get("model_version_id")
    if version_id and session is not None:
        from common.models import ModelVersion

        if session.get(ModelVersion, version_id) is None:
            errors.setdefault("model_version_id", f"model version {version_id} does not exist; "
                                                  "register one under /api/v1/models first")
    if clean.get("source_kind") == "server":
        # A server keeps nothing of a routes source: unchecked route templates would be stored and
        # served back as they came (the form clears these fields itself, webapp/forms.py).
        for field in ROUTES_SOURCE_FIELDS:
            if clean.get(field):
                errors.setdefault(field, f"{field} is for a routes source (source_kind: routes) only; leave it "
                                         "empty for a server, or create a routes endpoint")
        if "start_command" in clean and not clean["start_command"] and not clean.get("image"):
            errors["start_command"] = ("start_command is required: the shell command that starts your server, "
                                       "e.g. python -m http.server 8080 (with port 8080)")
        elif clean.get("start_command") and settings.backend == "process" and not _hosts_known(session):
            # No worker registered yet: judge by this machine (with hosts, _check_pools judges).
            from workers.ports import fixed_port_refusal, namespace_mode, uses_port_placeholder

            if not uses_port_placeholder(clean["start_command"]) and namespace_mode() is None:
                errors["start_command"] = "start_command: " + fixed_port_refusal(clean.get("port") or 8080)
    elif clean.get("source_kind") == "routes":
        _validate_routes_source(clean, errors, settings, session)

    if clean.get("websocket"):
        # What a WebSocket service cannot have, as each field's declaration says (common/spec_fields.py).
        for f in SPEC:
            if f.not_for_websocket and f.name in clean and clean[f.name] != f.default:
                errors.setdefault(f.name, f"{f.name} {clean[f.name]!r} cannot be used by a WebSocket service: "
                                          f"{f.not_for_websocket} (or set websocket to false)")

    if _check_pools(clean, errors, settings, session):
        return  # the hosts of the endpoint's pools said whether it can ever be placed
    gpu_count = clean.get("gpu_count")
    if inventory is not None and clean.get("gpu_type"):
        from workers.gpus import canonical_gpu_type

        # One spelling, the host's: "t4" is stored as the inventory's "T4", which the GPU queue
        # matches exactly.
        clean["gpu_type"] = canonical_gpu_type(inventory, clean["gpu_type"])
    if clean.get("gpu_type") and gpu_count == 0:
        errors.setdefault("gpu_count", "gpu_count must be 1 or more when a gpu_type is chosen (or clear gpu_type)")
    if inventory is not None and gpu_count and "gpu_type" in clean:
        from workers.gpus import check_request_fits

        problem = check_request_fits(inventory, clean["gpu_type"], gpu_count)
        if problem:
            errors["gpu_count"] = problem


AUTOSCALE_TARGETS = ("target_concurrency", "target_cpu_percent", "target_memory_percent", "target_gpu_percent")


def _check_autoscaling(clean: dict, errors: dict) -> None:
    """Auto-scaling needs something to scale on; a GPU target needs GPUs to measure; a warm
    window keeps no more than max instances."""
    if clean.get("warm_windows") and clean.get("max_instances") and "warm_windows" not in errors:
        from workflows.warm_windows import parse

        try:
            parse(clean["warm_windows"], clean["max_instances"])
        except ValueError as exc:
            errors["warm_windows"] = f"warm_windows {exc}"
    if clean.get("autoscaling") and not any(clean.get(t) for t in AUTOSCALE_TARGETS) \
            and not any(t in errors for t in AUTOSCALE_TARGETS):
        errors["target_concurrency"] = ("autoscaling needs a target: set target_concurrency (in-flight requests per "
                                        "instance) or a target CPU, memory or GPU %, or turn autoscaling off")
    if clean.get("target_gpu_percent") and not clean.get("gpu_count") and "target_gpu_percent" not in errors:
        errors["target_gpu_percent"] = ("target_gpu_percent needs GPUs to measure: set gpu_type and gpu_count, "
                                        "or use target_cpu_percent")


def _hosts_known(session) -> bool:
    if session is None:
        return False
    from sqlalchemy import func, select

    from common.models import Host

    return bool(session.scalar(select(func.count()).select_from(Host)))


def _check_pools(clean: dict, errors: dict, settings: Settings, session) -> bool:
    """Pools: instances split evenly over them, and each able to hold an instance some day (its
    registered hosts, down ones included: they may come back). True when hosts were there to
    judge by; a fresh install, before its worker registered, falls back to this host's GPUs."""
    from sqlalchemy import select

    from common.models import Host
    from workflows.placement import PlacementRequest, never_fits

    pools = clean.get("pools") or [settings.pool]
    for field in ("min_instances", "max_instances"):
        value = clean.get(field)
        if len(pools) > 1 and value and value % len(pools):
            errors.setdefault(field, f"{field} must be a multiple of the number of pools ({len(pools)}): instances "
                                     f"are split evenly between {', '.join(pools)}; got {value}")
    if session is None or "pools" in errors:
        return False
    hosts = session.scalars(select(Host)).all()
    if not hosts:
        return False
    by_pool: dict[str, list] = {}
    for host in hosts:
        by_pool.setdefault(host.pool, []).append(host.to_info())
    listing = ", ".join(f"{pool} ({len(members)} host{'s' * (len(members) != 1)})"
                        for pool, members in sorted(by_pool.items()))
    for pool in pools:
        if pool not in by_pool:
            errors.setdefault("pools", f"pools: {pool!r} has no hosts; pools with hosts: {listing}")
            continue
        if clean.get("gpu_type") and not clean.get("gpu_count"):
            continue  # said above: a type needs a count
        from workers.ports import uses_port_placeholder

        needs_netns = (clean.get("source_kind") == "server" and not clean.get("image")
                       and bool(clean.get("start_command")) and not uses_port_placeholder(clean["start_command"]))
        request = PlacementRequest("", clean.get("name", ""), "", clean.get("gpu_type", ""),
                                   clean.get("gpu_count") or 0, clean.get("cpu_cores") or 0.0,
                                   clean.get("memory_gb") or 0.0, clean.get("disk_gb") or 0, needs_netns)
        problem = never_fits(by_pool[pool], request, pool)
        if problem:
            errors.setdefault("gpu_count" if request.gpu_count else "pools", problem)
        elif request.gpu_count:
            # One spelling, the hosts': "t4" is stored as a host of the pool names it.
            from workflows.placement import gpu_type_on

            spelled = next((gpu_type_on(i, request.gpu_type) for i in by_pool[pool] if gpu_type_on(i, request.gpu_type)),
                           None)
            clean["gpu_type"] = spelled or clean["gpu_type"]
    return True


def _minutes(seconds: int) -> str:
    return f"{seconds / 60:g}"
