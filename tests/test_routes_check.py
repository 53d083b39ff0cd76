"""check_request: matching a request to a route, and every type and constraint of its fields."""
from __future__ import annotations

import base64
import json

import pytest

from common.routes import check_request, validate_routes

ROUTES = [
    {"method": "POST", "path": "/predict", "file": "p.py", "function": "predict",
     "params": [
         {"name": "text", "type": "str", "min_length": 1, "max_length": 5, "regex": "[a-z]+"},
         {"name": "count", "type": "int", "ge": 1, "le": 3, "default": 1},
         {"name": "ratio", "type": "float", "ge": 0, "le": 1, "default": 0.5},
         {"name": "flag", "type": "bool", "default": False},
         {"name": "items", "type": "list", "min_length": 1, "max_length": 2, "default": [1]},
         {"name": "options", "type": "dict", "default": {}},
         {"name": "blob", "type": "bytes", "max_length": 3, "default": "YQ=="},
         {"name": "mode", "type": "str", "choices": ["fast", "slow"], "default": "fast"},
         {"name": "level", "type": "int", "choices": [1, 2], "default": 1},
         {"name": "note", "type": "str", "default": None},
         {"name": "extra", "type": "int", "required": False},
     ]},
    {"method": "GET", "path": "/predict", "file": "p.py", "function": "describe", "params": []},
    {"method": "GET", "path": "/search", "file": "p.py", "function": "search",
     "params": [{"name": "q", "type": "str"}, {"name": "limit", "type": "int", "le": 50, "default": 10},
                {"name": "exact", "type": "bool", "default": False}, {"name": "score", "type": "float", "default": 0.0},
                {"name": "tags", "type": "list", "default": []}, {"name": "filters", "type": "dict", "default": {}},
                {"name": "raw", "type": "bytes", "default": ""}]},
    {"method": "POST", "path": "/pos", "file": "p.py", "function": "pos", "call": "positional",
     "params": [{"name": "b", "type": "int"}, {"name": "a", "type": "int", "default": 7}]},
    {"method": "POST", "path": "/empty", "file": "p.py", "function": "empty"},
]


def post(body, path="/predict", content_type="application/json"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return check_request(ROUTES, "POST", path, raw, content_type)


def field_errors(check) -> dict:
    return {e["field"]: e["message"] for e in check.errors}


def test_fixture_routes_are_valid():
    assert validate_routes(ROUTES) == {}


def test_defaults_fill_in_and_order_follows_template():
    check = post({"text": "abc"})
    assert check.status == 200, check.errors
    assert list(check.args) == ["text", "count", "ratio", "flag", "items", "options", "blob", "mode", "level", "note"]
    assert check.args["blob"] == b"a" and check.args["note"] is None and check.args["items"] == [1]
    assert check.call_arguments() == ([], check.args)


def test_defaults_are_fresh_copies():
    first = post({"text": "abc"})
    first.args["items"].append(2)
    assert post({"text": "abc"}).args["items"] == [1]


def test_optional_without_default_is_omitted_then_passed_when_given():
    assert "extra" not in post({"text": "abc"}).args
    assert post({"text": "abc", "extra": 4}).args["extra"] == 4


def test_every_type_accepted_and_coerced():
    blob = base64.b64encode(b"xyz").decode()
    check = post({"text": "ab", "count": 3, "ratio": 1, "flag": True, "items": ["x", 2], "options": {"k": [1]},
                  "blob": blob, "mode": "slow", "level": 2, "note": "hi"})
    assert check.ok, check.errors
    assert check.args["ratio"] == 1.0 and isinstance(check.args["ratio"], float)  # int accepted for float
    assert check.args["blob"] == b"xyz" and check.args["flag"] is True and check.args["options"] == {"k": [1]}


@pytest.mark.parametrize("field, value, fragment", [
    ("text", 5, "must be a string, got a whole number"),
    ("count", True, "must be a whole number, got a boolean"),  # bool is not int
    ("count", 1.5, "must be a whole number, got a number"),
    ("count", "2", "must be a whole number, got a string"),
    ("ratio", "0.5", "must be a number, got a string"),
    ("ratio", False, "must be a number, got a boolean"),
    ("flag", 1, "must be true or false, got a whole number"),
    ("flag", "true", "must be true or false, got a string"),
    ("items", "a", "must be a JSON array, got a string"),
    ("items", {}, "must be a JSON array, got an object"),
    ("options", [], "must be a JSON object, got an array"),
    ("blob", 5, "base64-encoded string, got a whole number"),
    ("blob", "@@@", "could not be decoded"),
    ("text", None, "must be a string, got null"),  # null only where the default is null
])
def test_wrong_types(field, value, fragment):
    body = {"text": "abc", field: value}
    check = post(body)
    assert check.status == 400
    assert fragment in field_errors(check)[field]


@pytest.mark.parametrize("field, value, fragment", [
    ("text", "", "at least 1 characters"),
    ("text", "abcdef", "at most 5 characters"),
    ("text", "ABC", "must match the pattern '[a-z]+'"),
    ("text", "ab1", "pattern"),  # the whole value must match, not a prefix
    ("count", 0, "greater than or equal to 1"),
    ("count", 4, "less than or equal to 3"),
    ("ratio", 1.01, "less than or equal to 1"),
    ("ratio", -0.1, "greater than or equal to 0"),
    ("items", [], "at least 1 items"),
    ("items", [1, 2, 3], "at most 2 items"),
    ("blob", base64.b64encode(b"abcd").decode(), "at most 3 bytes"),  # length of the decoded bytes
    ("mode", "medium", 'one of ["fast", "slow"]'),
    ("level", 3, "one of [1, 2]"),
])
def test_constraints(field, value, fragment):
    check = post({"text": "abc", field: value})
    assert check.status == 400
    assert fragment in field_errors(check)[field]


def test_bounds_are_inclusive():
    assert post({"text": "a", "count": 3, "ratio": 0, "items": [1, 2], "blob": "YWJj"}).ok
    assert post({"text": "abcde", "count": 1, "ratio": 1}).ok


def test_missing_and_unknown_fields_are_all_reported():
    check = post({"count": 2, "colour": "red", "size": 1})
    assert check.status == 400
    errors = field_errors(check)
    assert errors["text"].startswith("is required")
    assert "unknown field" in errors["colour"] and "text, count" in errors["colour"]
    assert "size" in errors


@pytest.mark.parametrize("body, fragment", [
    (b"not json", "must be a JSON object"),
    (b"[1, 2]", "got an array"),
    (b'"text"', "got a string"),
    (b"\xff\xfe", "must be a JSON object"),
])
def test_body_must_be_a_json_object(body, fragment):
    check = post(body)
    assert check.status == 400
    assert check.errors[0]["field"] == "body" and fragment in check.errors[0]["message"]


def test_form_content_type_hint():
    check = post(b"text=abc", content_type="application/x-www-form-urlencoded")
    assert "send application/json" in check.errors[0]["message"]


def test_empty_body_means_no_fields():
    assert post(b"", path="/empty").ok
    assert field_errors(post(b""))["text"].startswith("is required")


def test_unknown_path_is_404():
    check = post({}, path="/nope")
    assert check.status == 404 and "/predict" in check.errors[0]["message"]


def test_known_path_wrong_verb_is_405_with_allowed_methods():
    check = check_request(ROUTES, "DELETE", "/predict", b"", None)
    assert check.status == 405 and check.allowed == ["GET", "POST"]
    assert check.error_headers() == [("Allow", "GET, POST")]
    assert check.error_body()["allowed"] == ["GET", "POST"]
    assert check_request(ROUTES, "PUT", "/search", b"", None).allowed == ["GET"]


def test_trailing_slash_matches():
    assert check_request(ROUTES, "POST", "/empty/", b"", None).ok


def test_get_reads_typed_query_string():
    check = check_request(ROUTES, "GET", "/search?q=cats&limit=5&exact=true&score=0.5&tags=a&tags=b"
                                        "&filters=%7B%22k%22%3A1%7D&raw=YWI%3D", b"", None)
    assert check.ok, check.errors
    assert check.args == {"q": "cats", "limit": 5, "exact": True, "score": 0.5, "tags": ["a", "b"],
                          "filters": {"k": 1}, "raw": b"ab"}


def test_get_query_can_come_separately_and_single_list_value():
    check = check_request(ROUTES, "GET", "/search", b"", None, query="q=x&tags=%5B1%2C2%5D")
    assert check.args["tags"] == [1, 2]
    assert check_request(ROUTES, "GET", "/search", b"", None, query="q=x&tags=solo").args["tags"] == ["solo"]


@pytest.mark.parametrize("query, field, fragment", [
    ("limit=5", "q", "is required"),
    ("q=x&limit=ten", "limit", "whole number, got 'ten'"),
    ("q=x&limit=60", "limit", "less than or equal to 50"),
    ("q=x&exact=maybe", "exact", "true or false"),
    ("q=x&score=high", "score", "must be a number"),
    ("q=x&filters=nope", "filters", "JSON object written as JSON"),
    ("q=x&q=y", "q", "more than once"),
    ("q=x&page=2", "page", "unknown field"),
])
def test_get_query_errors(query, field, fragment):
    check = check_request(ROUTES, "GET", f"/search?{query}", b"", None)
    assert check.status == 400
    assert fragment in field_errors(check)[field]


def test_get_ignores_the_body():
    assert check_request(ROUTES, "GET", "/search?q=x", b"not json", "text/plain").ok


def test_positional_call_arguments_in_template_order():
    check = post({"a": 1, "b": 2}, path="/pos")
    assert check.call_arguments() == ([2, 1], {})
    assert post({"b": 2}, path="/pos").call_arguments() == ([2, 7], {})


def test_error_body_shape():
    body = post({"text": 1}).error_body()
    assert body == {"code": 400, "msg": "invalid request",
                    "errors": [{"field": "text", "message": "must be a string, got a whole number"}]}


def test_example_requests_pass_their_own_check():
    from pathlib import Path

    from common.routes import example_request

    arith = json.loads((Path(__file__).resolve().parent.parent / "examples" / "arith" / "routes.json").read_text())
    for route in [*ROUTES, *arith]:
        example = example_request(route, "http://127.0.0.1:8000/e/demo")
        assert example["url"].startswith("http://127.0.0.1:8000/e/demo/")
        path_and_query = example["url"].removeprefix("http://127.0.0.1:8000/e/demo")
        body = json.dumps(example["body"]).encode() if example["body"] is not None else b""
        check = check_request([route], example["method"], path_and_query, body, "application/json")
        assert check.ok, (route["path"], check.errors)
    add = example_request(arith[0], "http://h/e/arith/")
    assert add["curl"] == ("curl -X POST -H 'Content-Type: application/json' -d '{\"a\": 1, \"b\": 1}' "
                           "http://h/e/arith/add")
