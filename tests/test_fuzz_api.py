"""Property-based fuzzing of every JSON API route and the UI forms (hypothesis, Flask test client).

Temporal is a closed port, so actions answer the documented 503 "Temporal is not reachable". For
every generated request: no other 5xx; every /api/ answer is standard JSON (no NaN/Infinity) and
every 4xx carries a message; and the endpoints the fuzzer was not aimed at keep their stored rows.

Bounded in time for CI (about two minutes for the whole file): STANDBY_FUZZ_SECONDS per test
(default 30) and STANDBY_FUZZ_EXAMPLES (default 600) per test; raise both for a longer run.
"""
from __future__ import annotations

import io
import json
import os
import re
import time
import warnings
import zipfile
from collections import Counter
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from common.config import load_settings
from common.models import Endpoint
from tests.conftest import free_port, with_admin
from webapp.spec import SPEC_FIELDS

SECONDS = float(os.environ.get("STANDBY_FUZZ_SECONDS", "30"))
EXAMPLES = int(os.environ.get("STANDBY_FUZZ_EXAMPLES", "600"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
                suppress_health_check=list(HealthCheck))
BYSTANDERS = ("bystander-one", "bystander-two", "bystander-routes")
TARGET = "fuzz-target"
TEMPORAL_DOWN = "Temporal is not reachable"

# ---- strategies ---------------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.just(2**63), st.just(-(2**63)),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 1e15, 1e308, 65535, 65536, 4, 5]),
)
text = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "/", "-x", "main", "a..b", "\x00", "ext::sh",
                                                         "fd::0", "https://example.com/m.git", "(a+)+$", "é" * 3]))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(text, inner, max_size=4)), max_leaves=12)
param_keys = st.sampled_from(["name", "type", "required", "default", "ge", "le", "choices", "regex", "min_length",
                              "max_length", "description", "junk"])
params = st.dictionaries(param_keys, st.one_of(json_values, st.sampled_from(["str", "int", "float", "bool", "list",
                                                                              "dict", "bytes", "x"])), max_size=6)
route_keys = st.sampled_from(["method", "path", "file", "function", "call", "params", "junk"])
routes = st.lists(st.one_of(
    st.fixed_dictionaries({"method": st.sampled_from(["POST", "GET", "PUT", 1]), "path": st.sampled_from(["/p", "/q/", "//", "/ping", 7]),
                           "file": st.sampled_from(["p.py", "../x.py", "/abs.py", "a/b.py", None]),
                           "function": st.sampled_from(["f", "class", "1x", None]),
                           "call": st.sampled_from(["keyword", "positional", "x"]),
                           "params": st.lists(params, max_size=3)}),
    st.dictionaries(route_keys, json_values, max_size=4), json_values), max_size=3)
spec_values = {
    "routes": routes, "env": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"key": text, "value": st.one_of(text, json_values), "secret": st.one_of(st.booleans(), json_values)}), max_size=3)),
    "source_kind": st.sampled_from(["server", "routes", "x"]),
}
spec_field = st.sampled_from(list(SPEC_FIELDS) + ["junk"])
specs = st.dictionaries(spec_field, json_values, max_size=8).flatmap(
    lambda base: st.fixed_dictionaries({k: spec_values.get(k, json_values) for k in base}).map(lambda d: {**base, **d}))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


raw_bodies = st.one_of(
    specs.map(lambda d: json.dumps(d, allow_nan=True)),  # NaN and Infinity written out
    st.builds(lambda d: '{"name": "x", "env": ' + nested(d) + "}", st.integers(1, 3000)),
    st.builds(lambda d: '{"routes": [{"params": [{"default": ' + nested(d) + "}]}]}", st.integers(1, 3000)),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", "null", "[]", "{", '{"name": 1e400}', '{"gpu_count": [1]}', "9" * 5000,
                     '{"hold_queue_size": 9223372036854775808}']),
)
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
origins = st.sampled_from([{}, {}, {"Origin": "http://localhost"}, {"Origin": "http://127.0.0.2:1"},
                           {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}])
names = st.one_of(st.just(TARGET), st.text(min_size=1, max_size=20), st.sampled_from(["x" * 300, "..", "%00"]))
path_values = {"name": names, "action": st.sampled_from(["stop", "restart", "terminate", "wake", "scale-out", "nope"]),
               "key_id": st.integers(-5, 2**40).map(str), "number": st.integers(-5, 2**40).map(str),
               "operation": st.sampled_from(["drain", "undrain", "nope"]),
               "project": st.one_of(st.sampled_from(["default", "nope"]), names),
               "user": st.one_of(st.sampled_from(["admin", "nobody"]), names),
               "token_id": st.integers(-5, 2**40).map(str),
               "instance_id": st.one_of(st.sampled_from(["nope", "xykemlvy"]), names)}
methods = st.sampled_from(["GET", "POST", "PATCH", "PUT", "DELETE"])
queries = st.one_of(st.just(""), st.dictionaries(st.sampled_from(["wait", "lines", "instance", "x"]), text, max_size=3)
                    .map(lambda q: "?" + "&".join(f"{k}={v}" for k, v in q.items())))


def zip_bytes(files: list[tuple[str, bytes]], flip: int | None) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")  # duplicate names are part of the fuzz
        for name, data in files:
            archive.writestr(name.replace("\x00", "").lstrip("/") or "f", data)
    data = bytearray(buffer.getvalue())
    if flip is not None and data:
        data[flip % len(data)] ^= 0xFF
    return bytes(data)


archives = st.one_of(
    st.binary(max_size=300),
    st.builds(zip_bytes, st.lists(st.tuples(st.text(max_size=12), st.binary(max_size=200)), max_size=3),
              st.one_of(st.none(), st.integers(0, 10_000))),
)

# ---- the app and the checks --------------------------------------------------------------------


@pytest.fixture
def fuzz_app(tmp_path):
    from common.schema import upgrade
    from webapp import create_app
    from webapp.extensions import db

    config = load_settings({"STANDBY_DATA_DIR": str(tmp_path / "data"), "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
                            "STANDBY_GPUS": "T4:2"})
    upgrade(config.database_url)  # as `app.py web` does before serving
    app = with_admin(create_app({"TESTING": True, "STANDBY_SETTINGS": config, "SECRET_KEY": "test",
                                 "WTF_CSRF_ENABLED": False}))  # the forms' own validation is what is fuzzed here
    client = app.test_client()
    for name in BYSTANDERS + (TARGET,):
        spec = {"name": name, "start_command": "python -m http.server $PORT"}
        if name == "bystander-routes":
            spec = {"name": name, "source_kind": "routes", "git_url": "https://example.com/m.git", "git_ref": "main",
                    "routes": [{"path": "/p", "file": "p.py", "function": "f",
                                "params": [{"name": "x", "type": "float", "ge": 0, "le": 1, "default": 0.5}]}]}
        assert client.post("/api/v1/endpoints", json=spec).status_code in (201, 503)
    assert client.post("/api/v1/endpoints/bystander-one/keys", json={"name": "k"}).status_code == 201
    assert client.post("/api/v1/models", json={"name": TARGET}).status_code == 201
    with app.app_context():
        bystanders = _rows(db)
    yield app
    with app.app_context():
        assert _rows(db) == bystanders, "a request aimed elsewhere changed another endpoint"
    app.extensions["temporal_bridge"].close()
    with app.app_context():
        db.engine.dispose()


def _rows(db) -> list[dict]:
    rows = db.session.scalars(select(Endpoint).where(Endpoint.name.in_(BYSTANDERS)).order_by(Endpoint.name))
    return [{**{k: v for k, v in vars(row).items() if not k.startswith("_")},
             "keys": [(key.prefix, key.revoked_at) for key in row.api_keys]} for row in rows]


def _no_constants(name):
    raise AssertionError(f"non-standard JSON {name} in an answer")


class Tally:
    def __init__(self, label: str):
        self.label, self.counts, self.started = label, Counter(), time.monotonic()

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > SECONDS

    def check(self, method: str, url: str, response) -> None:
        status = response.status_code
        self.counts["cases"] += 1
        self.counts[f"{status // 100}xx"] += 1
        what = f"{method} {url[:120]} -> {status}: {response.get_data()[:300]!r}"
        api = url.startswith("/api/")
        # A successful log download is the file itself (README.md "Logs"); every other API answer is JSON.
        download = status == 200 and (url.split("?")[0].endswith((".tar.gz", ".log")))
        if (api and not download) or response.content_type.startswith("application/json"):
            assert response.content_type.startswith("application/json"), what
            body = json.loads(response.get_data(), parse_constant=_no_constants)
            if status >= 400:
                assert isinstance(body.get("error"), str) and body["error"], what
        if status == 503 and api:
            assert TEMPORAL_DOWN in response.get_json()["error"], what
        elif status >= 500 and not (status == 503 and TEMPORAL_DOWN in response.get_data(as_text=True)):
            raise AssertionError(f"server error: {what}")

    def report(self) -> None:
        print(f"\n{self.label}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())))


def _url(rule, values: dict) -> str:
    url = rule.rule
    for arg in rule.arguments:
        url = re.sub(rf"<(?:\w+:)?{arg}>", lambda _match: quote(values[arg], safe=""), url)
    return url


def test_fuzz_every_api_route(fuzz_app):
    """Any method, path value, query, content type, origin and body on every /api/ rule."""
    rules = [rule for rule in fuzz_app.url_map.iter_rules() if rule.rule.startswith("/api/")]
    client, tally = fuzz_app.test_client(), Tally("API routes")
    # Signed in by its session only: a fuzzed DELETE /api/v1/tokens/<id> must not revoke the
    # client's own credentials halfway (every later case would be a 401).
    del client.environ_base["HTTP_AUTHORIZATION"]

    @FUZZ
    @given(rule=st.sampled_from(rules), data=st.data(), method=methods, query=queries, body=raw_bodies,
           content_type=content_types, headers=origins)
    def run(rule, data, method, query, body, content_type, headers):
        if tally.over_budget():
            return
        values = {arg: data.draw(path_values[arg]) for arg in rule.arguments}
        url = _url(rule, values) + query
        kwargs = {"headers": headers}
        if content_type is not None:
            kwargs.update(data=body.encode("utf-8", "surrogatepass"), content_type=content_type)
        tally.check(method, url, client.open(url, method=method, **kwargs))

    run()
    tally.report()


def test_fuzz_specs_on_create_patch_and_apply(fuzz_app):
    """Spec-shaped JSON (every field, any JSON value, routes with any params) on create, patch and
    apply (a whole spec over the target, with ?dry_run and ?restart)."""
    client, tally = fuzz_app.test_client(), Tally("create/patch/apply specs")

    @FUZZ
    @given(spec=specs, route=st.sampled_from(["create", "patch", "apply"]),
           query=st.sampled_from(["", "?dry_run=true", "?restart=true"]))
    def run(spec, route, query):
        if tally.over_budget():
            return
        if route == "patch":
            url, method = f"/api/v1/endpoints/{TARGET}", "PATCH"
            spec.pop("name", None)
        elif route == "apply":
            url, method = f"/api/v1/apply{query}", "POST"
            spec["name"] = TARGET
        else:
            url, method = "/api/v1/endpoints", "POST"
            spec["name"] = "fuzz-new" if not isinstance(spec.get("name"), str) or spec["name"] in BYSTANDERS else spec["name"]
        body = json.dumps(spec, allow_nan=True)
        tally.check(method, url, client.open(url, method=method, data=body, content_type="application/json"))

    run()
    tally.report()


def test_fuzz_ui_forms_and_uploads(fuzz_app):
    """The endpoint form (create and edit), the registry forms, and archive uploads."""
    client, tally = fuzz_app.test_client(), Tally("UI forms and uploads")
    form_fields = ["name", "description", "environment", "source_kind", "model_version_id", "git_url", "git_ref",
                   "routes_json", "start_command", "image", "port", "source_dir", "env_plain", "env_secret",
                   "gpu_type", "gpu_count", "cpu_cores", "memory_gb", "disk_gb", "min_instances", "max_instances",
                   "idle_retention_minutes", "startup_timeout_minutes", "health_path", "health_interval_seconds",
                   "max_concurrency", "balancing", "sticky_sessions", "hold_queue_size", "draft", "key_name",
                   "confirm_name", "git_url", "git_ref"]
    form_values = st.one_of(text, numbers.map(str), json_values.map(lambda v: json.dumps(v, allow_nan=True)),
                            raw_bodies)
    pages = ["/endpoints/new", "/endpoints/new/back", "/endpoints/new/confirm", f"/endpoints/{TARGET}/edit",
             f"/endpoints/{TARGET}/keys", f"/endpoints/{TARGET}/action/stop", f"/endpoints/{TARGET}/terminate",
             "/models/new", f"/models/{TARGET}/versions/git"]

    @FUZZ
    @given(page=st.sampled_from(pages + ["upload"]), form=st.dictionaries(st.sampled_from(form_fields), form_values,
                                                                       max_size=10),
           archive=archives, filename=st.sampled_from(["m.zip", "m.tar.gz", "m.tgz", "m.rar", ""]),
           api=st.booleans())
    def run(page, form, archive, filename, api):
        if tally.over_budget():
            return
        form = {k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for k, v in form.items()}
        if page == "upload":
            url = f"/api/v1/models/{TARGET}/versions" if api else f"/models/{TARGET}/versions/upload"
            response = client.post(url, data={"archive": (io.BytesIO(archive), filename)},
                                   content_type="multipart/form-data")
        else:
            url = page
            response = client.post(url, data=form)
        tally.check("POST", url, response)

    run()
    tally.report()
