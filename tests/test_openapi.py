"""The OpenAPI document of /api/v1 (webapp/openapi.py): valid OpenAPI 3.1, every route of the app in
it, the spec's schema derived from the declarations, and real answers, errors included, matching
it. Temporal is a closed port (actions answer their documented 503); rows the worker would write
are written directly. tests/test_api_contract.py runs schemathesis against the live app."""
from __future__ import annotations

import html
import io
import re

import pytest
import schemathesis
from sqlalchemy import select

from common.models import RUNNING, STOPPED, Endpoint, Host, Instance
from common.routes import PARAM_KEYS, ROUTE_KEYS
from common.spec_fields import NAMES, SPEC
from tests.conftest import add_user, anonymous_client, token_for
from tests.openapi_contract import ContractClient, check_answer
from webapp.extensions import db
from webapp.openapi import api_rules
SERVER = {"start_command": "python -m http.server $PORT"}


@pytest.fixture
def doc(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return response.get_json()


def test_the_document_is_valid_openapi_3_1(doc):
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema


def test_every_route_of_the_api_is_documented_and_nothing_else(app, doc):
    routes = {(path, method) for path, method, _, _ in api_rules(app)}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes - documented == set(), "routes missing from the OpenAPI document (webapp/openapi.py OPERATIONS)"
    assert documented - routes == set(), "documented operations that are not routes of the app"
    assert len(routes) >= 18  # the API and the model registry, not an empty map
    for path, method, _, arguments in api_rules(app):
        declared = [p["name"] for p in doc["paths"][path][method].get("parameters", []) if p["in"] == "path"]
        assert declared == arguments, (path, method)


def test_the_spec_schema_comes_from_the_declarations(doc):
    spec = doc["components"]["schemas"]["EndpointSpec"]
    assert list(spec["properties"]) == [f.name for f in SPEC] and spec["required"] == ["name"]
    assert spec["additionalProperties"] is False  # unknown fields are refused
    for f in SPEC:
        schema = spec["properties"][f.name]
        assert schema["x-edit-class"] == f.edit and schema["title"] == f.label, f.name
        assert schema.get("description", "") == f.help, f.name
        if f.name != "name":
            assert schema["default"] == f.default, f.name
        if f.choices:
            assert schema["enum"] == list(f.choices), f.name
        if f.max_length:
            assert (schema["items"] if f.kind == NAMES else schema)["maxLength"] == f.max_length, f.name
        if f.low is not None and f.name != "startup_timeout_seconds":
            assert schema["exclusiveMinimum" if f.above_low else "minimum"] == f.low and schema["maximum"] == f.high
    # The settings narrow the startup timeout a request may set (README.md "Spec limits").
    timeout = spec["properties"]["startup_timeout_seconds"]
    assert (timeout["minimum"], timeout["maximum"]) == (180, 7200)
    assert doc["components"]["schemas"]["Endpoint"]["properties"]["startup_timeout_seconds"]["minimum"] == 1


def test_the_route_template_schema_names_every_key(doc):
    route = doc["components"]["schemas"]["Route"]
    assert set(route["properties"]) == set(ROUTE_KEYS)
    assert set(route["properties"]["params"]["items"]["properties"]) == set(PARAM_KEYS)


class Contract:
    """Sends requests through a ContractClient, which checks each answer."""

    def __init__(self, app):
        app.test_client_class = ContractClient
        self.client = app.test_client()

    def __call__(self, method: str, path: str, expect: int, query: str = "", **kwargs):
        """`path` is the document's (/api/v1/endpoints/{name}); its parameters are keyword arguments."""
        arguments = {name: kwargs.pop(name) for name in re.findall(r"{(\w+)}", path)}
        response = self.client.open(path.format(**arguments) + query, method=method, **kwargs)
        assert response.status_code == expect, (method, path, arguments, response.get_json())
        return response.get_json()


def test_real_answers_match_the_document(app, doc):
    call = Contract(app)
    endpoints, one = "/api/v1/endpoints", "/api/v1/endpoints/{name}"
    action, logs = "/api/v1/endpoints/{name}/{action}", "/api/v1/endpoints/{name}/logs"
    created = call("POST", endpoints, 503, json={"name": "tts", **SERVER, "env": [
        {"key": "TOKEN", "value": "s", "secret": True}]})
    assert created["endpoint"]["env"][0]["value"] is None
    call("POST", endpoints, 400, json={"name": "Bad name", "port": 0})
    routed = call("POST", endpoints, 503, json={  # saved; identifiers of Python may be any letters
        "name": "routed", "source_kind": "routes", "git_url": "https://example.com/m.git", "git_ref": "main",
        "routes": [{"path": "/p", "file": "p.py", "function": "prédire", "params": [{"name": "é", "type": "str"}]}]})
    assert routed["endpoint"]["routes"][0]["method"] == "POST"  # stored normalized
    call("POST", endpoints, 400, data="{", content_type="application/json")
    call("POST", endpoints, 415, data="name=x", content_type="application/x-www-form-urlencoded")
    call("POST", endpoints, 403, json={"name": "x"}, headers={"Origin": "http://evil.example"})
    call("POST", endpoints, 413, data="[" + " " * (1024 * 1024) + "]", content_type="application/json")
    call("GET", endpoints, 200, query="?limit=1")
    call("GET", endpoints, 400, query="?cursor=nope")
    call("GET", endpoints, 400, headers={"Host": "elsewhere.example"})
    call("GET", endpoints, 414, query="?prefix=" + "a" * 5000)
    call("GET", one, 200, name="tts")
    call("GET", one, 404, name="nope")
    call("PATCH", one, 503, name="tts", json={"description": "spoken"})  # saved, the workflow not told
    call("PATCH", one, 400, name="tts", json={"disk_gb": 20})
    call("PATCH", one, 200, name="tts", json={})  # nothing to change
    # A server keeps nothing of a routes source: unchecked templates were stored and served back.
    refused = call("PATCH", one, 400, name="tts", json={"routes": [{"params": [{"regex": [1]}]}], "git_ref": "x"})
    assert set(refused["errors"]) == {"routes", "git_ref"} and "source_kind: routes" in refused["errors"]["routes"]
    call("POST", action, 503, name="tts", action="wake")
    call("POST", action, 404, name="tts", action="nope")
    call("GET", "/api/v1/endpoints/{name}/workflow", 503, name="tts")
    with app.app_context():  # what the worker writes: a running instance
        endpoint = db.session.scalar(select(Endpoint).where(Endpoint.name == "tts"))
        endpoint.status = RUNNING
        db.session.add(Instance(id="abcdefgh", endpoint_id=endpoint.id, status="ready", host="h",
                                address="127.0.0.1:1", gpus=[0], gpu_type="T4", gpu_seconds=2.5))
        db.session.commit()
    assert call("PATCH", one, 409, name="tts", json={"port": 9000})["restart_required"] == ["port"]
    assert call("GET", "/api/v1/endpoints/{name}/instances", 200, name="tts")["instances"][0]["id"] == "abcdefgh"
    call("GET", "/api/v1/endpoints/{name}/events", 200, name="tts")
    call("GET", logs, 200, name="tts", query="?lines=5")
    call("GET", logs, 400, name="tts", query="?lines=0")
    call("GET", logs, 404, name="tts", query="?instance=zz")
    log_file = "/api/v1/endpoints/{name}/logs/{instance_id}.log"
    call("GET", log_file, 200, name="tts", instance_id="abcdefgh")
    call("GET", log_file, 404, name="tts", instance_id="zz")
    call("GET", "/api/v1/endpoints/{name}/logs.tar.gz", 200, name="tts")
    metrics = "/api/v1/endpoints/{name}/metrics"
    assert len(call("GET", metrics, 200, name="tts")["t"]) == 60
    assert call("GET", metrics, 200, name="tts", query="?range=7d")["step_seconds"] == 3600
    call("GET", metrics, 400, name="tts", query="?range=1y")
    with app.app_context():
        db.session.scalar(select(Endpoint).where(Endpoint.name == "tts")).status = STOPPED
        db.session.commit()
    call("POST", action, 409, name="tts", action="wake")

    keys, key_path = "/api/v1/endpoints/{name}/keys", "/api/v1/endpoints/{name}/keys/{key_id}"
    key = call("POST", keys, 201, name="tts", json={"name": "ci"})
    call("POST", keys, 201, name="tts")  # no body: a key without a name
    call("POST", keys, 400, name="tts", json={"name": 7})
    call("GET", keys, 200, name="tts")
    call("DELETE", key_path, 200, name="tts", key_id=key["id"])
    call("DELETE", key_path, 404, name="tts", key_id=key["id"])
    call("DELETE", key_path, 404, name="tts", key_id=2**64)  # past any id: no row, not a driver overflow
    listed = call("GET", endpoints, 200)
    assert [e["has_api_keys"] for e in listed["endpoints"]] == [False, True] and listed["next"] is None

    versions, version = "/api/v1/models/{name}/versions", "/api/v1/models/{name}/versions/{number}"
    call("POST", "/api/v1/models", 201, json={"name": "arith", "description": "adds"})
    call("POST", "/api/v1/models", 400, json={"name": "arith"})
    call("POST", versions, 201, name="arith", json={"git_url": "https://example.com/m.git", "git_ref": "main"})
    call("POST", versions, 400, name="arith", json={"git_url": "ext::sh", "git_ref": "main"})
    call("POST", versions, 400, name="arith", data={"archive": (io.BytesIO(b"not an archive"), "m.zip")},
         content_type="multipart/form-data")
    call("POST", versions, 404, name="nope", json={"git_url": "https://example.com/m.git", "git_ref": "main"})
    call("GET", "/api/v1/models", 200)
    call("GET", "/api/v1/models/{name}", 200, name="arith")
    call("GET", version, 200, name="arith", number=1)
    call("GET", version, 404, name="arith", number=2)
    call("GET", version, 404, name="arith", number=10**30)
    call("GET", "/api/v1/openapi.json", 200)

    apply = "/api/v1/apply"
    assert call("POST", apply, 200, query="?dry_run=true", json={"name": "said", **SERVER})["action"] == "created"
    assert call("POST", apply, 400, json={"name": "said", "port": 0})["action"] == "refused"
    call("POST", apply, 400, data="[1]", content_type="application/json")
    call("POST", apply, 415, data="name=x", content_type="application/x-www-form-urlencoded")
    # "tts" exists and is stopped: its whole spec again is unchanged; a new description is saved.
    spec = {k: v for k, v in call("GET", one, 200, name="tts").items() if k in {f.name for f in SPEC}}
    assert call("POST", apply, 200, json=spec)["action"] == "unchanged"
    assert call("POST", apply, 200, query="?dry_run=true", json={**spec, "description": "x"})["action"] == "updated"
    call("POST", apply, 503, json={"name": "fresh", **SERVER})  # saved; Temporal is not here

    # Revisions and updates (README.md "Revisions and updates"); Temporal is not here: 503 once checked.
    revisions = call("GET", one + "/revisions", 200, name="tts")
    assert [r["number"] for r in revisions["revisions"]] == [1] and revisions["traffic"] == {"1": 100}
    assert "sum to 100" in call("PUT", one + "/traffic", 400, name="tts", json={"traffic": {"1": 60}})["error"]
    call("PUT", one + "/traffic", 503, name="tts", json={"traffic": {"1": 100}})
    call("POST", one + "/deploy", 400, name="tts", query="?strategy=sideways")
    call("POST", one + "/deploy", 503, name="tts", query="?revision=1")
    call("POST", one + "/rollback", 503, name="tts")
    call("POST", one + "/promote", 503, name="tts")
    call("POST", one + "/scale", 400, name="tts", json={"instance_count": 5})  # above max_instances
    call("POST", one + "/scale", 503, name="tts", json={"instance_count": 1})  # saved, the workflow not told

    with app.app_context():  # what a worker writes when it joins its pool (workers/host.py)
        db.session.add(Host(name="gpu-1", pool="default", task_queue="standby-host-gpu-1",
                            advertise_address="127.0.0.2", gpus=[{"type": "T4", "index": 0, "memory_mb": None}],
                            cpu_cores=8.0, memory_gb=32.0, disk_gb=100.0))
        db.session.commit()
    hosts = call("GET", "/api/v1/hosts", 200)["hosts"]
    assert [h["name"] for h in hosts] == ["gpu-1"] and hosts[0]["gpu_summary"] == {"T4": {"total": 1, "used": 0,
                                                                                         "free": 1}}
    call("POST", "/api/v1/hosts/{name}/{operation}", 503, name="gpu-1", operation="drain")
    call("POST", "/api/v1/hosts/{name}/{operation}", 404, name="nope", operation="drain")
    call("POST", "/api/v1/hosts/{name}/{operation}", 404, name="gpu-1", operation="reboot")

    # Accounts, projects, quotas and the audit log (README.md "Accounts and projects").
    call("GET", "/api/v1/me", 200)
    token = call("POST", "/api/v1/tokens", 201, json={"name": "laptop"})
    call("POST", "/api/v1/tokens", 400, json={"name": 7})
    assert token["id"] in [t["id"] for t in call("GET", "/api/v1/tokens", 200)["tokens"]]
    call("DELETE", "/api/v1/tokens/{token_id}", 200, token_id=token["id"])
    call("DELETE", "/api/v1/tokens/{token_id}", 404, token_id=token["id"])
    projects, project = "/api/v1/projects", "/api/v1/projects/{project}"
    call("POST", projects, 201, json={"name": "ml-team", "max_gpus": 2})
    call("POST", projects, 400, json={"name": "ml-team"})
    assert {p["name"] for p in call("GET", projects, 200)["projects"]} == {"default", "ml-team"}
    call("GET", project, 404, project="nope")
    assert call("PATCH", project, 200, project="ml-team", json={"max_endpoints": 1})["changes"] == {
        "max_endpoints": {"from": 20, "to": 1}}
    call("PATCH", project, 400, project="ml-team", json={"max_endpoints": -1})
    call("POST", "/api/v1/users", 201, json={"name": "ana", "project": "ml-team", "role": "viewer"})
    call("POST", "/api/v1/users", 400, json={"name": "ana"})
    call("GET", "/api/v1/users", 200)
    member = "/api/v1/projects/{project}/members/{user}"
    call("PUT", member, 200, project="ml-team", user="ana", json={"role": "developer"})
    call("PUT", member, 400, project="ml-team", user="ana", json={"role": "owner"})
    call("PUT", member, 404, project="ml-team", user="nobody", json={"role": "viewer"})
    assert {"user": "ana", "role": "developer"} in call("GET", project, 200, project="ml-team")["members"]
    call("POST", endpoints, 503, query="?project=ml-team", json={"name": "team-one", **SERVER})
    refused = call("POST", endpoints, 409, query="?project=ml-team", json={"name": "team-two", **SERVER})
    assert refused["quota"] == {"used": 1, "limit": 1, "stopped": 0, "failed": 0}
    call("POST", endpoints, 404, query="?project=nope", json={"name": "team-two", **SERVER})
    assert call("GET", "/api/v1/endpoints/{name}/audit", 200, name="tts")["entries"]
    assert call("GET", "/api/v1/audit", 200, query="?project=ml-team")["entries"]
    call("GET", "/api/v1/audit", 400, query="?limit=0")
    call("DELETE", member, 200, project="ml-team", user="ana")
    call("DELETE", member, 404, project="ml-team", user="ana")
    every_operation = {f"{method.upper()} {path}" for path, item in doc["paths"].items() for method in item}
    assert {label for label, _ in call.client.checked} == every_operation

    # Without credentials, every operation is the documented 401; a developer is refused the site
    # admin's operations with the documented 403.
    add_user(app, "dev", projects={"ml-team": "developer"})
    headers = {"Authorization": f"Bearer {token_for(app, 'dev')}"}
    for path, item in doc["paths"].items():
        url = re.sub(r"{(\w+)}", lambda m: {"name": "tts", "project": "ml-team", "user": "dev", "key_id": "1",
                                            "token_id": "1", "number": "1", "action": "stop",
                                            "operation": "drain", "instance_id": "i1"}[m.group(1)], path)
        for method, operation in item.items():
            response = anonymous_client(app).open(url, method=method.upper())
            assert response.status_code == 401, (method, path)
            check_answer(app, method.upper(), url, response)
            if "403" in operation["responses"] and method == "get":
                refused = anonymous_client(app).open(url, method="GET", headers=headers)
                assert refused.status_code == 403, (path, refused.get_json())
                check_answer(app, "GET", url, refused)


def test_the_reference_page_shows_the_whole_document_without_javascript_or_other_sites(client, doc):
    response = client.get("/docs/api")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = html.unescape(response.get_data(as_text=True))
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert f'id="op-{operation["operationId"]}"' in page and path in page and operation["summary"] in page
    for name in doc["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    spec = page[page.index('id="schema-EndpointSpec"'):page.index('id="schema-EndpointSpecChange"')]
    for f in SPEC:
        assert re.search(rf"<code>{f.name}</code>.*?edit-{f.edit}", spec, re.S), f.name
    assert "integer, 1 – 65535" in spec and "number, more than 0, at most 1024" in spec
    assert 'href="/api/v1/openapi.json"' in page
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page loads nothing from another site"
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/app.js">']  # the app's own, optional
    assert 'href="/docs/api"' in client.get("/endpoints").get_data(as_text=True)  # in the navigation
