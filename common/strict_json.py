"""Standard JSON only, both ways: no NaN or ±Infinity, no half characters, and no nesting deeper
than we ever need.

Python's `json` reads `NaN`, `Infinity` and numbers such as `1e400` (which become `inf`), and
writes them back as the non-standard tokens `NaN` / `Infinity` that other JSON parsers refuse.
A deeply nested document makes the C decoder raise `RecursionError`, and anything walking the
value afterwards (validation, `repr` in a message, the database's JSON encoder) may recurse as
deep. A string escape such as `"\\ud800"` (half of a UTF-16 surrogate pair) parses into a Python
string that no UTF-8 encoder, and so no database, can store. The web app reads every request body
and the routes textarea through `loads`, and writes every answer through `dumps`, so none of these
can happen.
"""
from __future__ import annotations

import json
import math
from typing import Any

# Spec and route templates nest at most ~5 levels (routes[i].params[j].default is a JSON value);
# 32 leaves room for any real default value and stays far below Python's recursion limit.
MAX_DEPTH = 32


class JSONRefused(ValueError):
    """A JSON document that is valid for Python but not accepted here; the message says why."""


def _refuse_constant(name: str) -> Any:
    raise JSONRefused(f"{name} is not a JSON number; send a finite number (or null)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRefused(f"the number {text[:40]} is too large for a 64-bit float; send a finite number")
    return value


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JSONRefused("a string holds half of a UTF-16 surrogate pair (a \\ud800-\\udfff escape alone), "
                          "which is no character; send valid Unicode text") from None


def check_value(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """JSONRefused when lists/objects nest deeper than `max_depth`, or a string holds an unpaired
    surrogate (`"\\ud800"` parses, but no database or encoder can store it). Walked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if isinstance(item, dict):
            children = item.values()
            for key in item:
                if isinstance(key, str):  # YAML may give other keys: common/spec_files.py names them
                    _check_text(key)
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise JSONRefused(f"the JSON nests deeper than {max_depth} levels; flatten it")
        stack.extend((child, depth + 1) for child in children)


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` that refuses NaN, ±Infinity, numbers out of float range, deep nesting and
    unpaired surrogates,
    raising JSONRefused / ValueError with a message fit for the user."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise JSONRefused(f"the JSON nests deeper than {max_depth} levels; flatten it") from None
    check_value(value, max_depth)
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that raises ValueError instead of writing NaN / Infinity."""
    return json.dumps(value, allow_nan=False, **kwargs)


def has_non_finite(value: Any) -> bool:
    """Whether a (parsed) JSON value holds NaN or ±Infinity anywhere inside."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
