"""DATABASE_URL selects PostgreSQL: the same lifecycle on a real PostgreSQL server.

Starts a throwaway cluster with the Debian package's initdb/pg_ctl (`.ci/run` installs it);
skips when PostgreSQL is not installed.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from workflows.contracts import WakeRequest

pytestmark = pytest.mark.timeout(180)


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


@pytest.fixture
def postgres_url(tmp_path):
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # initdb refuses to run as root: run the cluster as the package's postgres user.
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    # Not under tmp_path: pytest's base directory is private to root.
    data = Path(tempfile.mkdtemp(prefix="standby-pg-"))
    os.chmod(data, 0o755)
    shutil.chown(data, user)
    port = free_port()

    def as_user(*cmd):
        prefix = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
        done = subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd[0]} failed: {done.stderr or done.stdout}"

    as_user(f"{bindir}/initdb", "-D", str(data / "db"), "-A", "trust", "-U", "standby")
    as_user(f"{bindir}/pg_ctl", "-D", str(data / "db"), "-w", "-l", str(data / "log"), "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    try:
        as_user(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "standby", "standby")
        yield f"postgresql+psycopg://standby@127.0.0.1:{port}/standby"
    finally:
        as_user(f"{bindir}/pg_ctl", "-D", str(data / "db"), "-m", "fast", "stop")
        shutil.rmtree(data, ignore_errors=True)


def test_lifecycle_on_postgresql(stack_factory, postgres_url):
    stack = stack_factory(extra_env={"DATABASE_URL": postgres_url})
    assert stack.db.engine.url.get_backend_name() == "postgresql"
    stack.create_endpoint("pg-one", idle_retention_seconds=3600)
    stack.wait_status("pg-one", "standby")
    woke = stack.update("pg-one", "wake_until_ready", WakeRequest(), timeout=60)
    [inst] = stack.instances("pg-one")
    assert inst.id == woke["instance_id"] and inst.status == "ready"
    assert requests.get(f"http://{inst.address}/", timeout=5).status_code == 200
    stack.signal("pg-one", "stop")
    e = stack.wait_status("pg-one", "stopped", 30)
    assert e.purge_at is not None
