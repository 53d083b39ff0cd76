"""Revisions, the traffic split and updates, end to end (README.md "Revisions and updates").

One `app.py up` for the module (its own worker, web app and proxy; the session's Temporal), used
as a user uses it: the JSON API to change endpoints, real instance processes, every request
through the real proxy. Only the update timers are short (settings: a new instance settles for a
second, not ten). Each update runs under a bounded client loop (`Load`) that counts what failed;
the counts are printed at the end of the module.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.conftest import temporal_bin, wait_until
from tests.user_world import UpProcess, unique

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SERVER = f"{sys.executable} -m http.server $PORT --bind 127.0.0.1"
RESULTS: list[tuple[str, int, int, str]] = []


@pytest.fixture(scope="module")
def world(tmp_path_factory, temporal_server):
    up = UpProcess(tmp_path_factory.mktemp("revisions"), temporal_address=temporal_server, extra_env={
        "STANDBY_ROLLOUT_SETTLE_SECONDS": "1",
        "STANDBY_MIN_STARTUP_TIMEOUT_SECONDS": "1",
        # The pinning test's model code comes from a local git repository (off by default).
        "STANDBY_ALLOW_FILE_GIT": "1",
    }).start()
    yield up
    status = up.stop()
    if RESULTS:
        lines = ["", "updates under load: what clients saw"]
        lines += [f"  {kind:<46} served {served:>5}  failed {failed:>3}  {note}" for kind, served, failed, note in RESULTS]
        sys.__stdout__.write("\n".join(lines) + "\n")
    assert status == 0, up.log()[-3000:]


# ---- helpers ------------------------------------------------------------------------------------


def create(world: UpProcess, name: str, **spec) -> str:
    name = unique(name)
    world.create({"name": name, "start_command": SERVER, "startup_timeout_seconds": 30, **spec})
    return name


def revisions(world: UpProcess, name: str) -> dict:
    answer = world.api("GET", f"/endpoints/{name}/revisions")
    assert answer.status_code == 200, answer.text
    return answer.json()


def revision(world: UpProcess, name: str, number: int) -> dict:
    return next(r for r in revisions(world, name)["revisions"] if r["number"] == number)


def wait_traffic(world: UpProcess, name: str, traffic: dict, timeout: float = 90) -> dict:
    return wait_until(lambda: (body := revisions(world, name))["traffic"] == traffic and body, timeout, 0.1,
                      f"{name}'s traffic to be {traffic}")


def wait_state(world: UpProcess, name: str, number: int, state: str, timeout: float = 90) -> dict:
    def check():
        found = revision(world, name, number)
        return found if found["state"] == state else None

    try:
        return wait_until(check, timeout, 0.1, f"revision {number} of {name} to be {state}")
    except AssertionError:
        raise AssertionError(f"{revisions(world, name)}\nup log:\n{world.log()[-4000:]}") from None


def ready_instances(world: UpProcess, name: str, revision_number: int | None = None) -> list[dict]:
    return [i for i in world.endpoint(name)["instances"] if i["status"] == "ready"
            and (revision_number is None or i["revision"] == revision_number)]


def live_of(world: UpProcess, name: str, number: int) -> int:
    return revision(world, name, number)["live_instances"]


def events(world: UpProcess, name: str) -> list[dict]:
    return world.api("GET", f"/endpoints/{name}/events").json()["events"]


def patch(world: UpProcess, name: str, body: dict, **query) -> dict:
    answer = world.api("PATCH", f"/endpoints/{name}", json=body, params=query)
    assert answer.status_code == 200, answer.text
    return answer.json()


class Load:
    """A bounded client loop: one client sending GETs through the proxy, one after another, until
    stopped or `limit` seconds passed. Keeps each answer's revision, instance and cold start."""

    def __init__(self, world: UpProcess, name: str, path: str = "/", limit: float = 150.0):
        self.url = f"{world.proxy}/e/{name}{path}"
        self.limit = limit
        self.answers: list[tuple[str, str, str]] = []  # (Deploy-Revision, Deploy-Route-Target, Deploy-Cold-Start)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        wait_until(lambda: self.answers or self.failures, 60, 0.05, "the first answer")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        session = requests.Session()
        ends = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < ends:
            try:
                answer = session.get(self.url, timeout=30)
                if answer.status_code == 200:
                    self.answers.append((answer.headers.get("Deploy-Revision", ""),
                                         answer.headers.get("Deploy-Route-Target", ""),
                                         answer.headers.get("Deploy-Cold-Start", "")))
                else:
                    self.failures.append(f"HTTP {answer.status_code}: {answer.text[:200]}")
            except requests.RequestException as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.005)

    def more(self, count: int = 20, timeout: float = 30) -> None:
        """Wait for `count` more answers."""
        target = len(self.answers) + count
        wait_until(lambda: len(self.answers) >= target, timeout, 0.05, f"{count} more answers")

    def revisions(self) -> list[str]:
        return [rev for rev, _, _ in self.answers]


def record(kind: str, load: Load, note: str = "") -> None:
    RESULTS.append((kind, len(load.answers), len(load.failures), note))


def worker_pid(world: UpProcess) -> int:
    found = re.findall(r"started worker \(pid (\d+)\)", world.log())
    assert found, world.log()[-2000:]
    return int(found[-1])


# ---- updates ------------------------------------------------------------------------------------


def test_a_rolling_update_under_steady_load_fails_no_request(world):
    name = create(world, "roll-good", min_instances=2, max_instances=2)
    wait_until(lambda: len(ready_instances(world, name)) == 2, 60, 0.1, "two instances")
    old = {i["id"] for i in ready_instances(world, name)}
    with Load(world, name) as load:
        load.more()
        changed = patch(world, name, {"env": [{"key": "GREETING", "value": "v2"}]}, restart="true")
        assert (changed["revision"], changed["strategy"], changed["restarted"]) == (2, "rolling", True)
        wait_state(world, name, 2, "serving")
        wait_until(lambda: live_of(world, name, 1) == 0, 60, 0.1, "the old instances gone")
        load.more()
        seen = load.revisions()
        body = revisions(world, name)
        assert body["traffic"] == {"2": 100}
        assert [r["state"] for r in body["revisions"]] == ["serving", "retired"]
        assert body["revisions"][0]["changes"] == [{"field": "env", "from": [], "to": [
            {"key": "GREETING", "value": "v2", "secret": False}]}]
        assert not old & {i["id"] for i in ready_instances(world, name)}
        assert any(e["kind"] == "rollout_succeeded" for e in events(world, name))

        # Rollback from the Temporal CLI, as an operator would: revision 1 comes back, rolling.
        mark = len(load.answers)
        cli = subprocess.run([temporal_bin(), "workflow", "update", "execute", "--address",
                              world.env["TEMPORAL_ADDRESS"], "--workflow-id", f"endpoint-{name}", "--name", "rollback"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        wait_state(world, name, 1, "serving")
        wait_state(world, name, 2, "failed")
        wait_until(lambda: live_of(world, name, 2) == 0, 60, 0.1, "revision 2's instances gone")
        load.more()
    record("rolling (2 instances replaced), then rollback", load)
    assert load.failures == [], load.failures[:5]
    assert "1" in seen and seen[-1] == "2"
    # One at a time: both revisions served side by side while the update ran.
    assert "1" in seen[seen.index("2"):]
    assert load.revisions()[-1] == "1" and "2" in load.revisions()[mark:]
    assert revisions(world, name)["traffic"] == {"1": 100}


def test_a_rolling_update_that_fails_readiness_rolls_back_and_fails_no_request(world):
    name = create(world, "roll-bad", min_instances=1)
    wait_until(lambda: ready_instances(world, name), 60, 0.1, "an instance")
    [old] = ready_instances(world, name)
    with Load(world, name) as load:
        load.more()
        patch(world, name, {"start_command": f"{sys.executable} -c 'import sys; sys.exit(3)'"}, restart="true")
        failed = wait_state(world, name, 2, "failed")
        load.more()
    record("rolling to a revision failing readiness", load, "rolled back")
    assert load.failures == [], load.failures[:5]
    assert set(load.revisions()) == {"1"}
    assert "exit" in failed["state_reason"] and failed["traffic"] == 0
    assert revisions(world, name)["traffic"] == {"1": 100}
    assert [i["id"] for i in ready_instances(world, name)] == [old["id"]]
    assert world.endpoint(name)["status"] == "running"
    rolled_back = [e for e in events(world, name) if e["kind"] == "rollout_rolled_back"]
    assert rolled_back and "never became ready" in rolled_back[0]["message"]


def test_a_canary_at_10_percent_gets_10_percent_then_is_promoted(world):
    name = create(world, "canary", min_instances=1)
    wait_until(lambda: ready_instances(world, name), 60, 0.1, "an instance")
    changed = patch(world, name, {"env": [{"key": "GREETING", "value": "canary"}]}, strategy="canary", steps="10",
                    pause="manual")
    assert changed["strategy"] == "canary"
    wait_traffic(world, name, {"1": 90, "2": 10})
    assert world.api("PUT", f"/endpoints/{name}/traffic", json={"traffic": {"1": 50, "2": 50}}).status_code == 409
    session = requests.Session()
    # The proxy's view follows the split within its refresh (a second): count from its first
    # answer from the canary.
    wait_until(lambda: session.get(f"{world.proxy}/e/{name}/", timeout=30).headers.get("Deploy-Revision") == "2",
               10, 0, "the proxy to route to the canary")
    seen: Counter = Counter()
    failed = 0
    for _ in range(1000):
        answer = session.get(f"{world.proxy}/e/{name}/", timeout=30)
        if answer.status_code == 200:
            seen[answer.headers["Deploy-Revision"]] += 1
        else:
            failed += 1
    RESULTS.append(("canary at 10% (1000 requests)", sum(seen.values()), failed, f"revision 2 got {seen['2']}"))
    assert failed == 0
    assert 70 <= seen["2"] <= 130, seen

    with Load(world, name) as load:
        assert world.api("POST", f"/endpoints/{name}/promote").status_code == 202
        wait_traffic(world, name, {"2": 100})
        wait_state(world, name, 2, "serving")
        # The proxy's view follows within its refresh (a second). One answer from revision 2 is
        # not enough: the canary's own 10% answers from revision 2 until the view changes.
        wait_until(lambda: load.revisions()[-10:] == ["2"] * 10, 10, 0.05, "only answers from revision 2")
        load.more()
    record("canary promoted to 100%", load)
    assert load.failures == [] and load.revisions()[-1] == "2"


def test_traffic_split_by_hand_checks_its_sum_and_wakes_a_revision_at_zero(world):
    name = create(world, "split", min_instances=1, max_instances=3)
    wait_until(lambda: ready_instances(world, name), 60, 0.1, "an instance")
    patch(world, name, {"env": [{"key": "GREETING", "value": "two"}]}, restart="true")
    wait_state(world, name, 2, "serving")
    wait_until(lambda: live_of(world, name, 1) == 0, 60, 0.1, "revision 1 to have no instance")

    bad = world.api("PUT", f"/endpoints/{name}/traffic", json={"traffic": {"1": 50, "2": 40}})
    assert bad.status_code == 400 and "sum to 100" in bad.json()["errors"]["traffic"], bad.text
    missing = world.api("PUT", f"/endpoints/{name}/traffic", json={"traffic": {"1": 50, "9": 50}})
    assert missing.status_code == 400 and "revision 9 does not exist" in missing.json()["error"]
    assert revisions(world, name)["traffic"] == {"2": 100}  # nothing changed

    ok = world.api("PUT", f"/endpoints/{name}/traffic", json={"traffic": {"1": 10, "2": 90}})
    assert ok.status_code == 200 and ok.json() == {"traffic": {"1": 10, "2": 90}}
    wait_traffic(world, name, {"1": 10, "2": 90})
    time.sleep(1.5)  # the proxy's view (refreshed every second) has the split
    answers = [requests.get(f"{world.proxy}/e/{name}/", timeout=60) for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    woke = [a for a in answers if a.headers["Deploy-Revision"] == "1"]
    # Revision 1 had no instance: its first routed request woke it (a cold start), once.
    assert len(woke) == 1 and woke[0].headers["Deploy-Cold-Start"] == "true"
    assert [a.headers["Deploy-Revision"] for a in answers].count("2") == 9
    # Pinning an instance works across revisions.
    target = woke[0].headers["Deploy-Route-Target"]
    pinned = requests.get(f"{world.proxy}/e/{name}/", headers={"Deploy-Route-Rule": target}, timeout=30)
    assert pinned.headers["Deploy-Route-Target"] == target and pinned.headers["Deploy-Revision"] == "1"

    # Rollback: all traffic back to the last good revision, at once.
    back = world.api("POST", f"/endpoints/{name}/rollback")
    assert back.status_code == 202 and back.json()["revision"] == 2
    wait_traffic(world, name, {"2": 100})


@pytest.mark.xfail(strict=False, reason=(
    "open bug: in about one full-suite run in three, the old set's instance is replaced during the "
    "blue-green window, so the rollback lands on a new revision-1 instance (README.md \"Revisions and "
    "updates\"; the assertion prints the endpoint's events)"))
def test_blue_green_switches_at_once_and_rolls_back_to_the_warm_old_set(world):
    name = create(world, "bluegreen", min_instances=1)
    wait_until(lambda: ready_instances(world, name), 60, 0.1, "an instance")
    old = {i["id"] for i in ready_instances(world, name)}
    with Load(world, name) as load:
        load.more()
        patch(world, name, {"env": [{"key": "GREETING", "value": "green"}]}, strategy="blue-green", window="120")
        wait_traffic(world, name, {"2": 100})
        # The proxy's view follows within its refresh (a second).
        wait_until(lambda: "2" in load.revisions(), 10, 0.05, "answers from revision 2")
        load.more(40)
        seen = load.revisions()
        switched = seen.index("2")
        assert set(seen[:switched]) == {"1"} and set(seen[switched:]) == {"2"}, "not switched at once"
        # The old set is kept, ready, for the rollback window.
        assert old <= {i["id"] for i in ready_instances(world, name, 1)}
        mark = len(load.answers)
        assert world.api("POST", f"/endpoints/{name}/rollback").status_code == 202
        wait_traffic(world, name, {"1": 100})
        wait_state(world, name, 2, "failed")
        # The proxy's view follows within its refresh (a second).
        wait_until(lambda: "1" in [rev for rev, _, _ in load.answers[mark:]], 10, 0.05, "answers from revision 1")
        load.more(40)
        back = load.answers[mark:]
        first_back = [rev for rev, _, _ in back].index("1")
        assert {rev for rev, _, _ in back[first_back:]} == {"1"}
        # Back on the old set, kept warm through the window. (In a loaded full-suite run, answers
        # after the rollback came once from a freshly started revision-1 instance beside the old
        # one: the old set was still there, but not the only one serving. Not explained yet.)
        assert old <= {i["id"] for i in ready_instances(world, name, 1)}, (
            old, [(e["kind"], e["message"]) for e in world.api("GET", f"/endpoints/{name}/events").json()["events"]])
    record("blue-green switch, then rollback", load)
    assert load.failures == [], load.failures[:5]
    assert "rolled back by request" in revision(world, name, 2)["state_reason"]


def test_a_worker_killed_mid_rollout_finishes_the_rollout(world):
    name = create(world, "roll-kill", min_instances=2, max_instances=2)
    wait_until(lambda: len(ready_instances(world, name)) == 2, 60, 0.1, "two instances")
    with Load(world, name) as load:
        load.more()
        # A longer settle keeps the update mid-way while the worker dies.
        patch(world, name, {"env": [{"key": "GREETING", "value": "after"}]}, strategy="rolling", settle="4")
        wait_until(lambda: ready_instances(world, name, 2), 60, 0.05, "the first new instance")
        pid = worker_pid(world)
        os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: worker_pid(world) != pid, 60, 0.1, "up to restart the worker")
        wait_state(world, name, 2, "serving", timeout=150)
        wait_until(lambda: live_of(world, name, 1) == 0, 60, 0.1, "the old instances gone")
        load.more()
    record("rolling, worker SIGKILLed mid-rollout", load)
    assert load.failures == [], load.failures[:5]
    assert revisions(world, name)["traffic"] == {"2": 100}
    assert len(ready_instances(world, name, 2)) == 2


def test_scale_sets_the_instance_count_in_the_spec(world):
    name = create(world, "scaled", max_instances=3, idle_retention_seconds=3600)
    world.wait_status(name, "standby")
    scaled = world.api("POST", f"/endpoints/{name}/scale", json={"instance_count": 2})
    assert scaled.status_code == 200 and scaled.json()["instance_count"] == 2, scaled.text
    wait_until(lambda: len(ready_instances(world, name)) == 2, 60, 0.1, "two instances")
    too_many = world.api("POST", f"/endpoints/{name}/scale", json={"instance_count": 4})
    assert too_many.status_code == 400 and "max_instances (3)" in too_many.json()["errors"]["instance_count"]
    # Down, from the CLI: the extra instance stops now, not after its hour of idle retention.
    cli = subprocess.run([sys.executable, "app.py", "scale", name, "1", "--url", world.web], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "STANDBY_TOKEN": world.token})
    assert cli.returncode == 0 and cli.stdout.strip() == f"endpoint {name}: 1 instance(s)", cli.stderr
    wait_until(lambda: len([i for i in world.endpoint(name)["instances"] if i["status"] in ("ready", "draining")])
               == 1, 30, 0.1, "one instance left")
    # Written to the spec: a reload of the spec (any other change) keeps it.
    patch(world, name, {"description": "still one"})
    time.sleep(2)
    assert world.endpoint(name)["instance_count"] == 1 and len(ready_instances(world, name)) == 1


# ---- pinned sources --------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_a_revision_pins_its_git_commit_and_a_redeploy_takes_the_new_one(world, tmp_path):
    repo = tmp_path / "arith"
    shutil.copytree(EXAMPLES / "arith", repo)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")
    first = git(repo, "rev-parse", "HEAD")
    name = unique("pinned")
    world.create({"name": name, "source_kind": "routes", "git_url": f"file://{repo}", "git_ref": "main",
                  "routes": json.loads((EXAMPLES / "arith" / "routes.json").read_text()), "min_instances": 1,
                  "startup_timeout_seconds": 60})
    # Pinned when it was made, before anything ran.
    pinned = wait_until(lambda: revision(world, name, 1)["source"]["commit"], 60, 0.1, "revision 1 pinned")
    assert pinned == first
    add = lambda: requests.post(f"{world.proxy}/e/{name}/add", json={"a": 2, "b": 3}, timeout=60)  # noqa: E731
    wait_until(lambda: ready_instances(world, name), 60, 0.1, "an instance")
    assert add().json() == {"sum": 5}

    # A new commit on the branch: a restart (and any scale-out) still runs the pinned one.
    (repo / "arith.py").write_text((repo / "arith.py").read_text().replace('{"sum": a + b}', '{"sum": a + b + 1000}'))
    git(repo, "commit", "-qam", "second")
    [before] = ready_instances(world, name)
    assert world.api("POST", f"/endpoints/{name}/restart").status_code == 202
    wait_until(lambda: [i["id"] for i in ready_instances(world, name)] not in ([], [before["id"]])
               and before["id"] not in [i["id"] for i in ready_instances(world, name)], 90, 0.1, "a restarted instance")
    assert add().json() == {"sum": 5}
    logs = world.api("GET", f"/endpoints/{name}/logs", params={"lines": 400}).json()["lines"]
    assert any(first in line["line"] for line in logs)

    # A redeploy makes a revision from the same spec, pinned to the commit the branch names now.
    deployed = world.api("POST", f"/endpoints/{name}/deploy")
    assert deployed.status_code == 202 and deployed.json()["revision"] == 2
    wait_state(world, name, 2, "serving")
    assert revision(world, name, 2)["source"]["commit"] == git(repo, "rev-parse", "HEAD") != first
    assert revision(world, name, 2)["changes"] == []  # the same spec, another commit
    wait_until(lambda: add().json() == {"sum": 1005}, 30, 0.2, "the new commit serving")


# ---- the UI ------------------------------------------------------------------------------------------


def test_the_detail_page_shows_revisions_and_the_traffic_as_a_bar(world):
    name = create(world, "ui-split")
    patch(world, name, {"env": [{"key": "GREETING", "value": "b"}]})  # nothing runs: switched at once
    wait_state(world, name, 2, "serving")
    assert world.api("PUT", f"/endpoints/{name}/traffic", json={"traffic": {"1": 25, "2": 75}}).status_code == 200
    wait_traffic(world, name, {"1": 25, "2": 75})
    page = world.browser().get(f"{world.web}/endpoints/{name}", timeout=30).text
    shares = re.findall(r'class="traffic-share[^"]*" style="width: (\d+)%" data-revision="(\d+)"', page)
    assert sorted(shares) == [("25", "1"), ("75", "2")]
    assert 'aria-label="traffic split: revision 2 75%, revision 1 25%"' in page
    for label in (">Rollback<", ">Redeploy<", ">Scale<"):
        assert label in page
