"""A page on another origin cannot act through the JSON API (webapp/request_guard.py).

The web app serves on 127.0.0.1; an attacker's page is served from 127.0.0.2 (another origin and
another site) and, in headless Chromium, tries every mutating API route from Flask's URL map with
what a page may send without asking: form posts (urlencoded, text/plain shaped as JSON,
multipart), `fetch` in no-cors mode with and without a body, and a JSON `fetch` that needs a CORS
preflight. Nothing may change: no workflow signal, no key, no model, no endpoint edit."""
from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from common.config import load_settings
from common.models import ApiKey, Endpoint, Model, ModelVersion
from tests.conftest import RecordingBridge, free_port, served, with_admin
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, sign_in
from tests.test_hostile_input import mutating_api_rules

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -r requirements-dev.txt)")
pytestmark = [
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"),
    pytest.mark.timeout(240),
]


ATTACK_PAGE = """<!doctype html><html><body><script>
const targets = %s;
let frames = 0;
function submitForm(target, enctype) {
  return new Promise(resolve => {
    const frame = document.createElement("iframe");
    frame.name = "frame" + (frames++);
    document.body.appendChild(frame);
    const form = document.createElement("form");
    form.method = "POST"; form.action = target.url; form.enctype = enctype; form.target = frame.name;
    const input = document.createElement("input");
    // text/plain sends name=value: this one reads as a JSON object to a lax parser.
    input.name = '{"name": "pwned", "padding": "'; input.value = '"}';
    form.appendChild(input);
    document.body.appendChild(form);
    frame.onload = resolve;
    setTimeout(resolve, 3000);
    form.submit();
  });
}
async function attack() {
  for (const target of targets) {
    if (target.method === "POST") {
      for (const enctype of ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"]) {
        await submitForm(target, enctype);
      }
    }
    for (const body of [undefined, "name=pwned", '{"name": "pwned"}']) {
      try { await fetch(target.url, {method: target.method, mode: "no-cors", body: body, credentials: "include"}); }
      catch (e) {}
    }
    try {
      await fetch(target.url, {method: target.method, headers: {"Content-Type": "application/json"},
                               body: '{"name": "pwned"}'});
    } catch (e) {}
  }
  document.title = "done";
}
attack();
</script></body></html>"""


@pytest.fixture
def target(tmp_path):
    """The web app on 127.0.0.1 with a recording bridge; yields (base_url, app, bridge, hits)."""
    from common.schema import upgrade
    from webapp import create_app
    from webapp.extensions import db

    settings = load_settings({"STANDBY_DATA_DIR": str(tmp_path / "data"), "STANDBY_GPUS": "T4:2"})
    bridge = RecordingBridge()
    upgrade(settings.database_url)  # as `app.py web` does before serving
    app = with_admin(create_app({"TESTING": True, "STANDBY_SETTINGS": settings, "SECRET_KEY": "test",
                                 "STANDBY_BRIDGE": bridge}))
    hits: list[tuple[str, str, int]] = []

    @app.after_request
    def record(response):
        from flask import request

        hits.append((request.method, request.path, response.status_code))
        return response

    try:
        with served(app) as url:
            yield url, app, bridge, hits
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def attacker(target):
    """The attacker's page on 127.0.0.2: every mutating route of the target, from its URL map."""
    base_url, app, _bridge, _hits = target
    targets = [{"method": method, "url": base_url + url} for method, url, _ in mutating_api_rules(app)]
    for action in ("terminate", "restart", "wake", "scale-out"):
        targets.append({"method": "POST", "url": f"{base_url}/api/v1/endpoints/victim/{action}"})
    page = (ATTACK_PAGE % json.dumps(targets)).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.2", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{server.server_port}/", targets
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def _state(app) -> dict:
    from webapp.extensions import db

    with app.app_context():
        def rows(model):
            return [{k: v for k, v in vars(row).items() if not k.startswith("_")} for row in db.session.scalars(select(model))]
        return {"endpoints": rows(Endpoint), "keys": rows(ApiKey), "models": rows(Model), "versions": rows(ModelVersion)}


def test_a_cross_origin_page_cannot_act_through_the_api(target, attacker):
    base_url, app, bridge, hits = target
    attack_url, targets = attacker
    client = app.test_client()
    assert client.post("/api/v1/endpoints", json={"name": "victim", "start_command": "python -m http.server $PORT"}
                       ).status_code == 201
    assert client.post("/api/v1/models", json={"name": "victim"}).status_code == 201
    bridge.calls.clear()
    before = _state(app)
    hits.clear()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            sign_in(page, base_url)  # the victim is signed in to Standby in this browser
            # Leave Standby's own list page first: its poll of /api/v1/endpoints is not the attack.
            page.goto("about:blank")
            page.wait_for_timeout(300)
            hits.clear()
            page.goto(attack_url)
            page.wait_for_function("document.title === 'done'", timeout=180_000)
        finally:
            browser.close()

    assert bridge.calls == []  # no workflow was started, signalled or updated
    assert _state(app) == before
    # The attacks did arrive, and each was refused before its view ran.
    acted = [hit for hit in hits if hit[0] != "OPTIONS"]
    assert {(m, p) for m, p, _ in acted} >= {(t["method"], t["url"][len(base_url):]) for t in targets
                                               if t["method"] == "POST"}
    assert all(status in (403, 415) for _, _, status in acted), acted
