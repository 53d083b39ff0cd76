"""Spec files in the user's world (tests/user_world.py): `app.py up` running, and `python app.py apply`
/ `get` run as a user runs them, against the web app named by STANDBY_WEB_PORT (README.md "Spec
files")."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from common.models import INSTANCE_LIVE_STATES
from common.spec_fields import SPEC_FIELDS
from tests.conftest import ROOT, free_port, wait_until
from tests.user_world import UpProcess, unique

pytestmark = pytest.mark.timeout(300)
SPECS = ROOT / "examples" / "specs"


def standby(user: UpProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python app.py <args>` in the user's shell (STANDBY_WEB_PORT names their web app)."""
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], env=user.env, cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=180)


def applied(user: UpProcess, path: Path, *flags: str) -> str:
    done = standby(user, "apply", "-f", str(path), *flags)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def refused(user: UpProcess, path: Path, *flags: str) -> str:
    done = standby(user, "apply", "-f", str(path), *flags)
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stdout + done.stderr


def example(tmp_path: Path, file: str, name: str, **values: str) -> Path:
    """The example as a user copies it: under another name (each test's endpoints are new), and
    with the values they are told to fill in."""
    text = (SPECS / file).read_text()
    original = file.removesuffix(".yaml")
    assert f"\nname: {original}\n" in text
    text = text.replace(f"\nname: {original}\n", f"\nname: {name}\n")
    for field, value in values.items():
        line = next(line for line in text.splitlines() if line.startswith(f"{field}: "))
        text = text.replace(line + "\n", f"{field}: {value}\n")
    path = tmp_path / file
    path.write_text(text)
    return path


def round_trip(user: UpProcess, tmp_path: Path, name: str) -> None:
    """`get -o yaml|json` then `apply -f` of what it wrote changes nothing."""
    for output in ("yaml", "json"):
        got = standby(user, "get", "endpoint", name, "-o", output)
        assert got.returncode == 0, got.stderr
        assert set(yaml.safe_load(got.stdout)) <= set(SPEC_FIELDS)  # no status, no instances
        path = tmp_path / f"{name}-got.{output}"
        path.write_text(got.stdout)
        assert applied(user, path).splitlines() == [f"endpoint {name}: unchanged"]


def test_the_tutorial_example_creates_its_endpoint_then_changes_nothing(user, tmp_path):
    name = unique("spec-tutorial")
    path = example(tmp_path, "tutorial.yaml", name)
    out = applied(user, path).splitlines()
    assert out[0] == f"endpoint {name}: created"
    assert out[1:] == [f"  name           immutable  \"{name}\"",
                       "  start_command  restart    \"python -m http.server 8080\"",
                       "  max_instances  live       2"]
    user.wait_status(name, "standby")
    served = user.call(name, "/")
    assert served.status_code == 200 and "Directory listing" in served.text

    assert applied(user, path).splitlines() == [f"endpoint {name}: unchanged"]
    round_trip(user, tmp_path, name)
    user.api("POST", f"/endpoints/{name}/stop")


def _embeddings_archive() -> bytes:
    # As examples/embeddings/README.md makes it: `tar -czf ... -C examples/embeddings embed.py`.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(ROOT / "examples" / "embeddings" / "embed.py", arcname="embed.py")
    return buffer.getvalue()


def test_the_embeddings_example_creates_its_routes_endpoint_from_a_registered_version(user, tmp_path):
    name = unique("spec-embeddings")
    assert user.api("POST", "/models", json={"name": name}).status_code == 201
    version = user.api("POST", f"/models/{name}/versions",
                       files={"archive": ("embeddings.tar.gz", _embeddings_archive(), "application/gzip")})
    assert version.status_code == 201, version.text
    path = example(tmp_path, "embeddings.yaml", name, model_version_id=str(version.json()["id"]))
    out = applied(user, path)
    assert out.startswith(f"endpoint {name}: created\n") and "  routes " in out
    body = user.wait_status(name, "standby")
    assert body["source_kind"] == "routes" and [r["path"] for r in body["routes"]] == ["/embed", "/similarity",
                                                                                      "/info"]
    # Checked by the proxy against the routes before anything wakes.
    assert user.call(name, "/embed", method="POST", json={"texts": []}).status_code == 400
    assert applied(user, path).splitlines() == [f"endpoint {name}: unchanged"]
    round_trip(user, tmp_path, name)


def test_changes_are_applied_by_their_edit_class(user, tmp_path):
    name = unique("spec-edits")
    spec = {"name": name, "start_command": "python -m http.server 8080", "port": 8080, "max_instances": 2}
    path = tmp_path / "edits.json"

    def write(**changes):
        path.write_text(json.dumps({**spec, **changes}))

    write()
    applied(user, path)
    user.wait_status(name, "standby")

    write(max_instances=3)  # live
    assert applied(user, path).splitlines() == [f"endpoint {name}: updated", "  max_instances  live       2 -> 3"]
    assert user.endpoint(name)["max_instances"] == 3

    write(max_instances=1)
    assert applied(user, path, "--dry-run").splitlines() == [
        f"endpoint {name}: would be updated (dry run: nothing changed)", "  max_instances  live       3 -> 1"]
    assert user.endpoint(name)["max_instances"] == 3

    write(max_instances=3, disk_gb=20)  # immutable
    out = refused(user, path)
    assert f"endpoint {name}: refused" in out
    assert "error: disk_gb cannot be changed after creation; create a new endpoint for another disk size" in out
    assert user.endpoint(name)["disk_gb"] == 10

    first = user.call(name, "/").headers["Deploy-Route-Target"]  # an instance runs
    write(max_instances=3, env=[{"key": "GREETING", "value": "hello"}])  # restart-class
    out = refused(user, path)
    assert out.splitlines()[:3] == [
        f"endpoint {name}: refused", "  env  restart    [] -> GREETING=hello",
        "  not saved: env needs a restart of the running instances; apply with --restart to save and restart them"]
    assert user.endpoint(name)["env"] == []
    assert "would be refused" in refused(user, path, "--dry-run")

    out = applied(user, path, "--restart").splitlines()
    assert out == [f"endpoint {name}: updated; its running instances restart",
                   "  env  restart    [] -> GREETING=hello"]
    assert user.endpoint(name)["env"] == [{"key": "GREETING", "value": "hello", "secret": False}]
    wait_until(lambda: all(i["status"] not in INSTANCE_LIVE_STATES for i in user.endpoint(name)["instances"]
                           if i["id"] == first), 60, message="the instance restarted away")
    user.api("POST", f"/endpoints/{name}/stop")


def test_a_secret_is_written_without_its_value_and_kept_on_apply(user, tmp_path):
    name = unique("spec-secret")
    path = tmp_path / "secret.yaml"
    path.write_text(f"name: {name}\nstart_command: python -m http.server $PORT\nenv:\n"
                    "  - {key: TOKEN, value: s3cret-value, secret: true}\n")
    out = applied(user, path)
    assert "  env            restart    TOKEN=(secret)\n" in out and "s3cret" not in out
    got = standby(user, "get", "endpoint", name).stdout
    assert "- key: TOKEN\n  secret: true\n" in got and "s3cret" not in got
    round_trip(user, tmp_path, name)


def test_several_specs_in_one_file_are_applied_in_order_and_a_refusal_exits_1(user, tmp_path):
    good, bad = unique("spec-multi-good"), unique("spec-multi-bad")
    path = tmp_path / "multi.yaml"
    path.write_text(f"name: {good}\nstart_command: python -m http.server $PORT\n---\n"
                    f"name: {bad}\nstart_command: python -m http.server $PORT\nport: 70000\n")
    out = refused(user, path)
    assert out.startswith(f"endpoint {good}: created\n")
    assert f"endpoint {bad}: refused\n  error: port must be between 1 and 65535" in out
    assert "1 of 2 specs refused or failed" in out
    assert user.api("GET", f"/endpoints/{bad}").status_code == 404


@pytest.mark.parametrize("file, text, message", [
    ("syntax.yaml", "name: x\nstart_command: [python\n",
     "syntax.yaml: line 3, column 1: while parsing a flow sequence, expected ',' or ']'"),
    ("unknown.yaml", "name: spec-unknown\nstart_command: python -m http.server $PORT\nreplicas: 2\n",
     "error: unknown fields: replicas; allowed: name, description"),
    ("nan.yaml", "name: spec-nan\nstart_command: python -m http.server $PORT\ncpu_cores: .nan\n",
     "nan.yaml: cpu_cores is NaN or Infinity; write a finite number"),
    ("nan.json", '{"name": "spec-nan", "start_command": "python -m http.server $PORT", "cpu_cores": NaN}',
     "nan.json: NaN is not a JSON number"),
])
def test_a_bad_file_says_what_is_wrong_and_exits_1(user, tmp_path, file, text, message):
    (tmp_path / file).write_text(text)
    assert message in refused(user, tmp_path / file)
    assert user.api("GET", "/endpoints/spec-unknown").status_code == 404
    assert user.api("GET", "/endpoints/spec-nan").status_code == 404


def test_standard_input_and_an_unreachable_web_app(user):
    name = unique("spec-stdin")
    done = standby(user, "apply", "-f", "-", "--dry-run",
                   stdin=json.dumps({"name": name, "start_command": "python -m http.server $PORT"}))
    assert done.returncode == 0 and done.stdout.startswith(f"endpoint {name}: would be created (dry run")
    assert user.api("GET", f"/endpoints/{name}").status_code == 404

    url = f"http://127.0.0.1:{free_port()}"
    done = standby(user, "apply", "-f", str(SPECS / "tutorial.yaml"), "--url", url)
    assert done.returncode == 1
    assert done.stderr == (f"standby: cannot reach the Standby web app at {url}: start it with `./run up` (or "
                           "`python app.py up`), or give its address with --url\n")
    missing = standby(user, "get", "endpoint", "no-such-endpoint")
    assert missing.returncode == 1 and missing.stderr == "standby: no endpoint named 'no-such-endpoint'\n"
