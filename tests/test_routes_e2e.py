"""Model code as an endpoint, end to end: git source, built-in runtime, validation at the proxy.

Real Temporal dev server, worker, process backend, gunicorn proxy and runtime processes.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(180)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def git_repo(tmp_path: Path) -> tuple[str, str]:
    """The arith example as a local git repository; returns (url, commit)."""
    repo = tmp_path / "arith-repo"
    shutil.copytree(EXAMPLES / "arith", repo)
    run = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    run("-c", "user.email=t@example.invalid", "-c", "user.name=t", "add", ".")
    run("-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "arith")
    return str(repo), run("rev-parse", "HEAD").stdout.strip()


@pytest.fixture
def arith(proxied, tmp_path):
    stack = proxied
    url, commit = git_repo(tmp_path)
    routes = json.loads((EXAMPLES / "arith" / "routes.json").read_text())
    # Workflow ids live as long as the session's Temporal server: one name per test.
    stack.name = f"arith-{uuid.uuid4().hex[:6]}"
    stack.create_endpoint(stack.name, source_kind="routes", git_url=url, git_ref="main", routes=routes,
                          start_command="", health_path="/ping", startup_timeout_seconds=60,
                          idle_retention_seconds=3600)
    stack.wait_status(stack.name, "standby")
    stack.commit = commit
    return stack


def call(stack, method: str, path: str, **kw):
    return requests.request(method, f"{stack.proxy.url}/e/{stack.name}{path}", timeout=60, **kw)


def test_bad_requests_are_refused_without_waking(arith):
    stack = arith
    r = call(stack, "POST", "/add", json={"a": "two", "b": 3, "c": 1})
    assert r.status_code == 400
    fields = {e["field"] for e in r.json()["errors"]}
    assert fields == {"a", "c"}
    assert call(stack, "POST", "/add", data=b"not json", headers={"Content-Type": "application/json"}).status_code == 400
    assert call(stack, "POST", "/add", json={"a": 1}).status_code == 400  # b missing
    assert call(stack, "POST", "/nope", json={}).status_code == 404
    r = call(stack, "GET", "/add")
    assert r.status_code == 405 and "POST" in r.headers.get("Allow", "")
    # Nothing woke: no instance was ever started for these.
    assert stack.instances(stack.name) == []
    assert stack.endpoint(stack.name).status == "standby"


def test_good_request_wakes_the_runtime_and_is_served(arith):
    stack = arith
    r = call(stack, "POST", "/add", json={"a": 2, "b": 3})
    assert r.status_code == 200, r.text
    assert r.json() == {"sum": 5}
    assert r.headers["Deploy-Cold-Start"] == "true"
    [inst] = stack.instances(stack.name)
    assert r.headers["Deploy-Route-Target"] == inst.id
    # The git ref was resolved at provision time and recorded in the instance's log.
    assert stack.commit in Path(inst.log_path).read_text()
    # GET route with query parameters; an exception in user code is a 500 with JSON.
    assert call(stack, "GET", "/square?x=7").json() == 49
    r = call(stack, "POST", "/fail", json={"message": "kaput"})
    assert r.status_code == 500 and "kaput" in r.json()["error"]
    wait_until(lambda: "kaput" in Path(inst.log_path).read_text(), 10, message="traceback in the instance log")
    assert "Traceback" in Path(inst.log_path).read_text()


def test_streamed_generator_arrives_chunk_by_chunk(arith, tmp_path):
    stack = arith
    release = tmp_path / "release"
    with call(stack, "POST", "/count-until-released", json={"n": 3, "release_file": str(release)},
              stream=True) as r:
        assert r.status_code == 200
        chunks = r.iter_content(chunk_size=None)
        first = next(chunks)
        # The generator is still waiting for the release file: the first chunk came through the
        # proxy before the last one existed.
        assert first.startswith(b"first")
        release.write_text("go")
        rest = b"".join(chunks)
    assert (first + rest).decode().split() == ["first", "1", "2"]
