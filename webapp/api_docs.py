"""The API reference page (/docs/api): the OpenAPI document (webapp/openapi.py) turned into what a
server-rendered page shows, so the page needs no JavaScript and nothing from another site, and
says exactly what /api/v1/openapi.json says."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

REF_PREFIX = "#/components/schemas/"


@dataclass
class Row:
    """One property or parameter: its name, what it holds and what it means."""

    name: str
    kind: str  # "integer, 1 – 65535"
    link: str = ""  # a schema it refers to
    required: bool = False
    default: str = ""
    description: str = ""
    edit: str = ""  # x-edit-class of a spec field


@dataclass
class Answer:
    status: str
    description: str
    schema: str  # the schema's name, or "" for a free-form object


@dataclass
class Op:
    method: str
    path: str
    anchor: str
    summary: str
    description: str
    parameters: list[Row] = field(default_factory=list)
    bodies: list[tuple[str, str]] = field(default_factory=list)  # (media type, schema name)
    body_required: bool = False
    answers: list[Answer] = field(default_factory=list)


@dataclass
class Schema:
    name: str
    description: str
    rows: list[Row]
    example: str = ""


@dataclass
class Reference:
    title: str
    description: str
    tags: list[tuple[str, str, list[Op]]]  # (name, description, operations)
    schemas: list[Schema]


def code_spans(text: str) -> Markup:
    """Text with its `backticked` spans as <code>, everything else escaped."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text or ""))))


def _name(ref: str) -> str:
    return ref.removeprefix(REF_PREFIX)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(schema: dict) -> tuple[str, str]:
    """(what a value of `schema` is, in words; the schema it refers to, if any)."""
    if "$ref" in schema:
        return _name(schema["$ref"]), _name(schema["$ref"])
    if "const" in schema:
        return json.dumps(schema["const"]), ""
    types = schema.get("type", "any")
    types = [types] if isinstance(types, str) else list(types)
    nullable = "null" in types
    types = [t for t in types if t != "null"] or ["null"]
    link = ""
    if types == ["array"]:
        item, link = describe(schema.get("items", {}))
        text = f"array of {item}"
    elif "enum" in schema:
        text = "one of " + ", ".join(str(v) for v in schema["enum"])
    else:
        text = " or ".join(types)
    high = _number(schema["maximum"]) if "maximum" in schema else None
    if "exclusiveMinimum" in schema:
        text += f", more than {_number(schema['exclusiveMinimum'])}" + (f", at most {high}" if high else "")
    elif "minimum" in schema:
        text += f", {_number(schema['minimum'])} – {high}" if high else f", at least {_number(schema['minimum'])}"
    if "maxLength" in schema:
        text += f", at most {schema['maxLength']} characters"
    if schema.get("format"):
        text += f" ({schema['format']})"
    return text + (", or null" if nullable else ""), link


def _row(name: str, schema: dict, required: bool, description: str = "") -> Row:
    kind, link = describe(schema)
    default = json.dumps(schema["default"]) if "default" in schema else ""
    return Row(name, kind, link, required, default,
               description or schema.get("description") or schema.get("title", ""), schema.get("x-edit-class", ""))


def _schema(name: str, schema: dict) -> Schema:
    required = set(schema.get("required", []))
    rows = [_row(prop, sub, prop in required) for prop, sub in schema.get("properties", {}).items()]
    example = json.dumps(schema["examples"][0], indent=2) if schema.get("examples") else ""
    return Schema(name, schema.get("description", ""), rows, example)


def _operation(method: str, path: str, op: dict) -> Op:
    parameters = [_row(p["name"], p["schema"], p.get("required", False),
                       f"({p['in']}) {p.get('description', '')}".strip()) for p in op.get("parameters", [])]
    body = op.get("requestBody", {})
    bodies = [(media, describe(content["schema"])[0]) for media, content in body.get("content", {}).items()]
    answers = []
    for status, response in op["responses"].items():
        schema = next(iter(response.get("content", {}).values()), {}).get("schema", {})
        answers.append(Answer(status, response["description"], _name(schema.get("$ref", ""))))
    return Op(method.upper(), path, op["operationId"], op["summary"], op.get("description", ""), parameters,
              bodies, body.get("required", False), answers)


def reference(document: dict) -> Reference:
    """What /docs/api shows, from the OpenAPI document."""
    by_tag: dict[str, list[Op]] = {tag["name"]: [] for tag in document.get("tags", [])}
    for path, item in document["paths"].items():
        for method, op in item.items():
            by_tag.setdefault(op["tags"][0], []).append(_operation(method, path, op))
    descriptions = {tag["name"]: tag.get("description", "") for tag in document.get("tags", [])}
    return Reference(
        title=document["info"]["title"], description=document["info"].get("description", ""),
        tags=[(tag, descriptions.get(tag, ""), ops) for tag, ops in by_tag.items() if ops],
        schemas=[_schema(name, schema) for name, schema in document["components"]["schemas"].items()],
    )
