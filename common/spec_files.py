"""Spec files: endpoint specs as YAML or JSON, read by `app.py apply` and written by `app.py get`
(README.md "Spec files").

A file holds one spec (a mapping of the fields in common/spec_fields.py), a list of specs, or
several YAML documents (`---`). Reading refuses, with the file, the place and what to change,
what the JSON API would refuse less clearly or not at all: YAML syntax errors, a key given twice
(YAML keeps the last one silently), values JSON has no word for (dates, binary), NaN and
Infinity. Writing gives a file that reads back to the same spec: `get` -> `apply` changes nothing.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any

import yaml

from common import strict_json
from common.spec_fields import ENV, SPEC


class SpecFileError(ValueError):
    """A spec file that cannot be read; the message names the file and says what to change."""


# ---- reading ----


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base constructor refuses it with its own message
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"{key!r} is given twice; keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_documents(text: str, source: str) -> list[Any]:
    try:
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise SpecFileError(f"{source}: {where}{what} (not valid YAML)") from None
    except yaml.YAMLError as exc:
        raise SpecFileError(f"{source}: not valid YAML ({exc})") from None
    except RecursionError:
        raise SpecFileError(f"{source}: nests deeper than {strict_json.MAX_DEPTH} levels; flatten it") from None


def _json_document(text: str, source: str) -> Any:
    try:
        return strict_json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecFileError(f"{source}: line {exc.lineno}, column {exc.colno}: {exc.msg} (not valid JSON)") from None
    except ValueError as exc:  # NaN, Infinity, too deep: strict_json says which
        raise SpecFileError(f"{source}: {exc}") from None


def _check_value(value: Any, where: str) -> None:
    """Only what JSON can carry, and only finite numbers: the API takes nothing else."""
    try:
        strict_json.check_value(value)
    except strict_json.JSONRefused as exc:
        raise SpecFileError(f"{where}: {exc}") from None
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise SpecFileError(f"{where}: {path or 'the spec'} has the key {key!r}, which is not text; "
                                        "quote it")
                stack.append((child, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{index}]") for index, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise SpecFileError(f"{where}: {path} is NaN or Infinity; write a finite number")
        elif not isinstance(item, (str, int, float, bool, type(None))):
            raise SpecFileError(f"{where}: {path} is read as {_kind_of(item)} ({item}); quote it to make it text")


def read_specs(text: str, source: str, *, as_json: bool = False, base_dir: str | None = None) -> list[dict]:
    """The specs in a file's text, in order. `as_json` reads strict JSON (a `.json` file), else
    YAML (which reads JSON too). A relative `source_dir` is taken relative to `base_dir`, the
    file's directory, as a compose file's paths are."""
    documents = [_json_document(text, source)] if as_json else _yaml_documents(text, source)
    specs: list[dict] = []
    several = len(documents) > 1
    for number, document in enumerate(documents, start=1):
        if document is None:  # an empty YAML document, e.g. after a trailing `---`
            continue
        items = document if isinstance(document, list) else [document]
        for position, spec in enumerate(items, start=1):
            where = source + (f" (document {number})" if several else "") + (
                f" (item {position})" if isinstance(document, list) else "")
            if not isinstance(spec, dict):
                raise SpecFileError(f"{where}: a spec is a mapping of fields (name: ..., start_command: ...), "
                                    f"not {_kind_of(spec)}")
            _check_value(spec, where)
            source_dir = spec.get("source_dir")
            if base_dir is not None and isinstance(source_dir, str) and source_dir.strip() \
                    and not os.path.isabs(source_dir.strip()):
                spec["source_dir"] = os.path.normpath(os.path.join(base_dir, source_dir.strip()))
            specs.append(spec)
    if not specs:
        raise SpecFileError(f"{source}: holds no endpoint spec; write one mapping of fields, e.g. name: my-model")
    return specs


def _kind_of(value: Any) -> str:
    kinds = {list: "a list", str: "text", type(None): "empty", bool: "true/false", int: "a number",
             float: "a number", bytes: "binary data", datetime.date: "a date", datetime.datetime: "a timestamp"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def read_spec_file(path: str, stdin_text: str | None = None) -> list[dict]:
    """The specs of a file (`-` is standard input, given as `stdin_text`)."""
    if path == "-":
        return read_specs(stdin_text or "", "standard input", base_dir=os.getcwd())
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise SpecFileError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise SpecFileError(f"{path}: is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise SpecFileError(f"{path}: cannot be read ({exc.strerror})") from None
    return read_specs(text, path, as_json=path.lower().endswith(".json"),
                      base_dir=os.path.dirname(os.path.abspath(path)))


# ---- writing ----


def file_spec(endpoint: dict) -> dict:
    """An endpoint as the JSON API answers it, as a spec file holds it: the spec fields only (no
    status, no instances), in their declared order; a secret variable as `secret: true` without
    its value (applying it keeps the stored value); the fields of the other kind of source left
    out while they hold their default."""
    kind = endpoint.get("source_kind") or "server"
    spec: dict[str, Any] = {}
    for f in SPEC:
        value = endpoint.get(f.name, f.default)
        if f.only_for and f.only_for != kind and value == f.default:
            continue
        if f.kind == ENV:
            value = [{"key": item["key"], "secret": True} if item.get("secret")
                     else {"key": item["key"], "value": item.get("value") or ""} for item in value or []]
        spec[f.name] = value
    return spec


class _Dumper(yaml.SafeDumper):
    """Text spanning lines (a start command, a description) as a literal block, as people write it."""


# Line breaks to YAML 1.1 besides \n, which a plain or block scalar would not keep as they are.
_OTHER_BREAKS = ("\x85", "\u2028", "\u2029")


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    # Otherwise the emitter falls back to a quoted style itself where a block cannot hold the text.
    style = '"' if any(ch in text for ch in _OTHER_BREAKS) else "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_text)


def dump_spec(spec: dict, output: str) -> str:
    """A spec as `yaml` or `json` text, ending with a newline."""
    if output == "json":
        return strict_json.dumps(spec, indent=2, ensure_ascii=False) + "\n"
    # No folding of long lines: a start command stays on the line it is written on.
    return yaml.dump(spec, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False,
                     width=1 << 16)
