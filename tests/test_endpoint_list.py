"""The endpoint list, API and page: keyset pages on the name with an opaque cursor, filters, a
constant number of queries per page (README.md "JSON API"). Rows are written directly, as the web
app (spec) and the worker (status, instances) write them; Temporal is a closed port."""
from __future__ import annotations

import re
from contextlib import contextmanager
from html import unescape

import pytest
from sqlalchemy import event

from common.models import RUNNING, STANDBY, STOPPED, ApiKey, Endpoint, Instance
from webapp import api_keys
from webapp.extensions import db
from webapp.listing import DEFAULT_LIMIT, MAX_LIMIT, UI_DEFAULT_LIMIT, encode_cursor


def add_endpoints(app, names, status=STANDBY, environment="development", instances=2, keys=1):
    with app.app_context():
        for name in names:
            endpoint = Endpoint(name=name, start_command="python -m http.server $PORT", status=status,
                                environment=environment)
            db.session.add(endpoint)
            db.session.flush()
            for n in range(instances):
                db.session.add(Instance(id=f"{name[:10]}{n}", endpoint_id=endpoint.id,
                                        status="ready" if n == 0 else "stopped", gpu_seconds=1.5))
            for _ in range(keys):
                api_keys.create_key(db.session, endpoint, "ci")
        db.session.commit()


def walk(client, query=""):
    """Every page of `/api/v1/endpoints?<query>`, following `next`; returns (names, pages)."""
    names, pages, cursor = [], 0, None
    while True:
        url = "/api/v1/endpoints?" + "&".join(p for p in (query, f"cursor={cursor}" if cursor else "") if p)
        response = client.get(url)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        names += [e["name"] for e in body["endpoints"]]
        pages += 1
        if body["next"] is None:
            return names, pages
        assert body["endpoints"], "a page that is not the last one is never empty"
        cursor = body["next"]


def test_pages_follow_the_names_and_end_with_next_null(app, client):
    names = [f"ep-{n:02d}" for n in range(10)]
    add_endpoints(app, reversed(names))
    got, pages = walk(client, "limit=3")
    assert got == names and pages == 4
    first = client.get("/api/v1/endpoints?limit=10").get_json()
    assert [e["name"] for e in first["endpoints"]] == names and first["next"] is None
    # Each item is the full endpoint answer, instances and key flag included.
    item = first["endpoints"][0]
    assert len(item["instances"]) == 2 and item["has_api_keys"] is True and item["usage"]["gpu_seconds"] == 3.0


def test_a_client_that_ignores_next_gets_the_first_page(app, client):
    add_endpoints(app, [f"ep-{n:03d}" for n in range(DEFAULT_LIMIT + 5)], instances=0, keys=0)
    body = client.get("/api/v1/endpoints").get_json()
    assert len(body["endpoints"]) == DEFAULT_LIMIT and body["next"]
    rest = client.get(f"/api/v1/endpoints?cursor={body['next']}").get_json()
    assert [e["name"] for e in rest["endpoints"]] == [f"ep-{n:03d}" for n in range(DEFAULT_LIMIT, DEFAULT_LIMIT + 5)]


def test_a_page_does_not_shift_when_endpoints_are_created_before_it(app, client):
    add_endpoints(app, ["b", "d", "f", "h"])
    first = client.get("/api/v1/endpoints?limit=2").get_json()
    add_endpoints(app, ["a", "c", "e"])
    second = client.get(f"/api/v1/endpoints?limit=2&cursor={first['next']}").get_json()
    assert [e["name"] for e in second["endpoints"]] == ["e", "f"]


def test_filters_narrow_the_list_and_its_pages(app, client):
    add_endpoints(app, ["api-a", "api-b", "api-c"], status=RUNNING, environment="production")
    add_endpoints(app, ["api-d", "web-a"], status=STOPPED, environment="production")
    add_endpoints(app, ["api-e"], status=RUNNING, environment="staging")

    def names(query):
        return walk(client, query)[0]

    assert names("status=running") == ["api-a", "api-b", "api-c", "api-e"]
    assert names("environment=production&limit=1") == ["api-a", "api-b", "api-c", "api-d", "web-a"]
    assert names("prefix=api-&status=running&environment=production&limit=2") == ["api-a", "api-b", "api-c"]
    assert names("prefix=web") == ["web-a"]
    assert names("status=&environment=&prefix=") == names("")  # empty means "not set", as a form sends it
    assert names("status=failed") == []


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), (f"limit={MAX_LIMIT + 1}", "limit"), ("limit=abc", "limit"), ("limit=-1", "limit"),
    ("limit=1e3", "limit"), ("limit=%C2%B3", "limit"), ("limit=%D9%A3", "limit"), ("cursor=nope", "cursor"), ("cursor=" + encode_cursor("x")[:-2] + "!!", "cursor"),
    ("cursor=eyJhZnRlciI6MX0", "cursor"),  # {"after":1}
    ("status=sleeping", "status"), ("environment=prod", "environment"),
    ("prefix=a%25", "prefix"), ("prefix=a_", "prefix"), ("prefix=API", "prefix"), ("prefix=" + "a" * 64, "prefix"),
])
def test_a_bad_query_is_a_400_naming_the_parameter(client, query, field):
    response = client.get(f"/api/v1/endpoints?{query}")
    assert response.status_code == 400
    body = response.get_json()
    assert field in body["errors"] and field in body["error"]


@contextmanager
def counted_queries(app):
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize("path", ["/api/v1/endpoints", "/endpoints"])
def test_a_page_costs_the_same_queries_whatever_its_size(app, client, path):
    add_endpoints(app, [f"ep-{n:02d}" for n in range(40)], instances=3, keys=2)
    counts = {}
    client.get(path)  # the token's first use writes its last-used time (once a minute), not counted
    for limit in (2, 40):
        with counted_queries(app) as statements:
            assert client.get(f"{path}?limit={limit}").status_code == 200
        counts[limit] = len(statements)
    # The endpoints, their instances, their keys; and what any page costs: the caller's token and
    # user, the project names shown (one each), and on the list page each of the user's projects' quota; revisions are one more.
    per_request = 3 if path.startswith("/api/") else 6
    assert counts[2] == counts[40] <= 4 + per_request, counts


def test_the_list_page_filters_and_pages_without_javascript(app, client):
    add_endpoints(app, [f"ep-{n:03d}" for n in range(UI_DEFAULT_LIMIT + 2)], environment="staging")
    add_endpoints(app, ["other"], environment="production", status=RUNNING)
    page = client.get("/endpoints").get_data(as_text=True)
    assert page.count('class="badge status-') == UI_DEFAULT_LIMIT
    assert re.search(r'<form class="filters" method="get"', page) and 'name="prefix"' in page
    next_link = unescape(re.search(r'<a href="([^"]+)">Next page', page).group(1))
    second = client.get(next_link).get_data(as_text=True)
    assert "ep-050" in second and "ep-051" in second and "other" in second and "ep-049" not in second
    assert "Next page" not in second and "First page" in second

    filtered = client.get("/endpoints?environment=production&status=&prefix=").get_data(as_text=True)
    assert "other" in filtered and "ep-000" not in filtered
    assert re.search(r'<option value="production" selected', filtered)
    # The page's live poll asks the API for the same page.
    poll = unescape(re.search(r'data-poll-endpoints="([^"]+)"', filtered).group(1))
    assert client.get(poll).get_json()["endpoints"][0]["name"] == "other" and "environment=production" in poll

    none = client.get("/endpoints?prefix=zzz").get_data(as_text=True)
    assert "No endpoints match these filters" in none


def test_the_list_page_says_what_is_wrong_with_its_query(client):
    response = client.get("/endpoints?status=sleeping&limit=9999")
    assert response.status_code == 400
    text = unescape(response.get_data(as_text=True))
    assert "status must be one of creating, queued" in text and f"between 1 and {MAX_LIMIT}" in text


def test_a_key_revoked_is_not_counted_in_the_list(app, client):
    add_endpoints(app, ["keyed"], keys=1)
    with app.app_context():
        key = db.session.query(ApiKey).one()
        api_keys.revoke_key(db.session, key)
        db.session.commit()
    assert client.get("/api/v1/endpoints").get_json()["endpoints"][0]["has_api_keys"] is False
