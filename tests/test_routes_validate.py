"""validate_routes: every template mistake is reported under its field with what to fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.routes import normalize_routes, validate_routes

ARITH_ROUTES = Path(__file__).resolve().parent.parent / "examples" / "arith" / "routes.json"


def route(**overrides) -> dict:
    base = {"method": "POST", "path": "/predict", "file": "predict.py", "function": "predict",
            "params": [{"name": "text", "type": "str"}]}
    return {**base, **overrides}


def param_route(*params, call="keyword") -> list[dict]:
    return [route(params=list(params), call=call)]


def test_examples_are_valid():
    assert validate_routes(json.loads(ARITH_ROUTES.read_text())) == {}
    embeddings = ARITH_ROUTES.parent.parent / "embeddings" / "routes.json"
    assert validate_routes(json.loads(embeddings.read_text())) == {}


def test_minimal_route_is_valid_and_normalized():
    routes = [{"path": "/predict", "file": "predict.py", "function": "predict"}]
    assert validate_routes(routes) == {}
    assert normalize_routes(routes) == [{"path": "/predict", "file": "predict.py", "function": "predict",
                                         "method": "POST", "call": "keyword", "params": []}]


@pytest.mark.parametrize("routes", [None, [], {}, "x"])
def test_needs_a_list_of_routes(routes):
    assert "routes" in validate_routes(routes)


def test_route_must_be_object_and_known_keys():
    errors = validate_routes(["x", route(verb="POST")])
    assert "routes[0]" in errors
    assert "verb" in errors["routes[1]"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "", 3])
def test_method_post_or_get(method):
    assert validate_routes([route(method=method)])["routes[0].method"] == "must be POST or GET"


def test_lowercase_method_is_accepted():
    assert validate_routes([route(method="get")]) == {}


@pytest.mark.parametrize("path, fragment", [
    ("predict", "start with '/'"),
    ("", "start with '/'"),
    ("/a b", "URL path characters"),
    ("/a?b=1", "URL path characters"),
    ("/a/../b", "'..'"),
    ("//a", "'//'"),
    ("/ping", "reserved"),
    ("/ping/", "reserved"),
])
def test_bad_paths(path, fragment):
    assert fragment in validate_routes([route(path=path)])["routes[0].path"]


def test_duplicate_method_and_path():
    errors = validate_routes([route(), route(function="other"), route(method="GET", params=[])])
    assert errors == {"routes[1].path": "POST /predict is already routes[0]"}


@pytest.mark.parametrize("file, fragment", [
    ("../predict.py", "inside the source"),
    ("models/../../etc/x.py", "inside the source"),
    ("/etc/predict.py", "not an absolute path"),
    ("\\\\server\\share\\x.py", "not an absolute path"),
    ("C:/x/predict.py", "not an absolute path"),
    ("a\\b.py", "inside the source"),
    ("./predict.py", "inside the source"),
    ("predict.txt", "ending in .py"),
    ("pred ict.py", "letters, digits"),
    ("", "relative to the source root"),
    (None, "relative to the source root"),
])
def test_bad_files(file, fragment):
    assert fragment in validate_routes([route(file=file)])["routes[0].file"]


def test_nested_file_is_fine():
    assert validate_routes([route(file="models/text/predict.py")]) == {}


@pytest.mark.parametrize("function", ["", "predict-file", "class", "1x", None])
def test_function_is_identifier(function):
    assert "routes[0].function" in validate_routes([route(function=function)])


def test_call_style():
    assert "routes[0].call" in validate_routes([route(call="named")])


def test_params_must_be_a_list():
    assert validate_routes([route(params={"text": "str"})]) == {"routes[0].params": "must be a list of parameters"}


def test_param_name_identifier_and_unique():
    errors = validate_routes(param_route({"name": "two words", "type": "str"}, {"name": "a", "type": "int"},
                                         {"name": "a", "type": "str"}))
    assert "identifier" in errors["routes[0].params[0].name"]
    assert errors["routes[0].params[2].name"] == "'a' is already params[1]"


def test_param_unknown_key_and_type():
    errors = validate_routes(param_route({"name": "a", "type": "string", "minimum": 1}))
    assert "minimum" in errors["routes[0].params[0]"]
    assert errors["routes[0].params[0].type"] == "must be one of str, int, float, bool, list, dict, bytes"


@pytest.mark.parametrize("param, key, fragment", [
    ({"name": "a", "type": "str", "ge": 1}, "ge", "int and float"),
    ({"name": "a", "type": "int", "le": "10"}, "le", "must be a number"),
    ({"name": "a", "type": "int", "ge": 5, "le": 1}, "le", "greater than or equal to ge"),
    ({"name": "a", "type": "int", "min_length": 1}, "min_length", "str, list and bytes"),
    ({"name": "a", "type": "str", "max_length": -1}, "max_length", "whole number >= 0"),
    ({"name": "a", "type": "list", "min_length": 3, "max_length": 2}, "max_length", ">= min_length"),
    ({"name": "a", "type": "int", "regex": "x"}, "regex", "str parameters only"),
    ({"name": "a", "type": "str", "regex": "(unclosed"}, "regex", "does not compile"),
    ({"name": "a", "type": "dict", "choices": [{}]}, "choices", "str, int, float and bool"),
    ({"name": "a", "type": "str", "choices": "a,b"}, "choices", "non-empty list"),
    ({"name": "a", "type": "int", "choices": [1, "2"]}, "choices", "bad choice: '2'"),
    ({"name": "a", "type": "bool", "required": "yes"}, "required", "true or false"),
])
def test_bad_constraints(param, key, fragment):
    errors = validate_routes(param_route(param))
    assert fragment in errors[f"routes[0].params[0].{key}"], errors


@pytest.mark.parametrize("param", [
    {"name": "a", "type": "int", "ge": 0, "le": 10, "default": 3},
    {"name": "a", "type": "float", "ge": 0.5, "default": 1},
    {"name": "a", "type": "str", "regex": "[a-z]+", "min_length": 1, "max_length": 5, "default": "abc"},
    {"name": "a", "type": "str", "choices": ["x", "y"], "default": "y"},
    {"name": "a", "type": "bool", "default": False},
    {"name": "a", "type": "list", "max_length": 2, "default": [1]},
    {"name": "a", "type": "dict", "default": {"k": 1}},
    {"name": "a", "type": "bytes", "max_length": 3, "default": "YWJj"},
    {"name": "a", "type": "str", "default": None},
    {"name": "a", "type": "int", "required": False},
])
def test_good_params(param):
    assert validate_routes(param_route(param)) == {}


@pytest.mark.parametrize("param, fragment", [
    ({"name": "a", "type": "int", "default": "3"}, "must be a whole number, got a string"),
    ({"name": "a", "type": "int", "default": True}, "got a boolean"),
    ({"name": "a", "type": "int", "ge": 0, "default": -1}, "greater than or equal to 0"),
    ({"name": "a", "type": "str", "choices": ["x"], "default": "z"}, 'one of ["x"]'),
    ({"name": "a", "type": "str", "regex": "[a-z]+", "default": "A"}, "pattern"),
    ({"name": "a", "type": "bytes", "default": "not base64!"}, "base64"),
    ({"name": "a", "type": "bytes", "max_length": 2, "default": "YWJj"}, "at most 2 bytes"),
    ({"name": "a", "type": "str", "required": True, "default": "x"}, "takes no default"),
])
def test_bad_defaults(param, fragment):
    assert fragment in validate_routes(param_route(param))["routes[0].params[0].default"]


def test_positional_required_before_optional():
    errors = validate_routes(param_route({"name": "a", "type": "int", "default": 1}, {"name": "b", "type": "int"},
                                         call="positional"))
    assert "required parameters come first" in errors["routes[0].params[1].required"]
    assert validate_routes(param_route({"name": "b", "type": "int"}, {"name": "a", "type": "int", "default": 1},
                                       call="positional")) == {}


def test_positional_optional_needs_default():
    errors = validate_routes(param_route({"name": "a", "type": "int", "required": False}, call="positional"))
    assert "needs a default" in errors["routes[0].params[0].default"]


def test_errors_are_keyed_per_route_and_param():
    routes = [route(), route(path="/b", params=[{"name": "x", "type": "str"}, {"name": "y", "type": "nope"}])]
    assert list(validate_routes(routes)) == ["routes[1].params[1].type"]
