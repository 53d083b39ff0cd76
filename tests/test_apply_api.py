"""`POST /api/v1/apply` (README.md "Spec files"): a whole spec creates or updates its endpoint,
idempotently, by the same edit rules as PATCH, answering what it did and the changes; a field the
spec leaves out goes back to its default; ?dry_run=true changes nothing. Temporal is a recording
stand-in (tests/conftest.py RecordingBridge): what the views ask of it is checked, not run."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from common.models import Endpoint, Instance
from common.spec_files import dump_spec, file_spec, read_specs
from tests.conftest import RecordingBridge, plain_env, web_app
from webapp.extensions import db

pytestmark = pytest.mark.timeout(120)
SPEC = {"name": "tts", "start_command": "python -m http.server $PORT", "max_instances": 2}


@pytest.fixture
def bridge():
    return RecordingBridge()


@pytest.fixture
def app(tmp_path, bridge):
    yield from web_app(tmp_path, bridge=bridge)


def apply(client, spec, query=""):
    return client.post(f"/api/v1/apply{query}", json=spec)


def stored(app, name="tts") -> Endpoint | None:
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint).where(Endpoint.name == name))
        if endpoint is not None:
            db.session.expunge(endpoint)
        return endpoint


def set_status(app, status: str, instance: str | None = None) -> None:
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint).where(Endpoint.name == "tts"))
        endpoint.status = status
        if instance:
            db.session.add(Instance(id=instance, endpoint_id=endpoint.id, status="ready"))
        db.session.commit()


def test_a_new_spec_creates_the_endpoint_and_lists_what_it_sets(client, bridge):
    response = apply(client, SPEC)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["action"] == "created" and body["dry_run"] is False and body["saved"] is True
    assert body["endpoint"]["name"] == "tts" and body["endpoint"]["max_instances"] == 2
    assert body["changes"] == [
        {"field": "name", "edit": "immutable", "from": None, "to": "tts"},
        {"field": "start_command", "edit": "restart", "from": None, "to": SPEC["start_command"]},
        {"field": "max_instances", "edit": "live", "from": None, "to": 2},
    ]
    assert bridge.calls == [("start", "tts")]


def test_applying_the_same_spec_again_changes_nothing(app, client, bridge):
    apply(client, SPEC)
    before = stored(app).spec_updated_at
    again = apply(client, SPEC)
    assert again.status_code == 200
    assert again.get_json()["action"] == "unchanged" and again.get_json()["changes"] == []
    assert bridge.calls == [("start", "tts")] and stored(app).spec_updated_at == before


@pytest.mark.parametrize("spelling", [
    {"gpu_type": "t4", "gpu_count": 1},  # stored as the host spells it: T4
    {"cpu_cores": 2, "memory_gb": "1.5", "sticky_sessions": "yes"},
    {"description": "  speech  ", "health_path": " /health"},
    {"env": [{"key": "MODE", "value": "fast", "secret": "false"}]},
])
def test_a_spec_applied_again_in_its_own_spelling_is_unchanged(client, spelling):
    assert apply(client, {**SPEC, **spelling}).status_code == 201
    assert apply(client, {**SPEC, **spelling}).get_json()["action"] == "unchanged"


def test_a_live_change_is_saved_and_the_workflow_told(app, client, bridge):
    apply(client, SPEC)
    response = apply(client, {**SPEC, "max_instances": 3})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["action"] == "updated" and body["saved"] is True and body["restarted"] is False
    assert body["changes"] == [{"field": "max_instances", "edit": "live", "from": 2, "to": 3}]
    assert body["endpoint"]["max_instances"] == 3 and stored(app).max_instances == 3
    assert bridge.calls[-1] == ("signal", "tts", "spec_changed")


def test_a_field_the_spec_leaves_out_goes_back_to_its_default(app, client):
    apply(client, {**SPEC, "description": "speech", "health_path": "/health"})
    response = apply(client, SPEC)
    assert {(c["field"], c["from"], c["to"]) for c in response.get_json()["changes"]} == {
        ("description", "speech", ""), ("health_path", "/health", "")}
    assert stored(app).description == "" and stored(app).health_path == ""


def test_an_immutable_change_is_refused_naming_it(app, client):
    apply(client, SPEC)
    response = apply(client, {**SPEC, "disk_gb": 20, "max_instances": 3})
    assert response.status_code == 400
    body = response.get_json()
    assert body["action"] == "refused" and body["saved"] is False
    assert body["errors"]["disk_gb"].startswith("disk_gb cannot be changed after creation; create a new endpoint")
    assert "disk_gb" in body["error"] and stored(app).max_instances == 2


def test_a_restart_class_change_while_instances_run_needs_restart(app, client, bridge):
    apply(client, SPEC)
    set_status(app, "running", instance="runs0001")
    changed = {**SPEC, "start_command": "python -m http.server $PORT --bind 127.0.0.1", "max_instances": 3}
    refused = apply(client, changed)
    assert refused.status_code == 409
    body = refused.get_json()
    assert body["action"] == "refused" and body["restart_required"] == ["start_command"]
    assert "?restart=true" in body["error"] and body["saved"] is False
    assert {c["field"]: c["edit"] for c in body["changes"]} == {"start_command": "restart", "max_instances": "live"}
    assert stored(app).max_instances == 2  # nothing saved, the live change neither

    confirmed = apply(client, changed, "?restart=true")
    assert confirmed.status_code == 200, confirmed.get_json()
    assert confirmed.get_json()["action"] == "updated" and confirmed.get_json()["restarted"] is True
    # What runs changed: a new revision, rolled out by a (rolling) update instead of a restart.
    assert bridge.calls[-2:] == [("signal", "tts", "spec_changed"), ("update", "tts", "deploy")]
    assert confirmed.get_json()["revision"] == 2 and confirmed.get_json()["strategy"] == "rolling"


def test_a_dry_run_answers_the_same_and_changes_nothing(app, client, bridge):
    preview = apply(client, SPEC, "?dry_run=true")
    assert preview.status_code == 200
    assert preview.get_json()["action"] == "created" and preview.get_json()["dry_run"] is True
    assert preview.get_json()["endpoint"] is None and len(preview.get_json()["changes"]) == 3
    assert stored(app) is None and bridge.calls == []

    apply(client, SPEC)
    set_status(app, "running", instance="runs0001")
    update = apply(client, {**SPEC, "max_instances": 3}, "?dry_run=true")
    assert update.get_json()["action"] == "updated" and update.get_json()["saved"] is False
    assert update.get_json()["changes"] == [{"field": "max_instances", "edit": "live", "from": 2, "to": 3}]
    restart = apply(client, {**SPEC, "port": 9000}, "?dry_run=true")
    assert restart.status_code == 409 and restart.get_json()["restart_required"] == ["port"]
    assert apply(client, {**SPEC, "port": 9000}, "?dry_run=true&restart=true").get_json()["restarted"] is False
    assert stored(app).max_instances == 2 and stored(app).port == 8080
    assert bridge.calls == [("start", "tts")]


def test_a_secret_without_a_value_keeps_the_stored_one(app, client):
    secret = {**SPEC, "env": [{"key": "MODE", "value": "fast"}, {"key": "TOKEN", "value": "s3cret", "secret": True}]}
    created = apply(client, secret).get_json()
    assert {c["field"]: c["to"] for c in created["changes"]}["env"][1] == {"key": "TOKEN", "value": None,
                                                                           "secret": True}
    kept = {**SPEC, "env": [{"key": "MODE", "value": "fast"}, {"key": "TOKEN", "secret": True}]}
    assert apply(client, kept).get_json()["action"] == "unchanged"
    assert plain_env(app, stored(app).env)[1] == {"key": "TOKEN", "value": "s3cret", "secret": True}

    rotated = apply(client, {**SPEC, "env": [{"key": "TOKEN", "value": "n3w", "secret": True}]}).get_json()
    assert rotated["action"] == "updated"
    assert rotated["changes"][0]["to"] == [{"key": "TOKEN", "value": None, "secret": True}]  # masked
    assert "n3w" not in str(rotated) and plain_env(app, stored(app).env) == [{"key": "TOKEN", "value": "n3w",
                                                                              "secret": True}]
    # The same value sent again is the same sealed value: nothing changes.
    again = apply(client, {**SPEC, "env": [{"key": "TOKEN", "value": "n3w", "secret": True}]}).get_json()
    assert again["action"] == "unchanged", again
    assert apply(client, SPEC).get_json()["action"] == "updated" and stored(app).env == []


def test_a_new_secret_needs_its_value(client):
    response = apply(client, {**SPEC, "env": [{"key": "TOKEN", "secret": True}]})
    assert response.status_code == 400 and response.get_json()["action"] == "refused"
    assert response.get_json()["errors"]["env"] == "env: TOKEN: a new secret needs a value"


def test_a_terminated_endpoint_is_created_anew(app, client, bridge):
    apply(client, {**SPEC, "disk_gb": 20})
    set_status(app, "terminated")
    response = apply(client, SPEC)
    assert response.status_code == 201 and response.get_json()["action"] == "created"
    assert stored(app).disk_gb == 10 and stored(app).status != "terminated"


def test_a_failed_endpoint_is_only_unchanged(app, client):
    apply(client, SPEC)
    set_status(app, "failed")
    assert apply(client, SPEC).get_json()["action"] == "unchanged"
    refused = apply(client, {**SPEC, "max_instances": 3})
    assert refused.status_code == 409 and refused.get_json()["action"] == "refused"
    assert "can only be terminated" in refused.get_json()["error"] and stored(app).max_instances == 2


@pytest.mark.parametrize("body, field, message", [
    ({"name": "tts", "start_command": "x", "replicas": 2}, "unknown_fields", "unknown fields: replicas; allowed: name"),
    ({"start_command": "x"}, "name", "name is required"),
    ({"name": "tts", "start_command": "x", "cpu_cores": "NaN"}, "cpu_cores", "must be a finite number"),
])
def test_a_bad_spec_is_refused_saying_what_to_change(client, body, field, message):
    response = apply(client, body)
    assert response.status_code == 400 and response.get_json()["action"] == "refused"
    assert message in response.get_json()["errors"][field]


def test_a_body_that_is_not_a_spec_is_refused(client):
    response = client.post("/api/v1/apply", json=[SPEC])
    assert response.status_code == 400 and response.get_json()["action"] == "refused"
    assert "a whole endpoint spec" in response.get_json()["error"]


@pytest.mark.parametrize("spec", [
    {**SPEC, "description": "Speech\nsynthesis", "environment": "staging", "gpu_type": "t4", "gpu_count": 1,
     "cpu_cores": 2, "memory_gb": 0.5, "disk_gb": 20, "min_instances": 1, "idle_retention_seconds": 60,
     "health_path": "/health", "balancing": "ip_hash", "sticky_sessions": True, "max_concurrency": 4,
     "env": [{"key": "MODE", "value": "fast"}, {"key": "TOKEN", "value": "s3cret", "secret": True}]},
    {"name": "tts", "source_kind": "routes", "git_url": "https://example.com/m.git", "git_ref": "main",
     "routes": [{"method": "POST", "path": "/add", "file": "a.py", "function": "add",
                 "params": [{"name": "a", "type": "int", "ge": 0}]}]},
])
@pytest.mark.parametrize("output", ["yaml", "json"])
def test_a_written_spec_applies_unchanged(client, spec, output):
    apply(client, spec)
    answer = client.get("/api/v1/endpoints/tts").get_json()
    [written] = read_specs(dump_spec(file_spec(answer), output), "tts", as_json=output == "json")
    response = apply(client, written)
    assert response.get_json()["action"] == "unchanged", response.get_json()
