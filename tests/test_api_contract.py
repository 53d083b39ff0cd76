"""schemathesis against the live API: the web app served over HTTP on a free loopback port, checked
against its own OpenAPI document (/api/v1/openapi.json) through every phase (examples, boundary
coverage, fuzzing, stateful sequences), positive and negative inputs.

Checks (tests/contract_hooks.py): every status is documented, every body matches its schema and
media type, and no 5xx but the documented 503 while Temporal is unreachable. Temporal is a closed
port on purpose: with a worker, the generated specs would be started, and a generated
start_command is run by a shell.

Bounded for CI: STANDBY_CONTRACT_SECONDS (default 60) for the whole run and
STANDBY_CONTRACT_EXAMPLES (default 100) per operation; raise both for a longer run. A failure
prints the request that shows it, as a curl command line.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections import Counter

import pytest
import requests
from sqlalchemy import select

from common.models import RUNNING, STANDBY, STOPPED, Endpoint, Instance
from tests.conftest import ADMIN, ROOT, served, token_for, web_app
from tests.contract_hooks import OWN_TOKEN_ID, SEEDED
from webapp import api_keys
from webapp.extensions import db
from webapp.registry import add_git_version, create_model

SECONDS = float(os.environ.get("STANDBY_CONTRACT_SECONDS", "40"))
EXAMPLES = int(os.environ.get("STANDBY_CONTRACT_EXAMPLES", "100"))
CHECKS = ("status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance", "unsupported_method", "temporal_outage_is_the_only_server_error")

pytestmark = pytest.mark.timeout(SECONDS + 240)


def seed(app) -> None:
    """The rows SEEDED names: endpoints in three states (with instances and keys) and models."""
    standby, running, stopped = SEEDED["name"]
    with app.app_context():
        for name, status in ((standby, STANDBY), (running, RUNNING), (stopped, STOPPED)):
            endpoint = Endpoint(name=name, start_command="python -m http.server $PORT", status=status)
            db.session.add(endpoint)
            db.session.flush()
            db.session.add(Instance(id=status[:8], endpoint_id=endpoint.id, host="h", address="127.0.0.1:1",
                                    status="ready" if status == RUNNING else "stopped", gpu_seconds=1.0))
            if name == standby:
                for _ in SEEDED["key_id"]:
                    api_keys.create_key(db.session, endpoint, "ci")
            db.session.commit()
            add_git_version(create_model(name, "seeded"), "https://example.com/m.git", "main")
    for _ in SEEDED["token_id"]:  # tokens the operations on a token may revoke (not the one it runs with)
        token_for(app, ADMIN, "seeded")


def own_token(app) -> str:
    """The token schemathesis runs with, at an id it does not pick for DELETE /tokens/{token_id}
    (contract_hooks.py OWN_TOKEN_ID): revoking it would make every later call a 401."""
    from common import accounts
    from common.account_models import ApiToken

    plaintext = token_for(app, ADMIN, "schemathesis")
    with app.app_context():
        row = db.session.scalar(select(ApiToken).where(ApiToken.token_hash == accounts.hash_token(plaintext)))
        row.id = OWN_TOKEN_ID
        db.session.commit()
    return plaintext


class StatusTally:
    """WSGI wrapper counting the statuses the app answered."""

    def __init__(self, app):
        self.app, self.counts, self.lock = app, Counter(), threading.Lock()

    def __call__(self, environ, start_response):
        def counting_start_response(status, headers, *args):
            with self.lock:
                self.counts[int(status.split()[0])] += 1
            return start_response(status, headers, *args)

        return self.app(environ, counting_start_response)


@pytest.fixture
def live_api(tmp_path):
    for app in web_app(tmp_path):
        seed(app)
        tally = StatusTally(app)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # thousands of requests: no line each
        with served(tally) as url:
            yield url, tally, own_token(app)


def test_schemathesis_finds_no_answer_outside_the_document(live_api, tmp_path):
    url, tally, token = live_api
    report = tmp_path / "schemathesis.json"
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/api/v1/openapi.json",
               "--header", f"Authorization: Bearer {token}",
               "--checks", ",".join(CHECKS), "--mode", "all", "--max-time", str(int(SECONDS)),
               "--max-examples", str(EXAMPLES), "--workers", "1", "--request-timeout", "30",
               "--report", "json", "--report-json-path", str(report)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.contract_hooks", "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    # Run in tmp_path: schemathesis keeps a cache of what it found in its working directory.
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SECONDS + 180)
    summary = json.loads(report.read_text()) if report.exists() else {}
    print(f"\nschemathesis: {summary.get('test_cases')}; answers: "
          + ", ".join(f"{status} x{count}" for status, count in sorted(tally.counts.items())))
    assert done.returncode == 0, done.stdout[-30000:] + done.stderr[-5000:]
    operations = summary["operations"]
    assert operations["tested"] == operations["total"] >= 17 and operations["errored"] == 0, operations
    assert summary["test_cases"]["generated"] >= 100 and not summary["failures"] and not summary["errors"]
    # The seeded rows were reached: not only refusals came back.
    assert tally.counts[200] and tally.counts[201] and tally.counts[503], tally.counts
    # It ran signed in all along (its 401s are its own checks of requests without credentials).
    assert requests.get(f"{url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
