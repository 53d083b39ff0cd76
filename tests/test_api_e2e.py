"""The JSON API and the Temporal CLI against a real Temporal server, worker and instances."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests

from tests.conftest import temporal_bin, wait_until, with_admin
from tests.openapi_contract import ContractClient

pytestmark = pytest.mark.timeout(180)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def api(stack):
    from webapp import create_app

    app = with_admin(create_app({"TESTING": True, "STANDBY_SETTINGS": stack.settings, "SECRET_KEY": "test"}))
    app.test_client_class = ContractClient  # every answer checked against the OpenAPI document
    with app.test_client() as client:
        yield client


def server_spec(name: str, **extra) -> dict:
    spec = {"name": name, "start_command": f"{sys.executable} -m http.server $PORT --bind 127.0.0.1",
            "port": 8080, "health_path": "/", "idle_retention_seconds": 3600, "startup_timeout_seconds": 30,
            "health_interval_seconds": 1}
    spec.update(extra)
    return spec


def test_api_lifecycle(stack, api):
    r = api.post("/api/v1/endpoints", json=server_spec(
        "api-one", env=[{"key": "TOKEN", "value": "s3cret", "secret": True}, {"key": "MODE", "value": "x"}]))
    assert r.status_code == 201, r.json
    assert r.json["url"].endswith("/e/api-one/")
    stack.wait_status("api-one", "standby")
    body = api.get("/api/v1/endpoints/api-one").json
    assert body["status"] == "standby"
    assert {"key": "TOKEN", "value": None, "secret": True} in body["env"]
    assert "s3cret" not in json.dumps(body)

    woke = api.post("/api/v1/endpoints/api-one/wake?wait=true")
    assert woke.status_code == 200, woke.json
    iid = woke.json["instance_id"]
    inst = api.get("/api/v1/endpoints/api-one/instances").json["instances"][0]
    assert inst["id"] == iid and inst["status"] == "ready"
    assert requests.get(f"http://{inst['address']}/", timeout=5).status_code == 200
    # The secret reached the instance's environment (and only there).
    pid = inst.get("pid") or stack.instances("api-one")[0].pid
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert b"TOKEN=s3cret" in environ and b"MODE=x" in environ

    wait_until(lambda: api.get("/api/v1/endpoints/api-one").json["status"] == "running", 10)
    events = api.get("/api/v1/endpoints/api-one/events").json["events"]
    assert events[0]["kind"]  # newest first
    assert any(e["kind"] == "instance_ready" for e in events)
    logs = api.get("/api/v1/endpoints/api-one/logs").json["lines"]
    assert any("started on" in line["line"] for line in logs)

    # The workflow's own view, through the API (the `status` query).
    live = api.get("/api/v1/endpoints/api-one/workflow").json
    assert live["workflow_id"] == "endpoint-api-one"
    assert live["state"]["desired"] == "serving" and live["state"]["instances"][0]["id"] == iid

    # Scale-out up to max instances (1): quota exceeded -> 1007.
    r = api.post("/api/v1/endpoints/api-one/scale-out")
    assert r.status_code == 409 and r.json["code"] == 1007

    assert api.post("/api/v1/endpoints/api-one/stop").status_code == 202
    stack.wait_status("api-one", "stopped", 30)
    got = api.get("/api/v1/endpoints/api-one").json
    assert got["purge_at"] and got["stopped_at"]
    assert api.post("/api/v1/endpoints/api-one/stop").status_code == 409

    assert api.post("/api/v1/endpoints/api-one/restart").status_code == 202
    stack.wait_status("api-one", "standby", 30)
    assert api.post("/api/v1/endpoints/api-one/terminate").status_code == 202
    stack.wait_status("api-one", "terminated", 30)
    assert api.get("/api/v1/endpoints/api-one/instances").json["instances"] == []
    # What only a running system answers matched the OpenAPI document too.
    action = "POST /api/v1/endpoints/{name}/{action}"
    assert {(action, 200), (action, 409), (action, 202), ("GET /api/v1/endpoints/{name}/workflow", 200),
            ("POST /api/v1/endpoints", 201)} <= api.checked


def test_temporal_cli_drives_the_endpoint(stack, api):
    """Operators use the Temporal CLI; the API/UI agree within a second or two."""
    assert api.post("/api/v1/endpoints", json=server_spec("cli-one", min_instances=1)).status_code == 201
    stack.wait_status("cli-one", "running", 40)
    base = [temporal_bin(), "workflow", "--address", stack.settings.temporal_target]
    out = subprocess.run(base + ["query", "--workflow-id", "endpoint-cli-one", "--type", "status", "-o", "json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert '"status": "running"' in out.stdout.replace('":"', '": "') or '"running"' in out.stdout

    subprocess.run(base + ["signal", "--workflow-id", "endpoint-cli-one", "--name", "stop"], check=True,
                   capture_output=True, timeout=30)
    stack.wait_status("cli-one", "stopped", 30)
    assert api.get("/api/v1/endpoints/cli-one").json["status"] == "stopped"
    subprocess.run(base + ["signal", "--workflow-id", "endpoint-cli-one", "--name", "restart"], check=True,
                   capture_output=True, timeout=30)
    stack.wait_status("cli-one", "running", 40)
    subprocess.run(base + ["signal", "--workflow-id", "endpoint-cli-one", "--name", "terminate"], check=True,
                   capture_output=True, timeout=30)
    stack.wait_status("cli-one", "terminated", 30)


def _archive(directory: Path, drop: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            if path.name != drop:
                tar.add(path, arcname=path.name)
    return buf.getvalue()


def _routes_endpoint(api, name: str, archive: bytes, routes: list) -> None:
    assert api.post("/api/v1/models", json={"name": f"{name}-model"}).status_code == 201
    r = api.post(f"/api/v1/models/{name}-model/versions",
                 data={"archive": (io.BytesIO(archive), "code.tar.gz")}, content_type="multipart/form-data")
    assert r.status_code == 201, r.json
    version_id = r.json["id"]
    r = api.post("/api/v1/endpoints", json={
        "name": name, "source_kind": "routes", "model_version_id": version_id, "routes": routes,
        "idle_retention_seconds": 3600, "startup_timeout_seconds": 60, "health_interval_seconds": 1})
    assert r.status_code == 201, r.json


def test_routes_endpoint_serves_model_code(stack, api):
    routes = json.loads((EXAMPLES / "arith" / "routes.json").read_text())
    _routes_endpoint(api, "arith", _archive(EXAMPLES / "arith"), routes)
    stack.wait_status("arith", "standby")
    woke = api.post("/api/v1/endpoints/arith/wake?wait=true")
    assert woke.status_code == 200, woke.json
    address = woke.json["address"]
    assert requests.post(f"http://{address}/add", json={"a": 2, "b": 3}, timeout=10).json() == {"sum": 5}
    r = requests.post(f"http://{address}/fail", json={}, timeout=10)
    assert r.status_code == 500 and "boom" in r.text


def test_routes_endpoint_missing_function_fails(stack, api):
    routes = [{"method": "POST", "path": "/nope", "file": "arith.py", "function": "does_not_exist",
               "params": []}]
    _routes_endpoint(api, "nofunc", _archive(EXAMPLES / "arith"), routes)
    stack.wait_status("nofunc", "standby")
    r = api.post("/api/v1/endpoints/nofunc/wake?wait=true")
    assert r.status_code >= 400
    e = stack.wait_status("nofunc", "failed", 60)
    assert "does_not_exist" in e.status_reason or "exit" in e.status_reason
    [inst] = stack.instances("nofunc")
    assert "does_not_exist" in open(inst.log_path).read()
    assert api.post("/api/v1/endpoints/nofunc/restart").status_code == 409
