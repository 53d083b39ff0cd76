"""The UI flow and the API around it, with Temporal unreachable (closed port) and rows written
as the worker would write them. End-to-end tests with a real Temporal live elsewhere."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from common.models import FAILED, RUNNING, STOPPED, Endpoint, Instance
from tests.conftest import plain_env
from tests.test_webapp_validation import FORM_VALID, VALID, count_endpoints
from webapp.extensions import db

SECRET = "s3cr3t-value-never-shown"


def csrf_token(page: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)


def draft_token(page: str) -> str:
    return re.search(r'name="draft"[^>]*value="([^"]+)"', page).group(1)


def create_via_api(client, **overrides):
    body = {**VALID, "env": [{"key": "MODE", "value": "fast"}, {"key": "HF_TOKEN", "value": SECRET, "secret": True}]}
    response = client.post("/api/v1/endpoints", json={**body, **overrides})
    assert response.status_code == 503, response.get_json()  # created; the workflow could not start
    return response.get_json()["endpoint"]


def set_status(app, name, status, **fields):
    """Write observed state the way a worker activity would."""
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint).where(Endpoint.name == name))
        endpoint.status = status
        for key, value in fields.items():
            setattr(endpoint, key, value)
        db.session.commit()


@pytest.mark.parametrize("path", [
    "/endpoints/new", "/endpoints/new/confirm", "/endpoints/new/back", "/endpoints/tts/edit",
    "/endpoints/tts/action/stop", "/endpoints/tts/terminate", "/endpoints/tts/keys",
    "/endpoints/tts/keys/1/revoke",
])
def test_ui_posts_need_csrf(app, client, path):
    create_via_api(client)
    response = client.post(path, data={**FORM_VALID, "confirm_name": "tts"})
    assert response.status_code == 400
    assert "CSRF" in response.get_data(as_text=True)


def test_api_needs_no_csrf(client):
    assert client.post("/api/v1/endpoints", json=VALID).status_code == 503  # not 400


def test_review_then_confirm_creates(app, client):
    page = client.get("/endpoints/new").get_data(as_text=True)
    data = {**FORM_VALID, "csrf_token": csrf_token(page), "env_plain": "MODE=fast", "env_secret": f"HF_TOKEN={SECRET}"}
    review = client.post("/endpoints/new", data=data)
    assert review.status_code == 200
    text = review.get_data(as_text=True)
    assert "Review: tts" in text and "python -m http.server $PORT" in text and "MODE=fast" in text
    assert "HF_TOKEN=••••" in text and SECRET not in text
    assert count_endpoints(app) == 0  # nothing until confirm

    back = client.post("/endpoints/new/back", data={"csrf_token": csrf_token(text), "draft": draft_token(text)})
    assert "HF_TOKEN=••••" in back.get_data(as_text=True) and SECRET not in back.get_data(as_text=True)

    done = client.post("/endpoints/new/confirm", data={"csrf_token": csrf_token(text), "draft": draft_token(text)})
    assert done.status_code == 302 and done.headers["Location"].endswith("/endpoints/tts")
    detail = client.get("/endpoints/tts").get_data(as_text=True)
    assert "Temporal is not reachable at 127.0.0.1:" in detail  # flashed; the row is kept
    assert SECRET not in detail and "HF_TOKEN=••••" in detail
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint))
        assert SECRET not in str(endpoint.env)  # sealed at rest (README.md "Secrets at rest")
        assert plain_env(app, endpoint.env) == [{"key": "MODE", "value": "fast", "secret": False},
                                                {"key": "HF_TOKEN", "value": SECRET, "secret": True}]
    # A second confirm of the same draft creates nothing more.
    again = client.post("/endpoints/new/confirm", data={"csrf_token": csrf_token(text), "draft": draft_token(text)})
    assert again.status_code == 302 and count_endpoints(app) == 1


def test_secrets_never_shown_back(app, client):
    created = create_via_api(client)
    assert {"key": "HF_TOKEN", "value": None, "secret": True} in created["env"]
    for path in ("/api/v1/endpoints", "/api/v1/endpoints/tts", "/endpoints", "/endpoints/tts",
                 "/endpoints/tts/edit", "/endpoints/tts/panel"):
        assert SECRET not in client.get(path).get_data(as_text=True), path


def test_edit_keeps_masked_secret_and_name_disk_are_immutable(app, client):
    create_via_api(client)
    page = client.get("/endpoints/tts/edit").get_data(as_text=True)
    assert "HF_TOKEN=••••" in page
    assert re.search(r'<input[^>]*disabled[^>]*name="name"|<input[^>]*name="name"[^>]*disabled', page)
    data = {**FORM_VALID, "csrf_token": csrf_token(page), "env_plain": "MODE=slow",
            "env_secret": "HF_TOKEN=••••", "name": "renamed", "disk_gb": "99", "max_instances": "3"}
    response = client.post("/endpoints/tts/edit", data=data)
    assert response.status_code == 302
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint))
        assert (endpoint.name, endpoint.disk_gb, endpoint.max_instances) == ("tts", 10, 3)
        assert {"key": "HF_TOKEN", "value": SECRET, "secret": True} in plain_env(app, endpoint.env)
        assert {"key": "MODE", "value": "slow", "secret": False} in endpoint.env


def test_patch_immutable_fields_and_secret_kept(app, client):
    create_via_api(client)
    for field, value in (("name", "other"), ("disk_gb", 20)):
        response = client.patch("/api/v1/endpoints/tts", json={field: value})
        assert response.status_code == 400
        assert "cannot be changed" in response.get_json()["errors"][field]
    # Same values are fine; an env update that omits the secret's value keeps it.
    response = client.patch("/api/v1/endpoints/tts", json={
        "name": "tts", "disk_gb": 10, "max_instances": 2,
        "env": [{"key": "HF_TOKEN", "secret": True}, {"key": "MODE", "value": "slow"}],
    })
    assert response.status_code == 503  # written, but the workflow could not be told
    assert response.get_json()["endpoint"]["max_instances"] == 2
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint))
        assert endpoint.max_instances == 2
        assert {"key": "HF_TOKEN", "value": SECRET, "secret": True} in plain_env(app, endpoint.env)


def test_unknown_endpoint_is_json_404(client):
    for method, path in (("get", "/api/v1/endpoints/nope"), ("post", "/api/v1/endpoints/nope/stop"),
                         ("get", "/api/v1/endpoints/nope/logs"), ("get", "/api/v1/nothing-here")):
        response = getattr(client, method)(path)
        assert response.status_code == 404
        assert "error" in response.get_json()
    assert client.get("/endpoints/nope").status_code == 404
    assert client.delete("/api/v1/endpoints").status_code == 405
    assert client.delete("/api/v1/endpoints").get_json()["error"]


@pytest.mark.parametrize("action", ["stop", "restart", "terminate", "wake", "scale-out"])
def test_actions_answer_503_when_temporal_is_down(app, client, action):
    create_via_api(client)
    set_status(app, "tts", RUNNING)
    response = client.post(f"/api/v1/endpoints/tts/{action}")
    assert response.status_code == 503
    assert "Temporal is not reachable at 127.0.0.1:" in response.get_json()["error"]
    assert client.get("/api/v1/endpoints/tts").status_code == 200  # the spec row is not lost


def test_failed_endpoint_only_terminates(app, client):
    create_via_api(client)
    set_status(app, "tts", FAILED, status_reason="readiness probe timed out")
    for action in ("stop", "restart", "wake", "scale-out"):
        response = client.post(f"/api/v1/endpoints/tts/{action}")
        assert response.status_code == 409
        assert "can only be terminated" in response.get_json()["error"]
    assert client.post("/api/v1/endpoints/tts/terminate").status_code == 503  # allowed; Temporal down
    page = client.get("/endpoints/tts").get_data(as_text=True)
    assert "Terminate" in page and ">Stop<" not in page and ">Wake<" not in page


def test_stopped_endpoint_refuses_stop_and_wake_and_shows_purge(app, client):
    from datetime import datetime, timezone

    create_via_api(client)
    set_status(app, "tts", STOPPED, purge_at=datetime(2031, 1, 2, 3, 4, tzinfo=timezone.utc))
    assert client.post("/api/v1/endpoints/tts/stop").status_code == 409
    assert "restart it first" in client.post("/api/v1/endpoints/tts/wake").get_json()["error"]
    assert "Purged automatically at 2031-01-02 03:04:00 UTC" in client.get("/endpoints/tts").get_data(as_text=True)
    assert client.get("/api/v1/endpoints/tts").get_json()["purge_at"].startswith("2031-01-02T03:04:00")


def test_terminate_needs_the_name_typed(app, client):
    create_via_api(client)
    page = client.get("/endpoints/tts/terminate").get_data(as_text=True)
    wrong = client.post("/endpoints/tts/terminate", data={"csrf_token": csrf_token(page), "confirm_name": "tt"})
    assert wrong.status_code == 400 and "Type tts exactly" in wrong.get_data(as_text=True)
    right = client.post("/endpoints/tts/terminate", data={"csrf_token": csrf_token(page), "confirm_name": "tts"})
    assert right.status_code == 302
    assert "Temporal is not reachable" in client.get("/endpoints/tts").get_data(as_text=True)


def test_detail_shows_connect_panel_instances_and_logs_newest_first(app, client, tmp_path):
    create_via_api(client)
    older, newer = tmp_path / "a.log", tmp_path / "b.log"
    older.write_text("old 1\nold 2\n")
    newer.write_text("".join(f"line {n}\n" for n in range(1, 6)))
    from datetime import datetime, timezone

    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint))
        db.session.add_all([
            Instance(id="aaaaaaaa", endpoint_id=endpoint.id, status="stopped", log_path=str(older),
                     created_at=datetime(2030, 1, 1, tzinfo=timezone.utc), gpu_seconds=12.5),
            Instance(id="xykemlvy", endpoint_id=endpoint.id, status="ready", host="box", address="127.0.0.1:4000",
                     log_path=str(newer), created_at=datetime(2030, 1, 2, tzinfo=timezone.utc)),
        ])
        db.session.commit()
    page = client.get("/endpoints/tts").get_data(as_text=True)
    assert "http://127.0.0.1:8000/e/tts/" in page and "curl http://127.0.0.1:8000/e/tts/" in page
    assert "xykemlvy" in client.get("/endpoints/tts/panel").get_data(as_text=True)

    lines = client.get("/api/v1/endpoints/tts/logs?lines=3").get_json()["lines"]
    assert [l["line"] for l in lines] == ["line 5", "line 4", "line 3"]
    lines = client.get("/api/v1/endpoints/tts/logs?instance=aaaaaaaa").get_json()["lines"]
    assert [l["line"] for l in lines] == ["old 2", "old 1"]
    assert [l["line"] for l in client.get("/api/v1/endpoints/tts/logs").get_json()["lines"]][-1] == "old 1"
    assert client.get("/api/v1/endpoints/tts/logs?lines=zero").status_code == 400
    assert client.get("/api/v1/endpoints/tts/logs?instance=nobody").status_code == 404

    body = client.get("/api/v1/endpoints/tts").get_json()
    assert body["usage"]["gpu_seconds"] == 12.5 and body["usage"]["cost"] == 0  # never ready: not billed
    assert [i["id"] for i in body["instances"]] == ["xykemlvy", "aaaaaaaa"]
    assert body["instances"][0]["address"] == "127.0.0.1:4000"
    assert client.get("/api/v1/endpoints/tts/instances").get_json()["instances"][0]["id"] == "xykemlvy"
    assert client.get("/api/v1/endpoints/tts/events").get_json() == {"events": []}
