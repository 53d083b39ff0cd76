"""Spec validation through the JSON API and the create form (no Temporal: its address is a closed port)."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import func, select

from common.models import TERMINATED, Endpoint
from tests.conftest import web_app
from webapp.extensions import db


def count_endpoints(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Endpoint))


VALID = {"name": "tts", "start_command": "python -m http.server $PORT"}

# (field overrides, field expected in errors, a word the message must contain)
BAD_SPECS = [
    ({"name": ""}, "name", "required"),
    ({"name": "Upper"}, "name", "lowercase"),
    ({"name": "-dash"}, "name", "starting and ending"),
    ({"name": "a" * 64}, "name", "1-63"),
    ({"name": "under_score"}, "name", "lowercase"),
    ({"environment": "prod"}, "environment", "development, staging, production"),
    ({"start_command": ""}, "start_command", "required"),
    ({"port": 0}, "port", "between 1 and 65535"),
    ({"port": 70000}, "port", "between 1 and 65535"),
    ({"port": "eighty"}, "port", "port number"),
    ({"source_dir": "/definitely/not/here"}, "source_dir", "not a directory"),
    ({"env": [{"key": "1BAD", "value": "x"}]}, "env", "letters, digits"),
    ({"env": [{"key": "PORT", "value": "1"}]}, "env", "set by Standby"),
    ({"env": [{"key": "A", "value": "1"}, {"key": "A", "value": "2"}]}, "env", "twice"),
    ({"env": [{"key": "TOKEN", "secret": True}]}, "env", "needs a value"),
    ({"env": "A=1"}, "env", "must be a list"),
    ({"gpu_count": 5}, "gpu_count", "between 0 and 4"),
    ({"gpu_count": -1}, "gpu_count", "between 0 and 4"),
    ({"gpu_type": "A100", "gpu_count": 1}, "gpu_count", "no A100"),
    ({"gpu_type": "T4", "gpu_count": 3}, "gpu_count", "only 2"),
    ({"gpu_type": "T4", "gpu_count": 0}, "gpu_count", "1 or more"),
    ({"cpu_cores": 0}, "cpu_cores", "greater than 0"),
    ({"memory_gb": -2}, "memory_gb", "greater than 0"),
    ({"disk_gb": 0}, "disk_gb", "at least 1"),
    ({"min_instances": -1}, "min_instances", "at least 0"),
    ({"max_instances": 0}, "max_instances", "at least 1"),
    ({"min_instances": 3, "max_instances": 2}, "max_instances", "at least min_instances"),
    ({"idle_retention_seconds": 0}, "idle_retention_seconds", "at least 1"),
    ({"startup_timeout_seconds": 60}, "startup_timeout_seconds", "between 3 and 120 minutes"),
    ({"startup_timeout_seconds": 7201}, "startup_timeout_seconds", "between 3 and 120 minutes"),
    ({"health_path": "ping"}, "health_path", "starting with '/'"),
    ({"health_interval_seconds": 0}, "health_interval_seconds", "at least 1"),
    ({"max_concurrency": -1}, "max_concurrency", "at least 0"),
    ({"balancing": "fastest"}, "balancing", "round_robin"),
    ({"sticky_sessions": "maybe"}, "sticky_sessions", "true or false"),
    ({"hold_queue_size": 0}, "hold_queue_size", "at least 1"),
    ({"gpu_count": True}, "gpu_count", "not true/false"),
    ({"description": 5}, "description", "must be text"),
    ({"colour": "blue"}, "unknown_fields", "colour"),
    ({"websocket": "sometimes"}, "websocket", "true or false"),
    ({"max_websockets": 0}, "max_websockets", "at least 1"),
    # A WebSocket service needs a server that speaks WebSocket: the routes runtime does not.
    ({"websocket": True, "source_kind": "routes", "git_url": "https://example.com/m.git", "git_ref": "main",
      "routes": [{"method": "POST", "path": "/add", "file": "a.py", "function": "add"}]},
     "source_kind", "cannot be used by a WebSocket service: Standby's routes runtime answers HTTP requests"),
]


@pytest.mark.parametrize("overrides, field, word", BAD_SPECS)
def test_api_rejects_bad_spec(app, client, overrides, field, word):
    response = client.post("/api/v1/endpoints", json={**VALID, **overrides})
    assert response.status_code == 400, response.get_json()
    errors = response.get_json()["errors"]
    assert field in errors, errors
    assert word in errors[field]
    assert count_endpoints(app) == 0


def test_api_rejects_non_object_body(client):
    response = client.post("/api/v1/endpoints", data="[1]", content_type="application/json")
    assert response.status_code == 400
    assert "JSON object" in response.get_json()["error"]


def test_api_duplicate_name_rejected(app, client):
    assert client.post("/api/v1/endpoints", json=VALID).status_code == 503  # created; Temporal down
    response = client.post("/api/v1/endpoints", json=VALID)
    assert response.status_code == 400
    assert "is taken" in response.get_json()["errors"]["name"]
    assert count_endpoints(app) == 1


def test_terminated_tombstone_is_replaced_only_when_its_workflow_is_known_closed(app, client):
    client.post("/api/v1/endpoints", json=VALID)
    with app.app_context():
        row = db.session.scalar(select(Endpoint))
        row.status = TERMINATED  # as the worker would write it
        db.session.commit()
    response = client.post("/api/v1/endpoints", json={**VALID, "description": "second life"})
    # Whether the old workflow is still purging cannot be checked: refuse, keep the tombstone.
    assert response.status_code == 503
    assert "Temporal is not reachable" in response.get_json()["error"]
    with app.app_context():
        assert db.session.scalar(select(Endpoint)).status == TERMINATED


def test_short_startup_timeout_allowed_through_config(tmp_path):
    for app in web_app(tmp_path, STANDBY_MIN_STARTUP_TIMEOUT_SECONDS="2"):
        response = app.test_client().post("/api/v1/endpoints", json={**VALID, "startup_timeout_seconds": 2})
        assert response.status_code == 503  # valid; only Temporal is missing
        assert response.get_json()["endpoint"]["startup_timeout_seconds"] == 2


def test_source_dir_must_exist_and_is_kept(client, tmp_path):
    response = client.post("/api/v1/endpoints", json={**VALID, "source_dir": str(tmp_path)})
    assert response.get_json()["endpoint"]["source_dir"] == str(tmp_path)


# ---- the form: same rules, messages rendered beside fields, nothing created ----

FORM_VALID = {
    "name": "tts", "environment": "development", "start_command": "python -m http.server $PORT",
    "port": "8080", "gpu_count": "0", "cpu_cores": "1", "memory_gb": "1", "disk_gb": "10",
    "min_instances": "0", "max_instances": "1", "idle_retention_minutes": "10",
    "startup_timeout_minutes": "20", "health_path": "/ping", "health_interval_seconds": "10",
    "max_concurrency": "0", "balancing": "round_robin", "hold_queue_size": "100",
}

BAD_FORMS = [
    ({"name": "Bad Name"}, "lowercase"),
    ({"start_command": ""}, "start_command is required"),
    ({"port": "99999"}, "between 1 and 65535"),
    ({"gpu_count": "7"}, "between 0 and 4"),
    ({"gpu_type": "T4", "gpu_count": "4"}, "only 2"),
    ({"disk_gb": "0"}, "at least 1"),
    ({"min_instances": "2", "max_instances": "1"}, "at least min_instances"),
    # Zero minutes is zero seconds: the API's own message for that value.
    ({"idle_retention_minutes": "0"}, "idle_retention_seconds must be between 1 and 2592000: at least 1, got 0"),
    ({"idle_retention_minutes": "soon"}, "number of minutes"),
    ({"startup_timeout_minutes": "1"}, "between 3 and 120 minutes"),
    ({"health_path": "health"}, "starting with &#39;/&#39;"),
    ({"env_plain": "NOEQUALS"}, "write KEY=value"),
    ({"env_secret": "9KEY=x"}, "letters, digits"),
    ({"balancing": "nope"}, "round_robin"),
    ({"source_dir": "/no/such/dir"}, "not a directory"),
    ({"name": "x" * 64}, "1-63"),
    ({"environment": "qa"}, "development, staging, production"),
    ({"cpu_cores": "0"}, "greater than 0"),
    ({"memory_gb": "lots"}, "must be a number"),
    ({"health_interval_seconds": "0"}, "at least 1"),
    ({"max_concurrency": "-3"}, "at least 0"),
    ({"hold_queue_size": "0"}, "at least 1"),
    ({"min_instances": "-1"}, "at least 0"),
]


@pytest.mark.parametrize("overrides, message", BAD_FORMS)
def test_form_rerenders_with_message(app, overrides, message):
    app.config["WTF_CSRF_ENABLED"] = False
    response = app.test_client().post("/endpoints/new", data={**FORM_VALID, **overrides})
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert message in page
    assert "nothing was saved" in page
    assert count_endpoints(app) == 0


def test_form_minutes_become_seconds(app):
    app.config["WTF_CSRF_ENABLED"] = False
    page = app.test_client().post(
        "/endpoints/new", data={**FORM_VALID, "idle_retention_minutes": "2.5", "startup_timeout_minutes": "30"}
    ).get_data(as_text=True)
    assert "(150 s)" in page and "30 min" in page
    assert re.search(r'name="draft"[^>]*value="[A-Za-z0-9_-]{20,}"', page)


def test_api_routes_source_needs_an_existing_model_version(app, client):
    routes = [{"path": "/add", "file": "arith.py", "function": "add", "params": [{"name": "a", "type": "int"}]}]
    r = client.post("/api/v1/endpoints", json={"name": "routed", "source_kind": "routes", "model_version_id": 999,
                                               "routes": routes})
    assert r.status_code == 400
    assert "does not exist" in r.json["errors"]["model_version_id"]
    assert count_endpoints(app) == 0


def test_api_routes_are_stored_normalized(app, client):
    routes = [{"path": "/add", "file": "arith.py", "function": "add", "params": [{"name": "a", "type": "int"}]}]
    r = client.post("/api/v1/endpoints", json={"name": "routed", "source_kind": "routes",
                                               "git_url": "https://example.invalid/repo.git", "git_ref": "main",
                                               "routes": routes})
    assert r.status_code in (201, 503), r.json  # 503: saved, Temporal unreachable in this test
    stored = client.get("/api/v1/endpoints/routed").json["routes"][0]
    assert stored["method"] == "POST" and stored["call"] == "keyword" and stored["params"][0]["required"] is True
