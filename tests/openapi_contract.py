"""Answers of the JSON API checked against its OpenAPI document (webapp/openapi.py): documented
status, media type and body schema, with schemathesis' own checks.

`check_answer` checks one answer; `ContractClient` is a Flask test client that checks every
/api/v1 answer it gets, so a test using it (tests/test_api_e2e.py, with a real Temporal and
worker) also checks the answers only a running system gives: wake and scale-out results, the
workflow's state, quota refusals.
"""
from __future__ import annotations

from flask import Flask
from schemathesis.openapi import from_dict
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from werkzeug.exceptions import HTTPException

from tests.conftest import SignedInClient
from webapp.openapi import API_PREFIX, document, openapi_path

CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def check_answer(app: Flask, method: str, path: str, response) -> str | None:
    """Check `response` to `method path`; returns the operation's label ("GET /api/v1/..."), or
    None for a path or method the app has no route for (its 404 / 405 is no operation's)."""
    try:
        rule, arguments = app.url_map.bind("localhost").match(path, method=method, return_rule=True)
    except HTTPException:
        return None
    schema = app.extensions.get("openapi_schema_for_tests")
    if schema is None:
        schema = app.extensions["openapi_schema_for_tests"] = from_dict(document(app))
    operation = schema[openapi_path(rule.rule)][method]
    operation.Case(path_parameters=arguments).validate_response(response, checks=CHECKS)
    return operation.label


class ContractClient(SignedInClient):
    """A test client (signed in as the site admin) that checks every /api/v1 answer against the
    document; `checked` holds (operation label, status) of each answer it checked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked: set[tuple[str, int]] = set()

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        request = response.request
        if request.path.startswith(API_PREFIX + "/"):
            label = check_answer(self.application, request.method, request.path, response)
            if label:
                self.checked.add((label, response.status_code))
        return response
