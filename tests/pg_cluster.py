"""A throwaway PostgreSQL cluster on loopback, for the tests that need DATABASE_URL=postgresql.

Uses the Debian package's initdb/pg_ctl (`.ci/run` installs it); `pg_bin()` is None without them
and the tests skip, saying so.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, text

from tests.conftest import free_port

MISSING = "PostgreSQL is not installed (apt-get install postgresql)"


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster, yield the URL of its `standby` database, stop and remove it."""
    bindir = pg_bin()
    assert bindir is not None, MISSING
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


def fresh_database(cluster_url: str) -> str:
    """A new, empty database in the cluster: one per test, so tests sharing a cluster never mix."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(cluster_url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE refuses transactions
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return cluster_url.rsplit("/", 1)[0] + f"/{name}"
