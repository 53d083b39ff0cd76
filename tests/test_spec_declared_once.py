"""One spec, declared once (common/spec_fields.py): everything that knows a field derives from its
declaration, the form and the API say the same thing about the same bad value, edits follow
their field's edit class, and the workflow refuses a spec it cannot schedule."""
from __future__ import annotations

import dataclasses
import html
import json
import sys
import time

import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select

from common.models import Endpoint
from common.spec_fields import (
    BOOL,
    CHOICE,
    ENV,
    FLOAT,
    IMMUTABLE,
    INT,
    LIFECYCLE,
    PROXY,
    REF,
    RESTART,
    ROUTES,
    SPEC,
    TEXT,
    read_by,
)
from tests.conftest import wait_until
from webapp.extensions import db

pytestmark = pytest.mark.timeout(120)
VALID = {"name": "tts", "start_command": "python -m http.server $PORT"}


# ---------------------------------------------------------------- derived, not repeated
def test_every_declared_field_is_a_column_of_its_declared_type():
    columns = {c.name: c for c in sa_inspect(Endpoint).columns}
    for f in SPEC:
        column = columns[f.name]
        assert column.nullable == (f.default is None), f.name
        assert type(column.type) is (f.column if isinstance(f.column, type) else type(f.column)), f.name


def test_the_lifecycle_and_the_proxy_get_exactly_the_fields_they_read():
    from proxy.routing_view import EndpointView
    from workflows.activity_types import LifecycleSpec

    lifecycle = {f.name for f in dataclasses.fields(LifecycleSpec)}
    assert {f.name for f in read_by(LIFECYCLE)} <= lifecycle
    proxy = {f.name for f in dataclasses.fields(EndpointView)}
    assert {f.name for f in read_by(PROXY)} <= proxy
    for f in read_by(LIFECYCLE):
        assert next(d for d in dataclasses.fields(LifecycleSpec) if d.name == f.name).default in (f.default,
                                                                                               dataclasses.MISSING)


def test_the_form_has_a_field_for_every_declaration(app):
    from webapp.forms import EndpointForm

    with app.test_request_context():
        form = EndpointForm(meta={"csrf": False})
        for f in SPEC:
            if f.kind in (ENV, ROUTES):
                continue
            field = getattr(form, f.form_name)
            assert field.label.text == f.form_label and (field.description or "") == f.help, f.name


# ---------------------------------------------------------------- the same message, form and API
def _bad_values(f):
    """(spec value, form text) pairs a field must refuse."""
    if f.kind in (INT, FLOAT):
        high = f.high + (60 if f.form_unit else 1)
        yield high, _in_form_units(f, high)
        low = f.low if f.above_low else f.low - (60 if f.form_unit else 1)
        yield low, _in_form_units(f, low)
        if not f.form_unit:
            yield "lots", "lots"
    elif f.kind == CHOICE:
        yield "bogus", "bogus"
    elif f.kind == TEXT and f.name != "name":
        yield "x" * (f.max_length + 1), "x" * (f.max_length + 1)
        if not f.multiline:
            yield "a\tb", "a\tb"


def _in_form_units(f, value):
    return str(value / f.form_unit[1]) if f.form_unit else str(value)


CASES = [(f.name, spec_value, form_text) for f in SPEC for spec_value, form_text in _bad_values(f)]


@pytest.mark.parametrize("name, spec_value, form_text", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_form_and_api_give_the_same_error_for_the_same_bad_value(app, name, spec_value, form_text):
    from common.spec_fields import BY_NAME

    decl = BY_NAME[name]
    spec, form = dict(VALID), {"name": "tts", "start_command": VALID["start_command"], "port": "8080",
                               "environment": "development", "source_kind": "server", "balancing": "round_robin",
                               "idle_retention_minutes": "10", "startup_timeout_minutes": "20"}
    if decl.only_for == "routes":  # a field of a routes source: a routes endpoint around it
        routes = [{"method": "POST", "path": "/add", "file": "a.py", "function": "add"}]
        spec = {"name": "tts", "source_kind": "routes", "git_url": "https://example.com/m.git", "git_ref": "main",
                "routes": routes}
        form.update(source_kind="routes", git_url=spec["git_url"], git_ref="main", routes_json=json.dumps(routes))
    api = app.test_client().post("/api/v1/endpoints", json={**spec, name: spec_value})
    assert api.status_code == 400, api.get_json()
    message = api.get_json()["errors"][name]
    app.config["WTF_CSRF_ENABLED"] = False
    form[decl.form_name] = form_text
    page = html.unescape(app.test_client().post("/endpoints/new", data=form).get_data(as_text=True))
    assert message in page, f"the form did not say {message!r}"


# ---------------------------------------------------------------- edit classes over the API
def _created(client, **spec):
    response = client.post("/api/v1/endpoints", json={**VALID, **spec})
    assert response.status_code in (201, 503), response.get_json()
    return response


@pytest.mark.parametrize("field", [f.name for f in SPEC if f.edit == IMMUTABLE])
def test_patch_of_an_immutable_field_is_a_400_naming_it(client, field):
    _created(client)
    other = {"name": "other", "source_kind": "routes", "model_version_id": 7, "disk_gb": 20, "websocket": True}[field]
    response = client.patch("/api/v1/endpoints/tts", json={field: other})
    assert response.status_code == 400
    assert response.get_json()["errors"][field].startswith(f"{field} cannot be changed after creation; ")


def test_a_restart_class_change_while_instances_run_needs_a_confirmed_restart(app, client):
    from common.models import Instance

    _created(client)
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint))
        db.session.add(Instance(id="runs0001", endpoint_id=endpoint.id, status="ready"))
        db.session.commit()
    response = client.patch("/api/v1/endpoints/tts", json={"port": 9000, "max_instances": 3})
    assert response.status_code == 409
    body = response.get_json()
    assert body["restart_required"] == ["port"] and "?restart=true" in body["error"]
    assert {c["field"]: c["edit"] for c in body["changes"]} == {"port": RESTART, "max_instances": "live"}
    with app.app_context():
        assert db.session.scalar(select(Endpoint)).port == 8080  # nothing saved
    confirmed = client.patch("/api/v1/endpoints/tts?restart=true", json={"port": 9000, "max_instances": 3})
    # Saved; the restart is asked of a workflow this test's Temporal cannot reach: said so.
    assert confirmed.status_code == 503 and confirmed.get_json()["saved"] is True
    with app.app_context():
        assert db.session.scalar(select(Endpoint)).port == 9000


def test_with_nothing_running_a_restart_class_change_is_simply_saved(app, client):
    _created(client)
    response = client.patch("/api/v1/endpoints/tts", json={"cpu_cores": 2})
    assert response.status_code == 503  # saved; Temporal down: the workflow is told later
    assert response.get_json()["restart_required"] == [] and response.get_json()["saved"] is True


def test_the_edit_form_marks_restart_fields_and_disables_immutable_ones(app, client):
    _created(client)
    page = client.get("/endpoints/tts/edit").get_data(as_text=True)
    assert page.count('class="restart-mark"') >= len([f for f in SPEC if f.edit == RESTART and f.kind not in
                                                      (ENV, ROUTES) and f.only_for != "routes"])
    import re

    for f in SPEC:
        if f.edit == IMMUTABLE and f.kind not in (ENV, ROUTES, REF) and f.only_for != "routes":
            tag = re.search(rf'<(?:input|select)[^>]*name="{f.form_name}"[^>]*>', page).group(0)
            assert "disabled" in tag, tag


def test_gpu_type_is_stored_in_the_hosts_spelling(app, client):
    _created(client, gpu_type="t4", gpu_count=1)
    with app.app_context():
        assert db.session.scalar(select(Endpoint)).gpu_type == "T4"


# ---------------------------------------------------------------- the lifecycle
def test_the_workflow_refuses_a_spec_it_cannot_schedule(stack):
    """A row the API would refuse (written by hand or by an older release): the endpoint fails,
    saying why, instead of its workflow task failing for good."""
    stack.create_endpoint("poisoned", idle_retention_seconds=10**15)
    body = stack.wait_status("poisoned", "failed", 30)
    assert body.status_reason.startswith("spec refused: idle_retention_seconds must be between 1 and 2592000")
    assert stack.query("poisoned")["status"] == "failed"


def test_a_live_change_reaches_the_running_instance(stack):
    """Health checks are live: a new health path is used by the running instance's next check
    (here it fails, so the instance is recorded dead and replaced), not only by the next one."""
    stack.create_endpoint("liveedit", start_command=f"{sys.executable} -m http.server 8080", port=8080,
                          health_path="", health_interval_seconds=1, min_instances=1)
    stack.wait_status("liveedit", "running", 40)
    [first] = [i for i in stack.instances("liveedit") if i.status == "ready"]
    with stack.db.session() as s:
        s.scalar(select(Endpoint).where(Endpoint.name == "liveedit")).health_path = "/no-such-path"
    stack.signal("liveedit", "spec_changed")
    started = time.monotonic()
    dead = wait_until(lambda: next((i for i in stack.instances("liveedit") if i.id == first.id
                                    and i.status == "failed"), None), 30, message="the old instance checked anew")
    assert "GET /no-such-path -> HTTP 404" in dead.reason
    assert time.monotonic() - started < 15
