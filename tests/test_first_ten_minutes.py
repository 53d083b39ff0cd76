"""A new user's first ten minutes, in the user's world (tests/user_world.py): `app.py up`, the JSON
API and the proxy, with defaults. Each test here failed before issue 7 was fixed:

- the hosted tutorial's server (`python -m http.server 8080`, port 8080) never became ready
  (the port was ignored, and the default health path answered 404);
- route rules answered 1006 for a running instance right after a cold start, and warm requests
  claimed `Deploy-Cold-Start: true`;
- a start that could not succeed held its requests for the whole startup timeout;
- an idle instance was released seconds after its retention;
- `GET /e/<name>/ping` of a routes endpoint answered 404.
"""
from __future__ import annotations

import concurrent.futures
import subprocess
import io
import json
import tarfile
import time
from datetime import datetime

import pytest

from tests.conftest import ROOT, wait_until
from tests.user_world import unique

pytestmark = pytest.mark.timeout(240)

# The tutorial, verbatim (README "Your first endpoint in one minute").
TUTORIAL_COMMAND = "python -m http.server 8080"
# A server users would write with a fixed port, that can also take its time on /sleep?s=.
SLOW_SERVER = f"python {ROOT / 'tests' / 'proxy_instance.py'} 8080 slowserver"


def stamp(value: str | None) -> float:
    return datetime.fromisoformat(value).timestamp()


def test_the_tutorial_server_as_written_serves_scales_out_and_routes(user):
    name = unique("tutorial")
    user.create({"name": name, "start_command": TUTORIAL_COMMAND, "port": 8080, "max_instances": 2})
    user.wait_status(name, "standby")

    first = user.call(name, "/")
    assert first.status_code == 200, first.text
    assert "Directory listing" in first.text
    assert first.headers["Deploy-Cold-Start"] == "true"
    one = first.headers["Deploy-Route-Target"]

    # Right after the cold start: warm, and every route rule finds the running instance.
    warm = user.call(name, "/")
    assert warm.status_code == 200 and warm.headers["Deploy-Cold-Start"] == "false"
    for rule in (one, "random", "round-robin"):
        r = user.call(name, "/", headers={"Deploy-Route-Rule": rule})
        assert r.status_code == 200, (rule, r.text)
        assert r.headers["Deploy-Route-Target"] == one and r.headers["Deploy-Cold-Start"] == "false"

    # Scale-out starts a second instance of the same fixed-port command on this host.
    out = user.call(name, "/", headers={"Deploy-Route-Rule": "scale-out"})
    assert out.status_code == 200, out.text
    two = out.headers["Deploy-Route-Target"]
    assert two != one and out.headers["Deploy-Cold-Start"] == "true"
    assert user.call(name, "/", headers={"Deploy-Route-Rule": two}).headers["Deploy-Route-Target"] == two
    # At max instances: 1007.
    refused = user.call(name, "/", headers={"Deploy-Route-Rule": "scale-out"})
    assert refused.status_code == 429 and refused.json()["code"] == 1007

    # Round robin (the default balancing) alternates between the two.
    targets = [user.call(name, "/").headers["Deploy-Route-Target"] for _ in range(6)]
    assert set(targets) == {one, two}
    assert all(a != b for a, b in zip(targets, targets[1:])), targets
    assert {user.call(name, "/", headers={"Deploy-Route-Rule": "random"}).headers["Deploy-Route-Target"]
            for _ in range(20)} == {one, two}

    instances = [i for i in user.endpoint(name)["instances"] if i["status"] == "ready"]
    assert sorted(i["id"] for i in instances) == sorted([one, two])
    assert len({i["address"] for i in instances}) == 2  # one port each on the host, 8080 inside
    assert user.api("POST", f"/endpoints/{name}/stop").status_code == 202


def test_only_the_requests_that_waited_for_the_start_are_cold(user):
    name = unique("coldflag")
    user.create({"name": name, "start_command": f"sh -c 'sleep 1; exec {TUTORIAL_COMMAND}'", "port": 8080})
    user.wait_status(name, "standby")
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        held = list(pool.map(lambda _: user.call(name, "/"), range(5)))
    assert [r.status_code for r in held] == [200] * 5
    assert [r.headers["Deploy-Cold-Start"] for r in held] == ["true"] * 5
    later = [user.call(name, "/") for _ in range(5)]
    assert [r.headers["Deploy-Cold-Start"] for r in later] == ["false"] * 5
    assert len({r.headers["Deploy-Route-Target"] for r in held + later}) == 1
    user.api("POST", f"/endpoints/{name}/stop")


def test_a_start_that_cannot_succeed_answers_every_held_request_at_once(user):
    name = unique("brokenstart")
    command = ("python -c \"import sys; print('cannot open model.bin: no such file', flush=True); "
               "sys.exit(3)\"")
    user.create({"name": name, "start_command": command, "port": 8080})
    user.wait_status(name, "standby")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: user.call(name, "/"), range(3)))
    took = time.monotonic() - started
    assert [a.status_code for a in answers] == [503] * 3, [a.text for a in answers]
    assert took < 30, f"held for {took:.1f}s; the startup timeout is 20 minutes"
    for answer in answers:
        reason = answer.json()["reason"]
        assert "exited with code 3" in reason and "cannot open model.bin" in reason, reason
    body = user.wait_status(name, "failed")
    assert "exited with code 3" in body["status_reason"]
    # Later requests are told the same, without waking anything.
    again = user.call(name, "/")
    assert again.status_code == 503 and "cannot open model.bin" in again.json()["msg"]


def test_a_client_bounds_its_own_wait_with_x_scale_up_timeout(user):
    name = unique("slowstart")
    user.create({"name": name, "start_command": f"sh -c 'sleep 6; exec {TUTORIAL_COMMAND}'", "port": 8080})
    user.wait_status(name, "standby")
    started = time.monotonic()
    r = user.call(name, "/", headers={"X-Scale-Up-Timeout": "0.5"})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
    assert "X-Scale-Up-Timeout" in r.json()["msg"]
    assert time.monotonic() - started < 5
    # The start goes on: a patient request is served.
    assert user.call(name, "/").status_code == 200
    bad = user.call(name, "/", headers={"X-Scale-Up-Timeout": "soon"})
    assert bad.status_code == 400 and "X-Scale-Up-Timeout" in bad.json()["msg"]
    user.api("POST", f"/endpoints/{name}/stop")


def test_a_starting_instance_says_what_its_probe_sees(user):
    """A health path the server does not have: the API and the detail page say what the probe
    got, while it starts, instead of silence until the startup timeout."""
    name = unique("wronghealth")
    user.create({"name": name, "start_command": TUTORIAL_COMMAND, "port": 8080, "health_path": "/healthz",
                 "min_instances": 1})

    def probing():
        instances = user.endpoint(name)["instances"]
        return instances and "HTTP 404" in (instances[0]["reason"] or "") and instances[0]
    instance = wait_until(probing, 30, interval=0.2, message="the probe's answer on the instance")
    assert instance["reason"] == "GET /healthz -> HTTP 404, waiting for HTTP 200 from /healthz"
    page = user.browser().get(f"{user.web}/endpoints/{name}", timeout=10).text
    assert "GET /healthz -&gt; HTTP 404, waiting for HTTP 200 from /healthz" in page
    assert user.api("POST", f"/endpoints/{name}/terminate").status_code == 202


def test_an_idle_instance_is_released_on_time_and_never_mid_request(user):
    name = unique("idletime")
    retention = 4
    user.create({"name": name, "start_command": SLOW_SERVER, "port": 8080,
                 "idle_retention_seconds": retention})
    user.wait_status(name, "standby")
    # A request longer than the retention keeps its instance.
    slow = user.call(name, "/sleep?s=6")
    assert slow.status_code == 200
    ended = time.time()
    target = slow.headers["Deploy-Route-Target"]

    def stopped_at():
        for inst in user.endpoint(name)["instances"]:
            if inst["id"] == target and inst["stopped_at"]:
                return stamp(inst["stopped_at"])
        return None
    released = wait_until(stopped_at, retention + 20, interval=0.1, message="the idle release")
    late = released - ended
    assert retention - 0.5 <= late <= retention + 1.0, f"released {late:.2f}s after the last request"
    user.wait_status(name, "standby")


def _arith_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in (ROOT / "examples" / "arith").iterdir():
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def test_ping_of_a_routes_endpoint_answers_200_without_waking_it(user):
    name = unique("pingarith")
    assert user.api("POST", "/models", json={"name": name}).status_code == 201
    version = user.api("POST", f"/models/{name}/versions",
                       files={"archive": ("arith.tar.gz", _arith_archive(), "application/gzip")})
    assert version.status_code == 201, version.text
    routes = json.loads((ROOT / "examples" / "arith" / "routes.json").read_text())
    user.create({"name": name, "source_kind": "routes", "model_version_id": version.json()["id"], "routes": routes})
    user.wait_status(name, "standby")

    # The proxy answers from its view, which follows the database within its refresh.
    wait_until(lambda: user.call(name, "/ping").json()["status"] == "standby", 5, 0.1, "the proxy's view")
    ping = user.call(name, "/ping")
    assert ping.status_code == 200 and ping.json()["status"] == "standby"
    time.sleep(1.0)
    assert user.endpoint(name)["instances"] == [] and user.endpoint(name)["status"] == "standby"

    add = user.call(name, "/add", method="POST", json={"a": 2, "b": 3})
    assert add.status_code == 200 and add.json() == {"sum": 5}
    served = user.call(name, "/ping")  # now the runtime answers it
    assert served.status_code == 200 and served.headers["Deploy-Route-Target"]
    user.api("POST", f"/endpoints/{name}/stop")


def test_the_readmes_api_commands_work_as_written(user):
    """README "Your first endpoint in one minute", the JSON API block, copy-pasted: only the ports
    (a test's own) and the endpoint's name (unique in the session) differ."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("The same with the JSON API"):]
    block = block[block.index("```sh") + 5:]
    block = block[:block.index("```")]
    name = unique("readmetutorial")
    script = (block.replace("localhost:5000", user.web.removeprefix("http://"))
              .replace("localhost:8000", user.proxy.removeprefix("http://"))
              .replace('"tutorial"', f'"{name}"').replace("/e/tutorial/", f"/e/{name}/"))
    assert "cat data/cli-token" in script  # the token `up` wrote, read where the README says
    done = subprocess.run(["bash", "-euc", script], cwd=user.tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Directory listing" in done.stdout and "Deploy-Cold-Start: true" in done.stdout, done.stdout
    user.wait_status(name, "running")
    user.api("POST", f"/endpoints/{name}/stop")


def test_up_says_how_to_sign_in_and_the_api_wants_it(user):
    log = user.log()
    assert "Sign in as admin with password" in log and "export STANDBY_TOKEN=$(cat " in log
    assert oct((user.tmp_path / "data" / "cli-token").stat().st_mode & 0o777) == "0o600"
    import requests

    anonymous = requests.get(f"{user.web}/api/v1/endpoints", timeout=10)
    assert anonymous.status_code == 401 and "Authorization: Bearer" in anonymous.json()["error"]
    assert user.api("GET", "/me").json()["name"] == "admin"
    page = requests.get(f"{user.web}/endpoints", timeout=10, allow_redirects=False)
    assert page.status_code == 302 and "/login" in page.headers["Location"]
