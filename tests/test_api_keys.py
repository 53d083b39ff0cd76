"""Endpoint API keys: created once, listed by prefix, stored as SHA-256, revocable (API and UI)."""
from __future__ import annotations

import hashlib
import re

import pytest
from sqlalchemy import select

from common.models import ApiKey
from tests.test_webapp_ui import create_via_api, csrf_token
from webapp.extensions import db


@pytest.fixture
def client(app):
    client = app.test_client()
    create_via_api(client)
    return client


def stored_keys(app) -> list[ApiKey]:
    with app.app_context():
        return list(db.session.scalars(select(ApiKey)))


def test_create_list_revoke_via_api(app, client):
    response = client.post("/api/v1/endpoints/tts/keys", json={"name": "ci"})
    assert response.status_code == 201
    created = response.get_json()
    key = created["key"]
    assert key.startswith("sk-") and len(key) > 40
    assert created["prefix"] == key[:8] and created["name"] == "ci"

    [row] = stored_keys(app)
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in (row.key_hash, row.prefix, row.name)

    listed = client.get("/api/v1/endpoints/tts/keys").get_json()["keys"]
    assert listed == [{"id": created["id"], "name": "ci", "prefix": key[:8], "created_at": created["created_at"]}]
    assert key not in client.get("/api/v1/endpoints/tts/keys").get_data(as_text=True)
    assert client.get("/api/v1/endpoints/tts").get_json()["has_api_keys"] is True

    assert client.delete(f"/api/v1/endpoints/tts/keys/{created['id']}").get_json() == {"revoked": created["id"]}
    assert client.get("/api/v1/endpoints/tts/keys").get_json() == {"keys": []}
    assert stored_keys(app)[0].revoked_at is not None
    assert client.delete(f"/api/v1/endpoints/tts/keys/{created['id']}").status_code == 404
    assert client.get("/api/v1/endpoints/tts").get_json()["has_api_keys"] is False


def test_keys_are_distinct_and_name_is_optional(client):
    first = client.post("/api/v1/endpoints/tts/keys").get_json()
    second = client.post("/api/v1/endpoints/tts/keys", json={}).get_json()
    assert first["key"] != second["key"] and first["name"] == ""


def test_bad_key_requests(client):
    response = client.post("/api/v1/endpoints/tts/keys", json={"name": "x" * 65})
    assert response.status_code == 400 and "at most 64" in response.get_json()["errors"]["name"]
    assert client.post("/api/v1/endpoints/nope/keys", json={}).status_code == 404
    assert client.delete("/api/v1/endpoints/tts/keys/999").status_code == 404


def test_key_of_another_endpoint_cannot_be_revoked_through_this_one(app, client):
    create_via_api(client, name="other")
    key_id = client.post("/api/v1/endpoints/other/keys").get_json()["id"]
    assert client.delete(f"/api/v1/endpoints/tts/keys/{key_id}").status_code == 404
    assert stored_keys(app)[0].revoked_at is None


def test_ui_shows_key_once_and_curl_needs_it(app, client):
    page = client.get("/endpoints/tts").get_data(as_text=True)
    assert "Authorization" not in page  # no keys: open endpoint
    response = client.post("/endpoints/tts/keys", data={"csrf_token": csrf_token(page), "key_name": "laptop"})
    assert response.status_code == 200
    shown = response.get_data(as_text=True)
    [row] = stored_keys(app)
    key = re.search(r'id="new-key">(sk-[A-Za-z0-9_-]+)</pre>', shown).group(1)
    assert hashlib.sha256(key.encode()).hexdigest() == row.key_hash
    assert "shown only once" in shown

    detail = client.get("/endpoints/tts").get_data(as_text=True)
    assert key not in detail and row.prefix in detail and "laptop" in detail
    assert 'curl -H "Authorization: Bearer &lt;your key&gt;"' in detail

    revoked = client.post(f"/endpoints/tts/keys/{row.id}/revoke", data={"csrf_token": csrf_token(detail)})
    assert revoked.status_code == 302
    assert stored_keys(app)[0].revoked_at is not None
    assert "Authorization" not in client.get("/endpoints/tts").get_data(as_text=True)
