"""Accounts, projects, tokens, quotas and the audit log (README.md "Accounts and projects",
webapp/auth.py, webapp/projects.py), through the web app with Temporal standing in (a recording
bridge) and real sign-in, CSRF and password hashing.

The walk over the URL map is the guard for new routes: every route is called by a user of
another project with the names of the first project's things, and must answer as if they did
not exist (404), refuse (403 for a site admin's route), or show nothing of them; a route whose
path has a parameter the walk does not know fails it.
"""
from __future__ import annotations

import re
import time
from html import unescape

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from common import accounts
from common.account_models import ApiToken, AuditEntry, Membership, Project
from common.models import FAILED, STOPPED, TERMINATED, ApiKey, Endpoint, Model, ModelVersion
from tests.conftest import TEST_PASSWORD, RecordingBridge, add_user, anonymous_client, sign_in, token_for, web_app
from webapp.auth import LEVELS, PUBLIC, SIGNED_IN, SITE_ADMIN, view_level
from webapp.extensions import db
from webapp.login_throttle import LoginThrottle

SERVER = {"start_command": "python -m http.server $PORT"}


@pytest.fixture
def bridge():
    return RecordingBridge()


@pytest.fixture
def world(tmp_path, bridge):
    """Alice develops in proj-alice (an endpoint with a key, a model with a version, a token);
    Bob develops in proj-bob; Carol views proj-alice."""
    for app in web_app(tmp_path, bridge=bridge):
        add_user(app, "alice", projects={"proj-alice": "developer"})
        add_user(app, "bob", projects={"proj-bob": "developer"})
        add_user(app, "carol", projects={"proj-alice": "viewer"})
        alice = client_of(app, "alice")
        assert alice.post("/api/v1/endpoints?project=proj-alice", json={"name": "ep-of-alice", **SERVER}
                          ).status_code == 201
        assert alice.post("/api/v1/endpoints/ep-of-alice/keys", json={"name": "k"}).status_code == 201
        assert alice.post("/api/v1/models?project=proj-alice", json={"name": "model-of-alice"}).status_code == 201
        assert alice.post("/api/v1/models/model-of-alice/versions", json={
            "git_url": "https://example.com/m.git", "git_ref": "main"}).status_code == 201
        bob = client_of(app, "bob")
        assert bob.post("/api/v1/endpoints", json={"name": "ep-of-bob", **SERVER}).status_code == 201
        bridge.calls.clear()
        yield app


def client_of(app, name: str) -> FlaskClient:
    """A client of `name`: a personal token for the API, a session for the pages."""
    client = sign_in(anonymous_client(app), name)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app, name)}"
    return client


def snapshot(app) -> dict:
    """Everything of Alice's a request could change."""
    def rows(model, *where):
        return [{k: v for k, v in vars(row).items() if not k.startswith("_")}
                for row in db.session.scalars(select(model).where(*where).order_by(model.id))]
    with app.app_context():
        alice = accounts.get_user(db.session, "alice")
        return {"endpoints": rows(Endpoint, Endpoint.name == "ep-of-alice"), "keys": rows(ApiKey),
                "models": rows(Model), "versions": rows(ModelVersion), "memberships": rows(Membership),
                "projects": rows(Project), "tokens": rows(ApiToken, ApiToken.user_id == alice.id),
                "users": sorted(u for u in db.session.scalars(select(accounts.User.name)))}


# Path values naming Alice's things; a route with another parameter fails the walk until it is added.
ALICES = {"name": None, "key_id": None, "number": "1", "action": "stop", "operation": "drain",
          "project": "proj-alice", "user": "alice", "token_id": None,
          "instance_id": "inst-of-alice"}
BODY = {"name": "ep-of-alice", "description": "bob was here", "role": "admin", "max_endpoints": 999,
        "max_gpus": 99, "git_url": "https://example.com/x.git", "git_ref": "main", **SERVER}
FORM = {"name": "ep-of-alice", "project": "proj-alice", "confirm_name": "ep-of-alice", "key_name": "x",
        "user": "bob", "role": "admin", "max_endpoints": "999", "description": "bob was here",
        "start_command": "python -m http.server $PORT", "port": "8080", "token_name": "t",
        "current": "x", "new": "y" * 12}


def url_of(app, rule) -> str:
    with app.app_context():
        alice = accounts.get_user(db.session, "alice")
        values = {**ALICES, "key_id": str(db.session.scalar(select(ApiKey.id))),
                  "token_id": str(db.session.scalar(select(ApiToken.id).where(ApiToken.user_id == alice.id)))}
    url = rule.rule
    for arg in rule.arguments:
        value = values[arg] if arg != "name" else ("model-of-alice" if "/models/" in rule.rule else "ep-of-alice")
        assert value is not None, f"the walk has no value for <{arg}> of {rule.rule}: add one to ALICES"
        url = re.sub(rf"<(?:\w+:)?{arg}>", value, url)
    return url + "?project=proj-alice"


def test_two_projects_cannot_see_call_or_change_each_others_things(world, bridge):
    app = world
    app.config["WTF_CSRF_ENABLED"] = False  # authorization is walked here; CSRF in test_webapp_ui.py
    bob = client_of(app, "bob")
    before = snapshot(app)
    with app.app_context():
        # What only Alice's things hold (Bob's requests send her endpoint's and project's names).
        secrets_of_alice = ["model-of-alice", "example.com/m.git", db.session.scalar(select(ApiKey.prefix)),
                            *db.session.scalars(select(ApiToken.prefix).join(accounts.User)
                                                .where(accounts.User.name == "alice"))]
    walked = set()
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        level = view_level(app, rule.endpoint)
        assert level in LEVELS, f"{rule.endpoint} declares no access level"
        if level == PUBLIC:
            continue
        url = url_of(app, rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            api = rule.rule.startswith("/api/")
            kwargs = ({"json": BODY} if api else {"data": FORM}) if method != "GET" else {}
            response = bob.open(url, method=method, **kwargs)
            text = response.get_data(as_text=True)
            what = f"{method} {url} ({rule.endpoint}, {level}) -> {response.status_code}: {text[:300]}"
            walked.add((rule.endpoint, method))
            if level == SITE_ADMIN:
                assert response.status_code == 403, what
            elif rule.arguments and level != SIGNED_IN or rule.endpoint in ("projects_api.api_endpoint_audit",):
                assert response.status_code == 404, what  # never a 403 that says it exists
            elif rule.arguments:  # Bob's own things (a token id of Alice's): not found either
                assert response.status_code in (302, 404), what
            else:  # lists and forms of Bob's own, or a create in Alice's project: nothing of Alice's
                assert response.status_code in (200, 201, 302, 400, 404), what
            if response.status_code < 400:  # a refusal names only what the URL named
                assert not [held for held in secrets_of_alice if held in text], what
                if method == "GET":
                    assert "ep-of-alice" not in text and "proj-alice" not in text, what
    every = {(r.endpoint, m) for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"}
             if view_level(app, r.endpoint) != PUBLIC}
    assert walked == every
    assert snapshot(app) == before, "Bob changed something of Alice's"
    assert [call for call in bridge.calls if call[1] == "ep-of-alice"] == []
    with app.app_context():
        assert not db.session.scalar(select(AuditEntry).where(AuditEntry.user_name == "bob",
                                                              AuditEntry.project_name == "proj-alice"))


def test_a_member_sees_the_projects_things_and_a_site_admin_all(world):
    app = world
    alice_list = client_of(app, "alice").get("/api/v1/endpoints").get_json()["endpoints"]
    assert [(e["name"], e["project"]) for e in alice_list] == [("ep-of-alice", "proj-alice")]
    assert {e["name"] for e in app.test_client().get("/api/v1/endpoints").get_json()["endpoints"]} == {
        "ep-of-alice", "ep-of-bob"}
    models = client_of(app, "bob").get("/api/v1/models").get_json()["models"]
    assert models == []
    page = client_of(app, "alice").get("/endpoints").get_data(as_text=True)
    assert "ep-of-alice" in page and "ep-of-bob" not in page
    # A model version of another project is as unknown as a missing one.
    with app.app_context():
        version = db.session.scalar(select(ModelVersion.id))
    refused = client_of(app, "bob").post("/api/v1/endpoints", json={
        "name": "steals", "source_kind": "routes", "model_version_id": version,
        "routes": [{"path": "/p", "file": "p.py", "function": "f"}]})
    assert refused.status_code == 400 and "does not exist" in refused.get_json()["errors"]["model_version_id"]


def test_a_viewer_reads_but_cannot_stop_or_change(world, bridge):
    app = world
    carol = client_of(app, "carol")
    assert carol.get("/api/v1/endpoints/ep-of-alice").status_code == 200
    assert carol.get("/api/v1/endpoints/ep-of-alice/audit").status_code == 200
    for method, url, body in (("POST", "/api/v1/endpoints/ep-of-alice/stop", None),
                              ("POST", "/api/v1/endpoints/ep-of-alice/terminate", None),
                              ("PATCH", "/api/v1/endpoints/ep-of-alice", {"description": "x"}),
                              ("POST", "/api/v1/endpoints/ep-of-alice/keys", {"name": "x"}),
                              ("POST", "/api/v1/endpoints?project=proj-alice", {"name": "carols", **SERVER}),
                              ("PUT", "/api/v1/projects/proj-alice/members/carol", {"role": "admin"})):
        response = carol.open(url, method=method, json=body)
        assert response.status_code == 403, (url, response.get_json())
        assert "viewer" in response.get_json()["error"]
    page = carol.get("/endpoints/ep-of-alice").get_data(as_text=True)
    assert "you can read this endpoint, not change it" in page and ">Stop<" not in page
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert carol.post("/endpoints/ep-of-alice/action/stop", data={"csrf_token": csrf}).status_code == 403
    assert bridge.calls == []


def test_tokens_work_until_revoked_and_keep_their_last_use(world):
    app = world
    alice = sign_in(anonymous_client(app), "alice")  # a session: makes the token
    made = alice.post("/api/v1/tokens", json={"name": "laptop"})
    assert made.status_code == 201
    token = made.get_json()["token"]
    assert token.startswith("sbt_") and made.get_json()["last_used_at"] is None
    listed = alice.get("/api/v1/tokens").get_json()["tokens"]
    assert token not in str(listed) and made.get_json()["prefix"] in str(listed)
    with_token = anonymous_client(app)
    me = with_token.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.get_json()["name"] == "alice" and me.get_json()["via"].startswith("token sbt_")
    used = [t for t in alice.get("/api/v1/tokens").get_json()["tokens"] if t["name"] == "laptop"][0]
    assert used["last_used_at"] is not None
    assert alice.delete(f"/api/v1/tokens/{used['id']}").status_code == 200
    refused = with_token.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401 and "revoked" in refused.get_json()["error"]
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    # No credentials, junk, or an endpoint key (the proxy's, not the API's): 401 saying what to send.
    assert anonymous_client(app).get("/api/v1/endpoints").status_code == 401
    assert "Authorization: Bearer" in anonymous_client(app).get("/api/v1/endpoints").get_json()["error"]
    junk = anonymous_client(app).get("/api/v1/me", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert junk.status_code == 401
    key = client_of(app, "alice").post("/api/v1/endpoints/ep-of-alice/keys").get_json()["key"]
    endpoint_key = anonymous_client(app).get("/api/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert endpoint_key.status_code == 401 and "endpoint key" in endpoint_key.get_json()["error"]
    # The account page makes a token and shows it once.
    page = alice.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    shown = alice.post("/account/tokens", data={"csrf_token": csrf, "token_name": "ci"}).get_data(as_text=True)
    plaintext = re.search(r'id="new-token">([^<]+)<', shown).group(1)
    assert plaintext.startswith("sbt_") and plaintext not in alice.get("/account").get_data(as_text=True)
    assert anonymous_client(app).get("/api/v1/me", headers={"Authorization": f"Bearer {plaintext}"}).status_code == 200


def test_the_endpoint_quota_counts_stopped_and_failed_endpoints(tmp_path):
    for app in web_app(tmp_path, bridge=RecordingBridge()):
        client = app.test_client()
        assert client.post("/api/v1/projects", json={"name": "small", "max_endpoints": 3}).status_code == 201
        for name in ("q-one", "q-two", "q-three"):
            assert client.post("/api/v1/endpoints?project=small", json={"name": name, **SERVER}).status_code == 201
        with app.app_context():
            for name, status in (("q-one", STOPPED), ("q-two", FAILED)):
                db.session.scalar(select(Endpoint).where(Endpoint.name == name)).status = status
            db.session.commit()
        refused = client.post("/api/v1/endpoints?project=small", json={"name": "q-four", **SERVER})
        assert refused.status_code == 409
        body = refused.get_json()
        assert "3 of 3 used: 1 stopped, 1 failed — terminate one" in body["error"]
        assert body["quota"] == {"used": 3, "limit": 3, "stopped": 1, "failed": 1}
        applied = client.post("/api/v1/apply?project=small", json={"name": "q-four", **SERVER})
        assert applied.status_code == 409 and applied.get_json()["action"] == "refused"
        page = client.get("/endpoints").get_data(as_text=True)
        assert re.search(r"3 of 3 used:\s+1 stopped, 1 failed", page)
        # A terminated endpoint no longer counts.
        with app.app_context():
            db.session.scalar(select(Endpoint).where(Endpoint.name == "q-one")).status = TERMINATED
            db.session.commit()
        assert client.post("/api/v1/endpoints?project=small", json={"name": "q-four", **SERVER}).status_code == 201
        assert client.get("/api/v1/projects/small").get_json()["quota"]["endpoints"]["used"] == 3


def test_pages_ask_to_sign_in_and_go_back_where_they_were(world):
    app = world
    anonymous = anonymous_client(app)
    answer = anonymous.get("/endpoints/ep-of-alice")
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/login?next=/endpoints/ep-of-alice")
    page = anonymous.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    wrong = anonymous.post("/login", data={"csrf_token": csrf, "name": "alice", "password": "nope"})
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.get_data(as_text=True)
    done = anonymous.post("/login?next=/endpoints/ep-of-alice",
                          data={"csrf_token": csrf, "name": "alice", "password": TEST_PASSWORD})
    assert done.status_code == 302 and done.headers["Location"] == "/endpoints/ep-of-alice"
    assert anonymous.get("/endpoints/ep-of-alice").status_code == 200
    # Never to another site.
    other = sign_in(anonymous_client(app), "carol")
    away = other.post("/login?next=//evil.example/x", data={"csrf_token": csrf, "name": "carol",
                                                            "password": TEST_PASSWORD})
    assert away.status_code in (302, 400) and "evil.example" not in away.headers.get("Location", "")
    # Signing out ends the session.
    page = anonymous.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert anonymous.post("/logout", data={"csrf_token": csrf}).status_code == 302
    assert anonymous.get("/account").status_code == 302


def test_a_new_password_signs_out_the_other_sessions(world):
    app = world
    here, there = sign_in(anonymous_client(app), "alice"), sign_in(anonymous_client(app), "alice")
    page = here.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    changed = here.post("/account/password", data={"csrf_token": csrf, "current": TEST_PASSWORD,
                                                   "new": "a much longer new password"})
    assert changed.status_code == 302
    assert here.get("/account").status_code == 200 and there.get("/account").status_code == 302
    with app.app_context():
        assert accounts.password_matches(accounts.get_user(db.session, "alice"), "a much longer new password")


def test_login_guessing_is_slowed_but_never_locks_out_for_good(tmp_path):
    for app in web_app(tmp_path, STANDBY_LOGIN_MAX_FAILURES="3", STANDBY_LOGIN_LOCK_SECONDS="0.5",
                       STANDBY_LOGIN_MAX_LOCK_SECONDS="1"):
        client = anonymous_client(app)
        page = client.get("/login").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)

        def attempt(password):
            return client.post("/login", data={"csrf_token": csrf, "name": "admin", "password": password})
        assert [attempt("guess").status_code for _ in range(3)] == [401, 401, 401]
        locked = attempt(TEST_PASSWORD)  # even the right password waits
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
        assert "Too many wrong passwords" in locked.get_data(as_text=True)
        time.sleep(1.1)
        assert attempt(TEST_PASSWORD).status_code == 302  # the wait is over: the admin is in
        with app.app_context():
            failed = db.session.scalars(select(AuditEntry).where(AuditEntry.action == "auth.login_failed")).all()
            assert len(failed) == 3 and failed[0].target == "admin" and failed[0].remote_addr


def test_the_throttle_doubles_its_wait_up_to_a_bound_and_a_success_clears_it():
    now = [0.0]
    throttle = LoginThrottle(max_failures=2, base_seconds=10, max_seconds=60, clock=lambda: now[0])
    throttle.failed("admin", "1.2.3.4")
    assert throttle.wait_seconds("admin", "1.2.3.4") == 0
    waits = []
    for _ in range(6):
        throttle.failed("admin", "1.2.3.4")
        waits.append(throttle.wait_seconds("admin", "1.2.3.4"))
    assert waits == [10, 20, 40, 60, 60, 60]  # 10 s at the limit, doubling, never past 60 s
    assert throttle.wait_seconds("admin", "5.6.7.8") == 0  # another address is not held back
    now[0] = 61.0
    assert throttle.wait_seconds("admin", "1.2.3.4") == 0
    throttle.succeeded("admin", "1.2.3.4")
    throttle.failed("admin", "1.2.3.4")
    assert throttle.wait_seconds("admin", "1.2.3.4") == 0


def test_every_change_is_in_the_audit_log_with_who_when_and_from_where(world, bridge):
    app = world
    alice = client_of(app, "alice")
    assert alice.post("/api/v1/endpoints/ep-of-alice/stop", environ_base={"REMOTE_ADDR": "10.1.2.3"}
                      ).status_code == 202
    assert alice.patch("/api/v1/endpoints/ep-of-alice", json={"max_instances": 3}).status_code == 200
    entries = alice.get("/api/v1/endpoints/ep-of-alice/audit").get_json()["entries"]
    assert [e["action"] for e in entries][:2] == ["endpoint.update", "endpoint.stop"]
    stop = entries[1]
    assert stop["user"] == "alice" and stop["via"].startswith("token sbt_") and stop["remote_addr"] == "10.1.2.3"
    assert stop["project"] == "proj-alice" and stop["at"]
    assert {"endpoint.create", "key.create"} <= {e["action"] for e in entries}
    assert '"max_instances"' in entries[0]["detail"]
    page = unescape(alice.get("/endpoints/ep-of-alice").get_data(as_text=True))
    assert "endpoint.stop" in page and "10.1.2.3" in page
    overall = app.test_client().get("/api/v1/audit?project=proj-alice").get_json()["entries"]
    assert {"model.create", "model.version", "endpoint.stop"} <= {e["action"] for e in overall}
    assert app.test_client().get("/audit").status_code == 200
    assert alice.get("/api/v1/audit").status_code == 403 and alice.get("/audit").status_code == 403


def test_the_documented_route_table_is_the_apps(app):
    from tests.conftest import ROOT
    from webapp.auth import route_table

    documented = (ROOT / "docs" / "architecture.md").read_text()
    rows = [f"| `{rule}` | {methods} | {level} | `{view}` |" for rule, methods, level, view in route_table(app)]
    missing = [row for row in rows if row not in documented]
    assert missing == [], "docs/architecture.md \"Access control\" lacks (or misstates) these routes:\n" + "\n".join(missing)
    listed = re.findall(r"^\| `(/[^`]*)` \|", documented, re.M)
    assert sorted(listed) == sorted(rule for rule, *_ in route_table(app)), "the table lists routes the app has not"
