"""A secret environment value, end to end in the user's world (`app.py up`, tests/user_world.py):
it reaches its instance's environment, and nothing else ever holds it in plain text: no API
answer, no page, no event, no log line of any part, no workflow history, not the database file
(README.md "Secrets at rest")."""
from __future__ import annotations

import base64
import json
import secrets as token_source

import pytest
from temporalio.client import Client

from common.db import Database
from common.models import Instance
from tests.user_world import unique

pytestmark = pytest.mark.timeout(240)


def _payload_texts(history_json: dict) -> str:
    """A history as text with every payload decoded (payloads are base64 in the JSON)."""
    texts = [json.dumps(history_json)]

    def walk(value):
        if isinstance(value, dict):
            if "data" in value and isinstance(value["data"], str) and "metadata" in value:
                try:
                    texts.append(base64.b64decode(value["data"]).decode("utf-8", "replace"))
                except ValueError:
                    pass
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)
    walk(history_json)
    return "\n".join(texts)


def test_a_secret_reaches_its_instance_and_nothing_else(user, temporal_server, runner):
    name = unique("secretive")
    secret = "sv-" + token_source.token_hex(12)
    created = user.create({"name": name, "start_command": "python -m http.server $PORT",
                           "env": [{"key": "MODE", "value": "plain-visible"},
                                   {"key": "HF_TOKEN", "value": secret, "secret": True}]})
    assert created["env"][1] == {"key": "HF_TOKEN", "value": None, "secret": True}
    user.wait_status(name, "standby")
    woke = user.api("POST", f"/endpoints/{name}/wake?wait=true")
    assert woke.status_code == 200, woke.text
    assert user.call(name, "/").status_code == 200
    # The same secret sent again is not a change (the web app compares without opening it).
    again = user.api("PATCH", f"/endpoints/{name}", json={"env": [{"key": "MODE", "value": "plain-visible"},
                                                                 {"key": "HF_TOKEN", "value": secret, "secret": True}]})
    assert again.status_code == 200 and again.json()["changes"] == [], again.text

    # It is in the instance's environment: the one place it belongs.
    data = user.tmp_path / "data"
    database = Database(f"sqlite:///{data / 'standby.db'}")
    try:
        with database.session() as session:
            instance = session.query(Instance).filter(Instance.id == woke.json()["instance_id"]).one()
            pid, instance_id = instance.pid, instance.id
    finally:
        database.engine.dispose()
    with open(f"/proc/{pid}/environ", "rb") as handle:
        assert f"HF_TOKEN={secret}".encode() in handle.read().split(b"\0")

    seen: dict[str, str] = {}
    for path in ("/endpoints", f"/endpoints/{name}", f"/endpoints/{name}/instances", f"/endpoints/{name}/events",
                 f"/endpoints/{name}/logs?lines=5000", f"/endpoints/{name}/workflow", f"/endpoints/{name}/audit",
                 f"/endpoints/{name}/keys", "/audit", "/projects/default"):
        answer = user.api("GET", path)
        assert answer.status_code == 200, (path, answer.text)
        seen[f"API {path}"] = answer.text
    browser = user.browser()
    for path in ("/endpoints", f"/endpoints/{name}", f"/endpoints/{name}/panel", f"/endpoints/{name}/edit",
                 "/audit", "/projects/default"):
        answer = browser.get(f"{user.web}{path}", timeout=30)
        assert answer.status_code == 200, path
        seen[f"page {path}"] = answer.text
    assert "plain-visible" in seen[f"page /endpoints/{name}"]  # what is not secret is shown
    for log in [user.log_path, *sorted((data / "logs").glob("*.log"))]:
        seen[f"log {log.name}"] = log.read_text(errors="replace")
    client = runner.run(Client.connect(temporal_server))
    for workflow_id in (f"endpoint-{name}", f"endpoint-{name}-instance-{instance_id}",
                        f"pool-{user.env['STANDBY_POOL']}"):
        history = runner.run(client.get_workflow_handle(workflow_id).fetch_history())
        seen[f"history {workflow_id}"] = _payload_texts(json.loads(history.to_json()))
    for stored in sorted(data.glob("standby.db*")):  # the database at rest, its WAL included
        seen[f"file {stored.name}"] = stored.read_bytes().decode("latin-1")
    leaks = [where for where, text in seen.items() if secret in text]
    assert leaks == [], f"the secret value appears in: {leaks}"
    assert any("HF_TOKEN" in text for where, text in seen.items() if where.startswith("file")), \
        "the variable itself is stored (only its value is sealed)"
    user.api("POST", f"/endpoints/{name}/stop")
