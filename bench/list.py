"""The endpoint list at 500 endpoints: the API's page of 50 and the list page, against a page of 1.

    .venv/bin/python bench/list.py [--endpoints 500] [--instances 3] [--runs 30]

Makes a fresh data directory and SQLite database at the current schema and writes the endpoints
as the web app writes them (the spec through `validate_spec`, then the row), each with
`--instances` instance rows as the worker writes them (one ready, the others stopped) and an API
key on every other one. Then it serves the web app over HTTP on a free loopback port (werkzeug,
a thread, as in tests/test_api_contract.py) with Temporal a closed port (the list never asks it),
and times each request with one keep-alive client: a warm-up, then the median and p90 of
`--runs`. The baseline, measured in the same run, is the same request for a page of 1 endpoint:
what any request costs here (HTTP, Flask, the session), so the ratio is what the page itself
adds. The SQL statements of one request are counted too: a page is three, whatever its size.
Nothing here is a test: no figure is asserted.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import load_settings  # noqa: E402
from common.db import Database  # noqa: E402
from common.models import RUNNING, STANDBY, STOPPED, Endpoint, Instance  # noqa: E402
from common.schema import upgrade  # noqa: E402
from tests.conftest import free_port, served  # noqa: E402
from webapp import api_keys, create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.spec import validate_spec  # noqa: E402

STATUSES = (STANDBY, RUNNING, STOPPED)
ENVIRONMENTS = ("development", "staging", "production")


def write_endpoints(settings, count: int, instances: int) -> None:
    database = Database(settings.database_url)
    with database.session() as session:
        for n in range(count):
            spec = {"name": f"bench-{n:04d}", "start_command": "python -m http.server $PORT",
                    "environment": ENVIRONMENTS[n % 3], "description": f"endpoint number {n}",
                    "env": [{"key": "MODE", "value": "fast"}, {"key": "TOKEN", "value": "s3cret", "secret": True}]}
            clean, errors = validate_spec(spec, existing=None, settings=settings)
            assert not errors, errors
            endpoint = Endpoint(**clean, status=STATUSES[n % 3])
            session.add(endpoint)
            session.flush()
            for i in range(instances):
                session.add(Instance(id=f"b{n:04d}i{i}", endpoint_id=endpoint.id, host="bench", address="127.0.0.1:1",
                                     status="ready" if i == 0 and endpoint.status == RUNNING else "stopped",
                                     gpu_seconds=12.5))
            if n % 2 == 0:
                api_keys.create_key(session, endpoint, "ci")
    database.engine.dispose()


def timed(session: requests.Session, url: str, runs: int) -> tuple[float, float]:
    """(median, p90) in ms of `runs` GETs of `url`, after a warm-up."""
    for _ in range(3):
        session.get(url).raise_for_status()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = session.get(url)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.9) - 1)]


def statements_of(app, session: requests.Session, url: str) -> int:
    with app.app_context():
        engine = db.engine
    seen = []

    def record(*_):
        seen.append(1)

    event.listen(engine, "before_cursor_execute", record)
    try:
        session.get(url).raise_for_status()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return len(seen)


def bootstrap(settings):
    from common.accounts import bootstrap_first_admin
    from common.db import Database

    database = Database(settings.database_url)
    try:
        with database.session() as session:
            return bootstrap_first_admin(session, settings.data_dir)
    finally:
        database.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", type=int, default=500)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({"STANDBY_DATA_DIR": tmp, "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
        upgrade(settings.database_url)
        write_endpoints(settings, args.endpoints, args.instances)
        app = create_app({"STANDBY_SETTINGS": settings, "SECRET_KEY": "bench"})
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        first = bootstrap(settings)  # a site admin, as `up` makes it: sees every endpoint
        try:
            with served(app) as base, requests.Session() as session:
                session.headers["Authorization"] = f"Bearer {first.token_file.read_text().strip()}"
                middle = session.get(f"{base}/api/v1/endpoints?limit={args.endpoints // 2}").json()["next"]
                page_of_1 = "/api/v1/endpoints?limit=1"
                cases = [  # (what, its URL, its baseline's URL)
                    ("API, first page of 50", "/api/v1/endpoints?limit=50", page_of_1),
                    ("API, a page of 50 mid-list", f"/api/v1/endpoints?limit=50&cursor={middle}", page_of_1),
                    ("API, filtered (status) page", "/api/v1/endpoints?limit=50&status=running", page_of_1),
                    (f"API, all {args.endpoints} in one page", f"/api/v1/endpoints?limit={args.endpoints}", page_of_1),
                    ("list page (50 a page)", "/endpoints", "/endpoints?limit=1"),
                ]
                print(f"{args.endpoints} endpoints, {args.instances} instances each; median / p90 of {args.runs} "
                      "requests, ms")
                print(f"{'request':36} {'median':>8} {'p90':>8} {'page of 1':>10} {'ratio':>6} {'SQL':>4}")
                for label, url, baseline_url in cases:
                    median, p90 = timed(session, base + url, args.runs)
                    baseline, _ = timed(session, base + baseline_url, args.runs)
                    statements = statements_of(app, session, base + url)
                    print(f"{label:36} {median:8.1f} {p90:8.1f} {baseline:10.1f} {median / baseline:6.2f} "
                          f"{statements:4d}")
        finally:
            app.extensions["temporal_bridge"].close()


if __name__ == "__main__":
    main()
