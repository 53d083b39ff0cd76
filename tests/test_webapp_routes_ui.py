"""The create form's "routes" source: form -> review -> confirm, errors that keep the user's
input, and the connect panel's example calls. Temporal is a closed port (see tests/conftest.py web_app)."""
from __future__ import annotations

import html
import json

import pytest
from sqlalchemy import select

from common.models import Endpoint
from tests.test_webapp_ui import csrf_token, draft_token
from tests.test_webapp_validation import FORM_VALID, count_endpoints
from webapp.extensions import db

ROUTES = [
    {"path": "/add", "file": "arith.py", "function": "add",
     "params": [{"name": "a", "type": "int", "ge": 0, "le": 100}, {"name": "b", "type": "int"}]},
    {"method": "GET", "path": "/square", "file": "lib/arith.py", "function": "square", "call": "positional",
     "params": [{"name": "x", "type": "float", "default": 2.5},
                {"name": "mode", "type": "str", "default": "fast", "choices": ["fast", "exact"]}]},
]


@pytest.fixture
def version_id(client):
    assert client.post("/api/v1/models", json={"name": "arith"}).status_code == 201
    response = client.post("/api/v1/models/arith/versions",
                           json={"git_url": "https://example.com/arith.git", "git_ref": "main"})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def routes_form(client, routes, **overrides) -> dict:
    page = client.get("/endpoints/new").get_data(as_text=True)
    text = routes if isinstance(routes, str) else json.dumps(routes)
    return {**FORM_VALID, "name": "calc", "start_command": "", "source_kind": "routes",
            "routes_json": text, "csrf_token": csrf_token(page), **overrides}


def stored_routes_in_textarea(page: str) -> list:
    start = page.index('id="routes_json"')
    body = page[page.index(">", start) + 1: page.index("</textarea>", start)]
    return json.loads(html.unescape(body))


def test_form_offers_both_sources_and_registered_versions(client, version_id):
    page = client.get("/endpoints/new").get_data(as_text=True)
    assert "Server (command + port)" in page and "Routes (model code)" in page
    assert f'<option value="{version_id}">arith v1 (main)</option>' in page
    assert 'id="routes-editor"' in page and "routes_editor.js" in page
    assert 'href="/models"' in page  # the nav's Models link


def test_routes_endpoint_review_then_confirm(app, client, version_id):
    review = client.post("/endpoints/new", data=routes_form(client, ROUTES, model_version_id=str(version_id)))
    text = review.get_data(as_text=True)
    assert review.status_code == 200, text
    assert "Review: calc" in text and "arith v1 (https://example.com/arith.git @ main)" in text
    assert "<code>/add</code>" in text and "<code>arith.py:add</code>" in text
    assert "<code>/square</code>" in text and "<code>lib/arith.py:square</code>" in text and "positional" in text
    assert "<code>a</code>: int, required, 0 ≤ value ≤ 100" in text
    assert "<code>mode</code>: str, default &#34;fast&#34;, one of &#34;fast&#34;, &#34;exact&#34;" in text
    assert count_endpoints(app) == 0  # nothing until confirm
    create_form = text.split('action="/endpoints/new/confirm"', 1)[1].split("</form>", 1)[0]
    assert f'value="{draft_token(text)}"' in create_form  # the Create button carries its draft

    back = client.post("/endpoints/new/back", data={"csrf_token": csrf_token(text), "draft": draft_token(text)})
    back_page = back.get_data(as_text=True)
    assert stored_routes_in_textarea(back_page)[1]["function"] == "square"
    assert f'<option selected value="{version_id}">' in back_page

    done = client.post("/endpoints/new/confirm", data={"csrf_token": csrf_token(text), "draft": draft_token(text)})
    assert done.status_code == 302 and done.headers["Location"].endswith("/endpoints/calc")
    detail = client.get("/endpoints/calc").get_data(as_text=True)
    assert "Temporal is not reachable at 127.0.0.1:" in detail  # flashed; the row is kept
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint))
        assert (endpoint.source_kind, endpoint.model_version_id, endpoint.git_url) == ("routes", version_id, "")
        assert endpoint.routes[0] == {**ROUTES[0], "method": "POST", "call": "keyword", "params": [
            {"name": "a", "type": "int", "ge": 0, "le": 100, "required": True},
            {"name": "b", "type": "int", "required": True}]}
        assert endpoint.routes[1]["params"][0] == {"name": "x", "type": "float", "default": 2.5, "required": False}
        assert endpoint.routes[1]["method"] == "GET"


def test_git_source_and_server_leftovers_dropped(app, client):
    data = routes_form(client, ROUTES[:1], git_url="https://example.com/m.git", git_ref="v1")
    review = client.post("/endpoints/new", data=data).get_data(as_text=True)
    assert "<dt>Git URL</dt><dd><code>https://example.com/m.git</code></dd>" in review
    assert "<dt>Git ref</dt><dd><code>v1</code></dd>" in review
    # Choosing "server" afterwards does not carry the typed routes into the spec.
    server = client.post("/endpoints/new", data={**data, "name": "srv", "source_kind": "server",
                                                 "start_command": "python -m http.server $PORT",
                                                 "routes_json": "not json"})
    assert server.status_code == 200 and "<code>python -m http.server $PORT</code>" in server.get_data(as_text=True)


BAD_ROUTES = [
    # (routes as sent, error key, part of the message)
    ([{**ROUTES[0], "file": "../x.py"}], "routes[0].file", "stay inside the source"),
    ([{**ROUTES[0], "params": [{"name": "a", "type": "int"}, {"name": "b", "type": "complex"}]}],
     "routes[0].params[1].type", "must be one of str, int, float, bool, list, dict, bytes"),
    ([{**ROUTES[0], "path": "/ping"}], "routes[0].path", "reserved for the health check"),
    ([{**ROUTES[0], "params": [{"name": "n", "type": "str", "ge": 1}]}], "routes[0].params[0].ge",
     "applies to int and float parameters only"),
    ([], "routes", "add at least one route"),
]


@pytest.mark.parametrize("routes, key, fragment", BAD_ROUTES)
def test_invalid_route_keeps_input_and_creates_nothing(app, client, version_id, routes, key, fragment):
    response = client.post("/endpoints/new", data=routes_form(client, routes, model_version_id=str(version_id)))
    page = response.get_data(as_text=True)
    assert response.status_code == 400
    assert f'<li data-error-key="{key}"><code>{key}</code>: ' in page and fragment in html.unescape(page)
    assert "nothing was saved" in page
    assert stored_routes_in_textarea(page) == routes  # exactly what the user sent
    assert f'<option selected value="{version_id}">' in page
    assert json.loads(html.unescape(page.split("data-errors='", 1)[1].split("'", 1)[0]))[key]
    assert count_endpoints(app) == 0
    assert not list((app.extensions["standby_settings"].data_dir / "drafts").glob("*.json"))


def test_form_only_errors_name_their_field(app, client, version_id):
    broken = client.post("/endpoints/new", data=routes_form(client, '[{"path": "/add",'))
    page = html.unescape(broken.get_data(as_text=True))
    assert broken.status_code == 400 and "Routes are not valid JSON" in page
    assert '[{"path": "/add",</textarea>' in page  # the text is kept for fixing

    both = client.post("/endpoints/new", data=routes_form(client, ROUTES, model_version_id=str(version_id),
                                                          git_url="https://example.com/m.git", git_ref="main"))
    assert both.status_code == 400 and "not both" in both.get_data(as_text=True)
    neither = client.post("/endpoints/new", data=routes_form(client, ROUTES))
    assert neither.status_code == 400
    assert "give the repository URL" in neither.get_data(as_text=True)  # the registry's rule and words
    unknown = client.post("/endpoints/new", data=routes_form(client, ROUTES, model_version_id="999"))
    # The API's own words for the same value.
    assert unknown.status_code == 400 and "model version 999 does not exist" in unknown.get_data(as_text=True)
    assert count_endpoints(app) == 0


def test_connect_panel_shows_a_curl_per_route(app, client, version_id):
    body = {"name": "calc", "source_kind": "routes", "model_version_id": version_id, "routes": ROUTES}
    assert client.post("/api/v1/endpoints", json=body).status_code == 503  # created; Temporal down
    page = html.unescape(client.get("/endpoints/calc").get_data(as_text=True))
    curls = [line for line in page.splitlines() if "route-curl" in line]
    assert curls == [
        '      <pre class="code route-curl">curl -X POST -H \'Content-Type: application/json\' '
        '-d \'{"a": 1, "b": 1}\' http://127.0.0.1:8000/e/calc/add</pre>',
        '      <pre class="code route-curl">curl http://127.0.0.1:8000/e/calc/square</pre>',
    ]
    assert "<code>a</code>: int, required" in page  # the spec card lists the routes too

    token = csrf_token(page)
    assert client.post("/endpoints/calc/keys", data={"csrf_token": token, "key_name": "ci"}).status_code == 200
    page = html.unescape(client.get("/endpoints/calc").get_data(as_text=True))
    curls = [line for line in page.splitlines() if "route-curl" in line]
    assert len(curls) == 2 and all("curl -H 'Authorization: Bearer <your key>' " in line for line in curls)


def test_edit_keeps_the_routes(app, client, version_id):
    body = {"name": "calc", "source_kind": "routes", "model_version_id": version_id, "routes": ROUTES}
    assert client.post("/api/v1/endpoints", json=body).status_code == 503
    page = client.get("/endpoints/calc/edit").get_data(as_text=True)
    assert stored_routes_in_textarea(page)[0]["path"] == "/add"
    assert '<option selected value="routes">' in page
    data = {**routes_form(client, stored_routes_in_textarea(page), model_version_id=str(version_id)),
            "csrf_token": csrf_token(page), "max_instances": "2"}
    assert client.post("/endpoints/calc/edit", data=data).status_code == 302
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint))
        assert endpoint.max_instances == 2 and [r["path"] for r in endpoint.routes] == ["/add", "/square"]
