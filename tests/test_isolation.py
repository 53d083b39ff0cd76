"""Instances cannot reach the platform's secrets (README.md "Instance isolation", workers/isolation.py).

End to end: a real worker starts two instances; one of them (tests/isolation_probe.py) tries to
read the database, the keys, the CLI token, the logs, the backend's state, the other instance's
files and environment, to list and write the data dir, and to signal the other instance; every
attempt must be refused, while its own directory and HOME are its to write. Unit tests beside it
for the pure parts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from common.config import load_settings
from common.secrets import box_for
from tests.conftest import ROOT
from workers import isolation

pytestmark = pytest.mark.timeout(180)


def test_uids_come_from_the_range_and_are_never_shared():
    uids = isolation.parse_uids("200000-200003")
    assert uids == range(200000, 200004)
    chosen = isolation.Isolation(uids)
    taken: set[int] = set()
    for n in range(4):
        uid = chosen.uid_for(f"inst{n}", taken)
        assert uid in uids and uid not in taken
        taken.add(uid)
    with pytest.raises(RuntimeError, match="widen the range"):
        chosen.uid_for("one-more", taken)
    assert isolation.Isolation(None, "off").uid_for("x", set()) is None
    assert isolation.parse_uids("off") is None
    for bad in ("5-9", "300-200", "abc", "1000"):
        with pytest.raises(ValueError, match="STANDBY_INSTANCE_UIDS"):
            isolation.parse_uids(bad)


def test_a_closed_directory_on_the_way_is_named(open_dir):
    closed = open_dir / "closed"
    (closed / "inside").mkdir(parents=True)
    os.chmod(closed, 0o700)
    assert isolation.first_closed(closed / "inside") == closed
    os.chmod(closed, 0o711)
    assert isolation.first_closed(closed / "inside") is None


def test_the_data_dir_is_the_workers_alone_but_the_way_to_instances(tmp_path):
    settings = load_settings({"STANDBY_DATA_DIR": str(tmp_path / "data")})
    (settings.data_dir / "logs").mkdir(parents=True)
    (settings.data_dir / "standby.db").write_text("x")
    os.chmod(settings.data_dir / "standby.db", 0o644)
    isolation.harden_data_dir(settings)
    mode = lambda path: oct(os.stat(path).st_mode & 0o777)  # noqa: E731
    assert mode(settings.data_dir) == "0o711" and mode(settings.instances_dir) == "0o711"
    assert mode(settings.data_dir / "standby.db") == "0o600" and mode(settings.data_dir / "logs") == "0o700"


@pytest.fixture
def open_dir():
    """A data dir whose parents others may enter, as `./data` of a checkout is (pytest's own tmp
    dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="standby-isolation-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


SYSTEM_PYTHON = "/usr/bin/python3"


def worker_python() -> list[str] | None:
    """A Python others may run, with this venv's packages: the worker's own interpreter must be
    one (workers/isolation.py `decide`), and the test venv's may live in a closed home directory
    (pyenv under /root here). None when there is none."""
    site = next((p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)), None)
    if not os.access(SYSTEM_PYTHON, os.X_OK) or site is None:
        return None
    check = subprocess.run([SYSTEM_PYTHON, "-c", "import temporalio.worker, sqlalchemy, re2, cryptography"],
                           env={**os.environ, "PYTHONPATH": site}, capture_output=True)
    return [SYSTEM_PYTHON, site] if check.returncode == 0 else None


def test_an_instance_cannot_read_the_platforms_secrets_or_another_instance(stack_factory, open_dir):
    if os.geteuid() != 0:
        pytest.skip("instances run as uids of their own only under a root worker")
    python = worker_python()
    closed = isolation.first_closed(ROOT)
    if python is None or closed is not None:
        pytest.skip(f"no worker here can start instances as other users: "
                    f"{f'{closed} is closed to others' if closed else f'no {SYSTEM_PYTHON} with the packages'}")
    stack = stack_factory(extra_env={"STANDBY_DATA_DIR": str(open_dir / "data"), "PYTHONPATH": python[1]},
                          start_worker=False)
    log = open(stack.worker_log, "ab")
    stack.worker = subprocess.Popen([python[0], str(ROOT / "app.py"), "worker"], cwd=ROOT, env=stack.env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    data = stack.settings.data_dir
    # What a running installation keeps there: the keys, the web session key, the CLI token.
    box = box_for(stack.settings)
    for name in ("secret_key", "cli-token"):
        (data / name).write_text("not for instances\n")
    source = open_dir / "source"
    source.mkdir()
    (source / "private.txt").write_text("the other instance's file")
    stack.create_endpoint("iso-victim", start_command=f"{SYSTEM_PYTHON} -m http.server $PORT --bind 127.0.0.1",
                          source_dir=str(source), min_instances=1,
                          env=[{"key": "VICTIM_TOKEN", "value": box.seal("victim-secret"), "secret": True}])
    stack.wait_status("iso-victim", "running")
    victim = stack.instances("iso-victim")[0]
    victim_pid = victim.pid
    state = json.loads((stack.settings.instances_dir / f"{victim.id}.json").read_text())
    server_pid = state["pid"]  # the instance's leader: its environment holds the secret
    targets = {
        "read": [str(data / name) for name in ("standby.db", "secret_key", "secrets.key", "cli-token")]
        + [victim.log_path, str(stack.settings.instances_dir / f"{victim.id}.json"),
           str(Path(victim.workdir) / "private.txt"), f"/proc/{server_pid}/environ"],
        "list": [str(data), str(stack.settings.instances_dir), str(data / "logs"), str(Path(victim.workdir))],
        "write": [str(data), str(stack.settings.instances_dir)],
        "signal": [server_pid],
    }
    for path in targets["read"]:
        assert Path(path).exists(), path  # each target is there: a refusal below is a refusal
    stack.create_endpoint("iso-probe", start_command=f"{SYSTEM_PYTHON} {ROOT / 'tests' / 'isolation_probe.py'} $PORT",
                          min_instances=1, env=[{"key": "PROBE_TARGETS", "value": json.dumps(targets)}])
    stack.wait_status("iso-probe", "running")
    probe = stack.instances("iso-probe")[0]
    seen = requests.get(f"http://{probe.address}/", timeout=10).json()

    assert seen["uid"] in isolation.parse_uids(stack.settings.instance_uids) and seen["uid"] != 0
    assert seen["gid"] == seen["uid"] and seen["groups"] in ([], [seen["gid"]])
    assert seen["uid"] != state["uid"], "two instances share a uid"
    assert set(seen["read"].values()) == {"denied"}, seen["read"]
    assert set(seen["list"].values()) == {"denied"}, seen["list"]
    assert set(seen["write"].values()) == {"denied"}, seen["write"]
    assert set(seen["signal"].values()) == {"denied"}, seen["signal"]
    assert seen["own_workdir"] == "written" and seen["home"] == "written"
    # The victim's secret reached its own environment, and only there.
    environ = Path(f"/proc/{server_pid}/environ").read_bytes().split(b"\0")
    assert b"VICTIM_TOKEN=victim-secret" in environ and victim_pid == server_pid
    assert f"as uid {seen['uid']}" in Path(probe.log_path).read_text()
    assert "instances run as uids" in stack.worker_log.read_text()
