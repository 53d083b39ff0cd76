"""How a routes endpoint's templates read on the review and detail pages."""
from __future__ import annotations

import json

from sqlalchemy import select

from common.models import Model, ModelVersion
from common.route_values import is_required
from common.routes import example_request, route_method
from webapp.extensions import db

AUTH_PLACEHOLDER = "Authorization: Bearer <your key>"


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def param_summary(param: dict) -> str:
    """One line per parameter, e.g. `int, required, 0 ≤ n ≤ 10` or `str, default "fast", one of …`."""
    parts = [str(param.get("type", "str"))]
    parts.append("required" if is_required(param) else
                 f"default {_json(param['default'])}" if "default" in param else "optional")
    low, high = param.get("ge"), param.get("le")
    if low is not None and high is not None:
        parts.append(f"{low} ≤ value ≤ {high}")
    elif low is not None:
        parts.append(f"≥ {low}")
    elif high is not None:
        parts.append(f"≤ {high}")
    shortest, longest = param.get("min_length"), param.get("max_length")
    if shortest is not None and longest is not None:
        parts.append(f"length {shortest}–{longest}")
    elif shortest is not None:
        parts.append(f"length ≥ {shortest}")
    elif longest is not None:
        parts.append(f"length ≤ {longest}")
    if param.get("choices") is not None:
        parts.append("one of " + ", ".join(_json(c) for c in param["choices"]))
    if param.get("regex") is not None:
        parts.append(f"matches {param['regex']}")
    return ", ".join(parts)


def route_examples(routes: list[dict], url: str, with_key: bool) -> list[dict]:
    """An example call per route for the connect panel; with the key header when keys exist."""
    examples = []
    for route in routes or []:
        example = example_request(route, url)
        curl = example["curl"]
        if with_key:
            curl = curl.replace("curl ", f"curl -H '{AUTH_PLACEHOLDER}' ", 1)
        examples.append({"method": route_method(route), "path": route.get("path", "/"),
                         "function": route.get("function", ""), "curl": curl})
    return examples


def model_version_label(version_id: int | None) -> str:
    if version_id is None:
        return "—"
    row = db.session.execute(
        select(ModelVersion, Model.name).join(Model).where(ModelVersion.id == version_id)
    ).first()
    if row is None:
        return f"model version {version_id} (no longer registered)"
    version, name = row
    where = f"{version.git_url} @ {version.git_ref}" if version.kind == "git" else "archive"
    return f"{name} v{version.number} ({where})"
