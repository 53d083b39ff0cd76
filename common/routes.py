"""Route templates of a "routes" endpoint: validation of the template, and of requests against it.

A route maps an HTTP verb + path to a function in a file of the model's source:

    {"method": "POST", "path": "/predict", "file": "predict.py", "function": "predict_file",
     "call": "keyword", "params": [{"name": "text", "type": "str", "max_length": 512}]}

Pure Python (no Flask): the web app validates templates with `validate_routes`, and both the
proxy (before waking anything) and the built-in runtime (defence in depth) check request
bodies with `check_request`, so a bad body gets the same 400 wherever it is caught.
"""
from __future__ import annotations

import base64
import json
import keyword
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from common.route_values import (
    PARAM_TYPES,
    TYPE_WORDS,
    InvalidPattern,
    InvalidValue,
    check_value,
    compile_pattern,
    coerce,
    describe,
    from_query_string,
    is_finite_number,
    is_required,
    sample_value,
)

METHODS = ("POST", "GET")
CALL_STYLES = ("keyword", "positional")
# The built-in runtime answers its health check here (503 while loading, 200 once every function
# is found); the worker probes it and the proxy answers it for a sleeping endpoint. A route
# there would never be reached.
RUNTIME_HEALTH_PATH = "/ping"
RESERVED_PATHS = (RUNTIME_HEALTH_PATH,)

ROUTE_KEYS = ("method", "path", "file", "function", "call", "params")
PARAM_KEYS = ("name", "type", "required", "default", "ge", "le", "choices", "regex",
              "min_length", "max_length", "description")
_NUMERIC = ("int", "float")
_SIZED = ("str", "list", "bytes")
_CHOOSABLE = ("str", "int", "float", "bool")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")
_FILE_PART_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _is_identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def call_style(route: dict) -> str:
    return route.get("call") or "keyword"


def route_method(route: dict) -> str:
    return str(route.get("method") or "POST").upper()


# ---------------------------------------------------------------------------------------------
# Template validation
# ---------------------------------------------------------------------------------------------


def _file_error(file: Any) -> str | None:
    if not isinstance(file, str) or not file.strip():
        return "give the Python file, relative to the source root, e.g. predict.py"
    if file.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file):
        return "must be a path relative to the source root, not an absolute path"
    parts = file.split("/")
    if "\\" in file or any(part in ("", ".", "..") for part in parts):
        return "must stay inside the source: use forward slashes and no '..' or '.' parts"
    if not all(_FILE_PART_RE.match(part) for part in parts):
        return "may only use letters, digits, '_', '-' and '.' in each part"
    if not file.endswith(".py"):
        return "must be a Python file ending in .py"
    return None


def _constraint_errors(param: dict, prefix: str) -> dict[str, str]:
    errors: dict[str, str] = {}
    kind = param.get("type")
    for bound in ("ge", "le"):
        if param.get(bound) is None:
            continue
        if kind not in _NUMERIC:
            errors[f"{prefix}.{bound}"] = f"{bound} applies to int and float parameters only"
        elif not is_finite_number(param[bound]):
            errors[f"{prefix}.{bound}"] = f"{bound} must be a number (a finite one, not NaN or Infinity)"
    if (is_finite_number(param.get("ge")) and is_finite_number(param.get("le"))
            and param["ge"] > param["le"] and kind in _NUMERIC):
        errors[f"{prefix}.le"] = "le must be greater than or equal to ge"
    for bound in ("min_length", "max_length"):
        if param.get(bound) is None:
            continue
        if kind not in _SIZED:
            errors[f"{prefix}.{bound}"] = f"{bound} applies to str, list and bytes parameters only"
        elif isinstance(param[bound], bool) or not isinstance(param[bound], int) or param[bound] < 0:
            errors[f"{prefix}.{bound}"] = f"{bound} must be a whole number >= 0"
    lengths = [param.get("min_length"), param.get("max_length")]
    if all(isinstance(n, int) and not isinstance(n, bool) for n in lengths) and lengths[0] > lengths[1]:
        errors.setdefault(f"{prefix}.max_length", "max_length must be >= min_length")
    if param.get("regex") is not None:
        if kind != "str":
            errors[f"{prefix}.regex"] = "regex applies to str parameters only"
        elif not isinstance(param["regex"], str):
            errors[f"{prefix}.regex"] = "regex must be a string"
        else:
            try:
                compile_pattern(param["regex"])
            except InvalidPattern as exc:
                errors[f"{prefix}.regex"] = str(exc)
    if param.get("choices") is not None:
        choices = param["choices"]
        if kind not in _CHOOSABLE:
            errors[f"{prefix}.choices"] = "choices apply to str, int, float and bool parameters only"
        elif not isinstance(choices, list) or not choices:
            errors[f"{prefix}.choices"] = "choices must be a non-empty list of allowed values"
        else:
            for choice in choices:
                try:
                    coerce(param, choice)
                except InvalidValue as exc:
                    errors[f"{prefix}.choices"] = f"every choice {exc} (bad choice: {choice!r})"
                    break
    return errors


def _param_errors(param: Any, prefix: str, positional: bool) -> dict[str, str]:
    if not isinstance(param, dict):
        return {prefix: "each parameter must be an object with at least a name and a type"}
    errors: dict[str, str] = {}
    unknown = sorted(set(param) - set(PARAM_KEYS))
    if unknown:
        errors[prefix] = f"unknown keys {unknown}; allowed: {', '.join(PARAM_KEYS)}"
    if not _is_identifier(param.get("name")):
        errors[f"{prefix}.name"] = "must be a Python identifier (letters, digits, '_'), e.g. text"
    if param.get("type") not in PARAM_TYPES:
        errors[f"{prefix}.type"] = f"must be one of {', '.join(PARAM_TYPES)}"
        return errors
    if "required" in param and not isinstance(param["required"], bool):
        errors[f"{prefix}.required"] = "must be true or false"
    errors.update(_constraint_errors(param, prefix))
    if param.get("required") is True and "default" in param:
        errors[f"{prefix}.default"] = "a required parameter takes no default: remove it or set required to false"
    elif "default" in param and not any(key.startswith(f"{prefix}.") for key in errors):
        try:
            check_value({**param, "required": False}, param["default"])
        except InvalidValue as exc:
            errors[f"{prefix}.default"] = f"the default {exc}"
    if positional and not is_required(param) and "default" not in param:
        errors[f"{prefix}.default"] = ("an optional parameter of a positional call needs a default "
                                       "(it fills the argument's place when the field is omitted)")
    return errors


def validate_routes(routes: Any) -> dict[str, str]:
    """Every problem in a list of route templates, keyed like `routes[0].params[1].type`."""
    if not isinstance(routes, list) or not routes:
        return {"routes": "add at least one route (method, path, file, function)"}
    errors: dict[str, str] = {}
    seen: dict[tuple[str, str], int] = {}
    for i, route in enumerate(routes):
        prefix = f"routes[{i}]"
        if not isinstance(route, dict):
            errors[prefix] = "each route must be an object with method, path, file and function"
            continue
        unknown = sorted(set(route) - set(ROUTE_KEYS))
        if unknown:
            errors[prefix] = f"unknown keys {unknown}; allowed: {', '.join(ROUTE_KEYS)}"
        method = route.get("method", "POST")
        if not isinstance(method, str) or method.upper() not in METHODS:
            errors[f"{prefix}.method"] = "must be POST or GET"
        path = route.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            errors[f"{prefix}.path"] = "must start with '/', e.g. /predict"
        elif not _PATH_RE.match(path) or "//" in path or "/../" in f"{path}/" or "/./" in f"{path}/":
            errors[f"{prefix}.path"] = "may only use URL path characters, without '//', '.' or '..' segments, '?' or '#'"
        elif path.rstrip("/") in RESERVED_PATHS:
            errors[f"{prefix}.path"] = f"{path} is reserved for the health check; pick another path"
        elif isinstance(method, str) and method.upper() in METHODS:
            key = (method.upper(), _normal_path(path))
            if key in seen:
                errors[f"{prefix}.path"] = f"{key[0]} {path} is already routes[{seen[key]}]"
            else:
                seen[key] = i
        file_error = _file_error(route.get("file"))
        if file_error:
            errors[f"{prefix}.file"] = file_error
        if not _is_identifier(route.get("function")):
            errors[f"{prefix}.function"] = "must be the name of a function in the file (a Python identifier)"
        style = route.get("call", "keyword")
        if style not in CALL_STYLES:
            errors[f"{prefix}.call"] = "must be keyword (arguments by name) or positional (in template order)"
        errors.update(_params_errors(route.get("params", []), prefix, style == "positional"))
    return errors


def _params_errors(params: Any, prefix: str, positional: bool) -> dict[str, str]:
    if not isinstance(params, list):
        return {f"{prefix}.params": "must be a list of parameters"}
    errors: dict[str, str] = {}
    names: dict[str, int] = {}
    optional_seen = None
    for j, param in enumerate(params):
        p_prefix = f"{prefix}.params[{j}]"
        errors.update(_param_errors(param, p_prefix, positional))
        if not isinstance(param, dict):
            continue
        name = param.get("name")
        if isinstance(name, str):
            if name in names:
                errors.setdefault(f"{p_prefix}.name", f"{name!r} is already params[{names[name]}]")
            names.setdefault(name, j)
        if positional:
            if not is_required(param):
                optional_seen = j if optional_seen is None else optional_seen
            elif optional_seen is not None:
                errors.setdefault(f"{p_prefix}.required", (
                    f"in a positional call required parameters come first: move it before "
                    f"params[{optional_seen}], which is optional"))
    return errors


def normalize_routes(routes: list[dict]) -> list[dict]:
    """Fill defaults (POST, keyword call, no params) into templates that `validate_routes` accepted."""
    normal = []
    for route in routes:
        params = [{**param, "required": is_required(param)} for param in route.get("params", [])]
        normal.append({**route, "method": route_method(route), "call": call_style(route), "params": params})
    return normal


# ---------------------------------------------------------------------------------------------
# Request checking
# ---------------------------------------------------------------------------------------------


@dataclass
class RouteCheck:
    status: int  # 200, 400, 404 or 405
    errors: list[dict] = field(default_factory=list)  # [{"field": "text", "message": "..."}]
    route: dict | None = None
    args: dict = field(default_factory=dict)  # coerced arguments in template order
    allowed: list[str] = field(default_factory=list)  # the verbs of a path answered with 405

    @property
    def ok(self) -> bool:
        return self.status == 200

    def call_arguments(self) -> tuple[list, dict]:
        """(args, kwargs) for the route's function, honouring its call style."""
        if self.route is not None and call_style(self.route) == "positional":
            return list(self.args.values()), {}
        return [], dict(self.args)

    def error_body(self) -> dict:
        """The JSON body of a refusal: the same from the proxy and from the runtime."""
        messages = {404: "no route for this path", 405: "method not allowed for this path",
                    400: "invalid request"}
        body: dict[str, Any] = {"code": self.status, "msg": messages.get(self.status, "error"),
                                "errors": self.errors}
        if self.allowed:
            body["allowed"] = self.allowed
        return body

    def error_headers(self) -> list[tuple[str, str]]:
        return [("Allow", ", ".join(self.allowed))] if self.allowed else []


def _normal_path(path: str) -> str:
    return path.rstrip("/") or "/"


def _field_error(name: str, message: str) -> dict:
    return {"field": name, "message": message}


def _body_fields(body: bytes, content_type: str | None) -> tuple[dict | None, str]:
    if not body or not body.strip():
        return {}, ""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        hint = ""
        if content_type and "json" not in content_type.lower():
            hint = f" (got Content-Type {content_type.split(';')[0]}; send application/json)"
        return None, f"the body must be a JSON object{hint}"
    if not isinstance(data, dict):
        return None, f"the body must be a JSON object, got {describe(data)}"
    return data, ""


def _query_fields(query: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        fields.setdefault(key, []).append(value)
    return fields


def check_request(routes: list[dict], method: str, path: str, body: bytes = b"",
                  content_type: str | None = None, query: str = "") -> RouteCheck:
    """Match a request to a route and type-check its fields.

    `path` may carry the query string (`/items?limit=3`) or it may come in `query`. GET routes
    read their parameters from the query string, everything else from a JSON object body.
    """
    path, _, inline_query = path.partition("?")
    query = query or inline_query
    path = _normal_path(path)
    method = method.upper()
    at_path = [r for r in routes if isinstance(r, dict) and _normal_path(str(r.get("path", ""))) == path]
    if not at_path:
        return RouteCheck(404, [_field_error("path", f"no route {path}; routes: "
                                             + ", ".join(sorted({str(r.get('path')) for r in routes})))])
    route = next((r for r in at_path if route_method(r) == method), None)
    if route is None:
        allowed = sorted({route_method(r) for r in at_path})
        return RouteCheck(405, [_field_error("method", f"{path} accepts {', '.join(allowed)}, not {method}")],
                          allowed=allowed)
    params = route.get("params") or []
    if route_method(route) == "GET":
        raw_fields: dict[str, Any] = _query_fields(query)
    else:
        raw_fields, problem = _body_fields(body, content_type)
        if raw_fields is None:
            return RouteCheck(400, [_field_error("body", problem)], route=route)
    errors = []
    known = {p.get("name") for p in params}
    for name in raw_fields:
        if name not in known:
            accepted = ", ".join(str(p.get("name")) for p in params) or "no fields"
            errors.append(_field_error(name, f"unknown field; this route accepts {accepted}"))
    args: dict[str, Any] = {}
    for param in params:
        name = param.get("name")
        if name not in raw_fields:
            if is_required(param):
                errors.append(_field_error(name, f"is required ({TYPE_WORDS.get(param.get('type'), 'a value')})"))
            elif "default" in param:
                args[name] = json.loads(json.dumps(param["default"]))  # a fresh copy per call
                if param.get("type") == "bytes" and args[name] is not None:
                    args[name] = base64.b64decode(args[name])
            continue
        try:
            value = raw_fields[name]
            if route_method(route) == "GET":
                value = from_query_string(param, value)
            args[name] = check_value(param, value)
        except InvalidValue as exc:
            errors.append(_field_error(name, str(exc)))
        except (re.error, TypeError) as exc:  # a template that skipped validate_routes
            errors.append(_field_error(name, f"cannot be checked: {exc}"))
    if errors:
        return RouteCheck(400, errors, route=route)
    return RouteCheck(200, route=route, args=args)


def example_request(route: dict, base_url: str) -> dict:
    """A sample call of a route for the UI's connect panel: {"method", "url", "body", "curl"}."""
    import shlex
    from urllib.parse import urlencode

    sample = {p["name"]: sample_value(p) for p in route.get("params") or [] if is_required(p)}
    url = base_url.rstrip("/") + route.get("path", "/")
    method = route_method(route)
    if method == "GET":
        query = urlencode({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in sample.items()})
        url = f"{url}?{query}" if query else url
        return {"method": "GET", "url": url, "body": None, "curl": f"curl {shlex.quote(url)}"}
    body = json.dumps(sample)
    return {"method": method, "url": url, "body": sample,
            "curl": f"curl -X {method} -H 'Content-Type: application/json' -d {shlex.quote(body)} {shlex.quote(url)}"}
