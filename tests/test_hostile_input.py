"""Hostile input to the web app through Flask's test client (Temporal is a closed port): spec
maxima, NaN and Infinity, deep nesting, body and URL size, JSON errors, hosts, cross-site calls."""
from __future__ import annotations

import json
import math

import pytest
from sqlalchemy import select

from common.models import Endpoint
from tests.conftest import web_app
from webapp.extensions import db
from webapp.spec import DEFAULTS, NUMERIC_LIMITS, validate_spec

SERVER = {"start_command": "python -m http.server $PORT"}
ROUTE = {"method": "POST", "path": "/p", "file": "p.py", "function": "f"}


def create(client, **spec):
    return client.post("/api/v1/endpoints", json={"name": "ep", **SERVER, **spec})


def assert_json_error(response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, (response.status_code, response.get_data()[:300])
    assert response.content_type.startswith("application/json"), response.content_type
    body = strict_loads(response.get_data())
    text = json.dumps(body)
    assert body["error"] and fragment in text, text
    return body


def _no_constants(name):
    raise AssertionError(f"non-standard JSON token {name} in an answer")


def strict_loads(data: bytes):
    """Standard JSON only: NaN, Infinity and -Infinity fail the test."""
    return json.loads(data, parse_constant=_no_constants)


# ---- numeric maxima ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(set(NUMERIC_LIMITS) - {"model_version_id", "startup_timeout_seconds"}))
def test_every_numeric_field_has_a_maximum(field):
    limit = NUMERIC_LIMITS[field]
    base = {"name": "ep", **SERVER, "max_instances": 100}
    if field == "max_instances":
        base["min_instances"] = 0
    if field == "target_gpu_percent":  # GPU use is measured on instances that have GPUs
        base.update(gpu_type="T4", gpu_count=1)
    ok, errors = validate_spec({**base, field: limit.high}, existing=None)
    assert not errors, errors
    _, errors = validate_spec({**base, field: limit.high + 1}, existing=None)
    assert f"at most {int(limit.high)}" in errors[field], errors


@pytest.mark.parametrize("field, value", [
    ("idle_retention_seconds", 1e15), ("health_interval_seconds", 1e15), ("memory_gb", 1e308),
    ("hold_queue_size", 2**63), ("cpu_cores", 10**400), ("disk_gb", "9" * 5000), ("port", 2**64),
    ("max_concurrency", 1e300), ("min_instances", -(2**63)), ("startup_timeout_seconds", 1e15),
    ("gpu_count", [1]), ("gpu_count", [[[[[[1]]]]]]), ("gpu_count", {"a": 1}), ("memory_gb", "nan"),
    ("cpu_cores", "inf"), ("cpu_cores", "-Infinity"), ("model_version_id", 2**40),
])
def test_values_a_workflow_cannot_schedule_are_400(client, field, value):
    body = assert_json_error(create(client, **{field: value}), 400, field)
    assert len(body["errors"][field]) < 300  # a short message, never the value written out


def test_startup_timeout_keeps_the_settings_range(client):
    assert_json_error(create(client, startup_timeout_seconds=7201), 400, "between 3 and 120 minutes")


# ---- NaN, Infinity and nesting ----------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    '{"name": "ep", "start_command": "x", "cpu_cores": NaN}',
    '{"name": "ep", "start_command": "x", "cpu_cores": Infinity}',
    '{"name": "ep", "start_command": "x", "cpu_cores": -Infinity}',
    '{"name": "ep", "start_command": "x", "memory_gb": 1e400}',
    '{"name": "ep", "source_kind": "routes", "git_url": "https://h/r.git", "git_ref": "main", "routes": '
    '[{"path": "/p", "file": "p.py", "function": "f", "params": [{"name": "x", "type": "float", "ge": NaN}]}]}',
    '{"name": "ep", "source_kind": "routes", "git_url": "https://h/r.git", "git_ref": "main", "routes": '
    '[{"path": "/p", "file": "p.py", "function": "f", "params": [{"name": "x", "type": "float", '
    '"choices": [1.5, Infinity]}]}]}',
    '{"name": "ep", "source_kind": "routes", "git_url": "https://h/r.git", "git_ref": "main", "routes": '
    '[{"path": "/p", "file": "p.py", "function": "f", "params": [{"name": "x", "type": "float", "default": -Infinity}]}]}',
])
def test_nan_and_infinity_are_refused_and_never_stored(client, raw):
    response = client.post("/api/v1/endpoints", data=raw, content_type="application/json")
    assert_json_error(response, 400)
    listing = client.get("/api/v1/endpoints")
    assert listing.status_code == 200 and strict_loads(listing.get_data()) == {"endpoints": [], "next": None}


@pytest.mark.parametrize("route_param", [
    {"name": "x", "type": "float", "ge": math.nan}, {"name": "x", "type": "float", "le": math.inf},
    {"name": "x", "type": "float", "choices": [1.0, math.nan]}, {"name": "x", "type": "float", "default": math.inf},
    {"name": "x", "type": "list", "default": [1, [2, -math.inf]]},
])
def test_non_finite_numbers_inside_routes_are_refused(route_param):
    """Past the JSON parser (the form, or a caller of validate_spec): still refused."""
    _, errors = validate_spec({"name": "ep", "source_kind": "routes", "git_url": "https://h/r.git", "git_ref": "main",
                               "routes": [{**ROUTE, "params": [route_param]}]}, existing=None)
    assert any("NaN" in message or "finite" in message for message in errors.values()), errors


def test_answers_can_never_carry_nan(app):
    with app.app_context(), pytest.raises(ValueError):
        app.json.dumps({"x": math.nan})


@pytest.mark.parametrize("method, path", [("post", "/api/v1/endpoints"), ("patch", "/api/v1/endpoints/base"),
                                          ("post", "/api/v1/models"), ("post", "/api/v1/endpoints/base/keys")])
@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deeply_nested_bodies_are_400(client, method, path, depth):
    assert create(client, name="base").status_code in (201, 503)
    nested = '{"name": "x", "env": ' + "[" * depth + "]" * depth + "}"
    response = getattr(client, method)(path, data=nested, content_type="application/json")
    assert_json_error(response, 400, "nests deeper than 32 levels")


@pytest.mark.parametrize("method, path", [("post", "/api/v1/endpoints"), ("patch", "/api/v1/endpoints/base"),
                                          ("post", "/api/v1/models"), ("post", "/api/v1/endpoints/base/keys")])
@pytest.mark.parametrize("body", ['{"name": "x", "description": "ok \\ud800"}', '{"name": "\\udfff"}',
                                  '{"name": "x", "env": [{"key": "A", "value": "\\udc00\\ud800"}]}',
                                  '{"\\ud83d": 1}'])
def test_half_characters_are_400_not_a_500_when_stored(client, method, path, body):
    assert create(client, name="base").status_code in (201, 503)
    response = getattr(client, method)(path, data=body, content_type="application/json")
    assert_json_error(response, 400, "surrogate pair")
    paired = getattr(client, method)(path, data=body.replace("\\ud800", "\\ud83d\\ude00"),
                                     content_type="application/json")
    assert paired.status_code < 500


def test_body_size_is_bounded(client):
    response = create(client, description="x" * (2 * 1024 * 1024))
    assert_json_error(response, 413)


# ---- every API error is JSON --------------------------------------------------------------------


def test_api_errors_are_json(client):
    assert_json_error(client.get("/api/v1/endpoints?q=" + "x" * 5000), 414, "longer than")
    assert_json_error(client.get("/api/v1/no-such-thing"), 404)
    response = client.delete("/api/v1/endpoints")
    assert_json_error(response, 405)
    assert "GET" in response.headers["Allow"]
    assert_json_error(client.get("/api/v1/endpoints/nope"), 404, "no endpoint named")
    assert_json_error(client.post("/api/v1/endpoints", data="{", content_type="application/json"), 400)
    # A method or path the app does not have says so, whatever the body (found by schemathesis).
    assert_json_error(client.put("/api/v1/models/m/versions", data="x", content_type="text/plain"), 405)
    assert_json_error(client.post("/api/v1/no-such-thing", data="x", content_type="text/plain"), 404)


# ---- hosts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host, allowed", [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1:5000", True), ("[::1]:5000", True),
    ("LOCALHOST", True), ("evil.example", False), ("127.0.0.1.evil.example", False), ("", False),
    ("localhost@evil", False), ("[::2]:5000", False),
])
def test_only_configured_hosts_are_served(client, host, allowed):
    api = client.get("/api/v1/endpoints", headers={"Host": host})
    page = client.get("/endpoints", headers={"Host": host})
    if allowed:
        assert api.status_code == 200 and page.status_code == 200
    else:
        assert_json_error(api, 400, "STANDBY_ALLOWED_HOSTS")
        assert page.status_code == 400 and "STANDBY_ALLOWED_HOSTS" in page.get_data(as_text=True)


def test_allowed_hosts_are_configurable(tmp_path):
    for app in web_app(tmp_path, STANDBY_ALLOWED_HOSTS="web, .example.com"):
        client = app.test_client()
        assert client.get("/healthz", headers={"Host": "web:5000"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "api.example.com"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "example.com"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "localhost"}).status_code == 400
    for app in web_app(tmp_path / "any", STANDBY_ALLOWED_HOSTS="*"):
        assert app.test_client().get("/healthz", headers={"Host": "anything.example"}).status_code == 200


# ---- cross-site requests -----------------------------------------------------------------------


def mutating_api_rules(app):
    """Every (method, URL) of the JSON API that changes something, from Flask's URL map."""
    samples = {"name": "victim", "key_id": "1", "number": "1", "action": "stop", "operation": "drain",
               "project": "default", "user": "admin", "token_id": "1"}
    rules = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        for method in sorted(rule.methods & {"POST", "PUT", "PATCH", "DELETE"}):
            url = rule.rule
            for arg in rule.arguments:
                url = url.replace(f"<{arg}>", samples[arg]).replace(f"<int:{arg}>", samples[arg])
            rules.append((method, url, rule.endpoint))
    return rules


def test_the_url_map_has_the_known_mutating_routes(app):
    endpoints = {endpoint for _, _, endpoint in mutating_api_rules(app)}
    assert {"api.create_endpoint", "api.update_endpoint", "api.apply_spec", "api.endpoint_action", "api.create_key",
            "api.revoke_key", "registry.api_create_model", "registry.api_create_version"} <= endpoints


@pytest.mark.parametrize("headers, content_type, body", [
    ({}, "application/x-www-form-urlencoded", "name=x"),
    ({}, "text/plain", '{"name": "x"}'),
    ({}, "multipart/form-data; boundary=b", "--b--\r\n"),
    ({}, "application/x-www-form-urlencoded", ""),
    ({"Origin": "http://127.0.0.2:8080"}, None, None),
    ({"Origin": "null"}, None, None),
    ({"Origin": "http://localhost:5001"}, None, None),
    ({"Sec-Fetch-Site": "cross-site"}, None, None),
    ({"Sec-Fetch-Site": "same-site"}, None, None),
    ({"Origin": "http://127.0.0.2:8080", "Sec-Fetch-Site": "cross-site"}, "application/json", "{}"),
])
def test_cross_site_requests_cannot_act(app, client, headers, content_type, body):
    assert create(client, name="victim").status_code in (201, 503)
    with app.app_context():
        before = [dict(vars(row)) for row in db.session.scalars(select(Endpoint))]
    for method, url, endpoint in mutating_api_rules(app):
        if content_type and content_type.startswith("multipart") and endpoint == "registry.api_create_version":
            continue  # the upload view takes multipart: refused by the origin check alone (other cases)
        kwargs = {"headers": headers}
        if content_type is not None:
            kwargs.update(data=body, content_type=content_type)
        response = client.open(url, method=method, **kwargs)
        assert response.status_code in (403, 415), (method, url, response.status_code, response.get_data()[:200])
        assert_json_error(response, response.status_code)
    with app.app_context():
        after = [dict(vars(row)) for row in db.session.scalars(select(Endpoint))]
        for row in before + after:
            row.pop("_sa_instance_state")
        assert after == before
        assert db.session.execute(select(db.func.count()).select_from(db.metadata.tables["api_keys"])).scalar() == 0
        assert db.session.execute(select(db.func.count()).select_from(db.metadata.tables["models"])).scalar() == 0
        assert db.session.execute(select(db.func.count()).select_from(db.metadata.tables["projects"])).scalar() == 1
        assert db.session.execute(select(db.func.count()).select_from(db.metadata.tables["users"])).scalar() == 1
        # The client's own token, unrevoked.
        assert db.session.execute(select(db.func.count()).select_from(db.metadata.tables["api_tokens"])
                                  .where(db.metadata.tables["api_tokens"].c.revoked_at.is_(None))).scalar() == 1


@pytest.mark.parametrize("headers", [{}, {"Origin": "http://localhost"}, {"Sec-Fetch-Site": "same-origin"},
                                     {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}])
def test_own_pages_and_scripts_keep_working(client, headers):
    assert create(client, name="mine").status_code in (201, 503)
    keys = client.post("/api/v1/endpoints/mine/keys", json={"name": "ci"}, headers=headers)
    assert keys.status_code == 201, keys.get_json()
    bare = client.post("/api/v1/endpoints/mine/keys", headers=headers)  # curl -X POST, no body
    assert bare.status_code == 201, bare.get_json()
    assert client.post("/api/v1/endpoints/mine/stop", headers=headers).status_code == 503  # Temporal is down


def test_defaults_are_within_the_limits():
    for field, limit in NUMERIC_LIMITS.items():
        value = DEFAULTS[field]
        assert value is None or limit.low <= value <= limit.high, field
