"""Route parameter regexes are matched in linear time everywhere (common/route_values.py): the
web app checking a default, the proxy and the runtime checking a body (`check_request`)."""
from __future__ import annotations

import json
import time

import pytest

from common.route_values import InvalidPattern, compile_pattern
from common.routes import check_request, validate_routes

EVIL = ["(a+)+$", "(a|aa)+$", "(a*)*b", "^(([a-z])+.)+[A-Z]([a-z])+$", "(x+x+)+y"]


def route(pattern: str, **param) -> list[dict]:
    return [{"method": "POST", "path": "/p", "file": "p.py", "function": "f",
             "params": [{"name": "text", "type": "str", "regex": pattern, **param}]}]


@pytest.mark.parametrize("pattern", EVIL)
def test_catastrophic_patterns_are_matched_in_linear_time(pattern):
    body = json.dumps({"text": "a" * 5000 + "!"}).encode()
    started = time.perf_counter()
    check = check_request(route(pattern), "POST", "/p", body, "application/json")
    elapsed = time.perf_counter() - started
    assert check.status == 400 and "must match the pattern" in check.errors[0]["message"]
    assert elapsed < 0.5, f"{pattern} took {elapsed:.2f}s on 5001 characters"


def test_the_issues_case_27_characters():
    started = time.perf_counter()
    check = check_request(route("(a+)+$"), "POST", "/p", json.dumps({"text": "a" * 26 + "!"}).encode(),
                          "application/json")
    assert check.status == 400 and time.perf_counter() - started < 0.1


def test_a_default_is_checked_in_linear_time_by_the_web_app(client):
    started = time.perf_counter()
    response = client.post("/api/v1/endpoints", json={
        "name": "slow", "source_kind": "routes", "git_url": "https://example.com/m.git", "git_ref": "main",
        "routes": route("(a+)+$", required=False, default="a" * 40 + "!")})
    assert time.perf_counter() - started < 2.0
    assert response.status_code == 400
    assert "must match the pattern" in response.get_json()["errors"]["routes[0].params[0].default"]


@pytest.mark.parametrize("pattern, fragment", [
    (r"(a)\1", "backreferences"), (r"a(?=b)", "lookahead"), (r"(?<!x)y", "lookahead/lookbehind"),
    (r"a++", "possessive"), (r"abc\Z", r"\z"), ("[", "does not compile"), ("x" * 1001, "at most 1000"),
])
def test_patterns_re2_cannot_run_are_refused_saying_what_to_change(pattern, fragment):
    errors = validate_routes(route(pattern))
    assert fragment in errors["routes[0].params[0].regex"], errors


def test_the_api_answers_a_refused_pattern_with_400(client):
    response = client.post("/api/v1/endpoints", json={
        "name": "backref", "source_kind": "routes", "git_url": "https://example.com/m.git", "git_ref": "main",
        "routes": route(r"(a)\1")})
    assert response.status_code == 400
    assert "rewrite the pattern" in response.get_json()["errors"]["routes[0].params[0].regex"]


def test_a_stored_template_with_a_refused_pattern_is_a_400_not_a_crash():
    """A template written before these rules: check_request refuses the field instead of raising."""
    check = check_request(route(r"(a)\1"), "POST", "/p", b'{"text": "aa"}', "application/json")
    assert check.status == 400 and "cannot be checked" in check.errors[0]["message"]


def test_ordinary_patterns_still_match():
    assert check_request(route(r"[a-z]+-\d{2}"), "POST", "/p", b'{"text": "abc-12"}', "application/json").ok
    assert not check_request(route(r"[a-z]+-\d{2}"), "POST", "/p", b'{"text": "abc-123"}', "application/json").ok
    assert check_request(route("(?P<word>é+)"), "POST", "/p", '{"text": "éé"}'.encode(), "application/json").ok
    with pytest.raises(InvalidPattern):
        compile_pattern(["not", "a", "string"])
