"""Parameter values of route templates: type coercion and constraints.

Shared by template validation (defaults and choices must satisfy their own parameter) and by
request checking (body fields and query-string values), so both speak with the same messages.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from typing import Any

import re2

PARAM_TYPES = ("str", "int", "float", "bool", "list", "dict", "bytes")
TYPE_WORDS = {"str": "a string", "int": "a whole number", "float": "a number",
              "bool": "true or false", "list": "a JSON array", "dict": "a JSON object",
              "bytes": "a base64-encoded string"}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and (not isinstance(value, float) or math.isfinite(value))


# ---- parameter regexes ------------------------------------------------------------------------
# A user's pattern runs against request bodies in the proxy (before waking anything), in the
# runtime, and against defaults in the web app. Python's `re` backtracks: `(a+)+$` takes seconds
# on 27 characters and doubles with each one more. RE2 matches in time linear in the text, so
# every pattern is compiled here, with RE2 only; what RE2 cannot express (backreferences,
# lookaround) is refused with a message saying what to change.
MAX_PATTERN_LENGTH = 1000
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error reaches the user as a message; no stderr noise
_RE2_OPTIONS.max_mem = 8 << 20  # a bounded automaton: 'a{1000}' nested repeats are refused


class InvalidPattern(ValueError):
    """A parameter regex that is refused; the message says what to change."""


def compile_pattern(pattern: str):
    """The pattern compiled for linear-time matching, or InvalidPattern."""
    if not isinstance(pattern, str):
        raise InvalidPattern("regex must be a string")
    return _compile(pattern)


@functools.lru_cache(maxsize=512)
def _compile(pattern: str):
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"regex must be at most {MAX_PATTERN_LENGTH} characters")
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidPattern(f"regex does not compile: {exc}") from None
    raise InvalidPattern(
        f"regex uses a feature that cannot be matched in linear time ({detail}): backreferences such "
        r"as \1, lookahead/lookbehind such as (?=...) (?!...) (?<=...), possessive quantifiers such as "
        r"a++, or \Z (write \z); rewrite the pattern without them") from None


def pattern_matches(pattern: str, text: str) -> bool:
    """Whether `text` matches the whole `pattern` (linear time in len(text))."""
    return compile_pattern(pattern).fullmatch(text) is not None


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_required(param: dict) -> bool:
    """A parameter is required unless it says otherwise or carries a default."""
    if "required" in param:
        return bool(param["required"])
    return "default" not in param


class InvalidValue(Exception):
    """A value that does not fit its parameter; the message completes "<field> ..."."""


def coerce(param: dict, value: Any) -> Any:
    """Type-check a JSON value for `param`, returning the value the function receives."""
    kind = param.get("type", "str")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidValue(f"must be {TYPE_WORDS['int']}, got {describe(value)}")
        return value
    if kind == "float":
        if not is_number(value):
            raise InvalidValue(f"must be {TYPE_WORDS['float']}, got {describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidValue("must be a finite number")
        return float(value)
    if kind == "bytes":
        if not isinstance(value, str):
            raise InvalidValue(f"must be {TYPE_WORDS['bytes']}, got {describe(value)}")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidValue("must be a base64-encoded string (it could not be decoded)") from None
    expected = {"str": str, "bool": bool, "list": list, "dict": dict}[kind]
    if not isinstance(value, expected):
        raise InvalidValue(f"must be {TYPE_WORDS[kind]}, got {describe(value)}")
    return value


def check_constraints(param: dict, value: Any) -> None:
    """Raise InvalidValue with a message saying which bound the (coerced) value breaks (or that
    the template's regex is refused, for a template stored before its rules got stricter)."""
    if "ge" in param and param["ge"] is not None and value < param["ge"]:
        raise InvalidValue(f"must be greater than or equal to {param['ge']}")
    if "le" in param and param["le"] is not None and value > param["le"]:
        raise InvalidValue(f"must be less than or equal to {param['le']}")
    unit = "bytes" if param.get("type") == "bytes" else (
        "characters" if param.get("type") == "str" else "items")
    if param.get("min_length") is not None and len(value) < param["min_length"]:
        raise InvalidValue(f"must have at least {param['min_length']} {unit}")
    if param.get("max_length") is not None and len(value) > param["max_length"]:
        raise InvalidValue(f"must have at most {param['max_length']} {unit}")
    if param.get("choices") is not None and value not in param["choices"]:
        raise InvalidValue(f"must be one of {json.dumps(param['choices'])}")
    if param.get("regex") is not None:
        try:
            matches = pattern_matches(param["regex"], value)
        except InvalidPattern as exc:
            raise InvalidValue(f"cannot be checked: the route's {exc}") from None
        if not matches:
            raise InvalidValue(f"must match the pattern {param['regex']!r}")


def check_value(param: dict, value: Any) -> Any:
    if value is None and not is_required(param) and param.get("default", None) is None:
        return None  # an optional parameter whose default is null also accepts null
    value = coerce(param, value)
    check_constraints(param, value)
    return value


def from_query_string(param: dict, raw: list[str]) -> Any:
    """Turn query-string text into the JSON value a POST body would have carried."""
    kind = param.get("type", "str")
    if kind == "list" and len(raw) > 1:
        return raw
    if len(raw) > 1:
        raise InvalidValue("was given more than once")
    text = raw[0]
    if kind in ("str", "bytes"):
        return text
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise InvalidValue(f"must be {TYPE_WORDS['int']}, got {text!r}") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise InvalidValue(f"must be {TYPE_WORDS['float']}, got {text!r}") from None
    if kind == "bool":
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise InvalidValue(f"must be true or false, got {text!r}")
    try:
        return json.loads(text)
    except ValueError:
        if kind == "list":
            return [text]  # a single ?tag=a
        raise InvalidValue(f"must be {TYPE_WORDS[kind]} written as JSON") from None


def sample_value(param: dict) -> Any:
    """A plausible JSON value for the UI's example requests: the default, a choice, or a value of
    the right type inside the bounds (a regex is not solved; the example says "text")."""
    if "default" in param and param["default"] is not None:
        return param["default"]
    if param.get("choices"):
        return param["choices"][0]
    kind = param.get("type", "str")
    if kind in ("int", "float"):
        value = 1
        if param.get("ge") is not None:
            value = max(value, param["ge"])
        if param.get("le") is not None:
            value = min(value, param["le"])
        return int(math.ceil(value)) if kind == "int" else float(value)
    if kind == "bool":
        return True
    if kind == "list":
        return ["item"] * max(1, param.get("min_length") or 0)
    if kind == "dict":
        return {}
    if kind == "bytes":
        return base64.b64encode(b"bytes").decode()
    text = "text"
    minimum = param.get("min_length") or 0
    return (text * (minimum // len(text) + 1))[: max(minimum, min(len(text), param.get("max_length") or len(text)))]
