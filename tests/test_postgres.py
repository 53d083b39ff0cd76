"""DATABASE_URL selects PostgreSQL: the same lifecycle on a real PostgreSQL server.

Starts a throwaway cluster (tests/pg_cluster.py); skips when PostgreSQL is not installed.
"""
from __future__ import annotations

import pytest
import requests

from tests.pg_cluster import MISSING, pg_bin, postgres_cluster
from workflows.contracts import WakeRequest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def postgres_url():
    if pg_bin() is None:
        pytest.skip(MISSING)
    with postgres_cluster() as url:
        yield url


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
