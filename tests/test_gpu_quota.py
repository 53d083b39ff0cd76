"""A project's GPU quota (README.md "Accounts and projects"): its instances hold at most
`max_gpus` GPUs at once; past it they wait in their pool's queue, which says why, without
holding up other projects. Pure placement first (workflows/placement.py), then end to end with a
real worker and pool workflow."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import wait_until
from tests.test_placement import grant, host, pool, req
from workflows import placement as pl
from workflows.placement import ProjectGpuQuota


def test_a_request_past_its_projects_quota_waits_and_others_go_by():
    state = pool(host("a", {"T4": [0, 1, 2, 3]}), queue=[
        req("ml-1", "T4", 1, project="ml"), req("ml-2", "T4", 1, project="ml"),
        req("cv-1", "T4", 1, project="cv"), req("ml-3", "T4", 1, project="ml")])
    quotas = {"ml": ProjectGpuQuota(limit=1)}
    assert [p.instance_id for p in pl.grantable(state, quotas)] == ["ml-1", "cv-1"]
    # Nothing held yet: no request waits for the quota (the first of ml fits it).
    assert pl.gpu_quota_waits(state, quotas) == {}
    for placement in pl.grantable(state, quotas):
        state.grants[placement.instance_id] = placement
    state.queue = [r for r in state.queue if r.instance_id not in state.grants]
    waits = pl.gpu_quota_waits(state, quotas)
    assert set(waits) == {"ml-2", "ml-3"} and "holds 1 of its 1 GPUs" in waits["ml-2"]
    assert pl.grantable(state, quotas) == []  # two GPUs free, but ml is at its quota
    del state.grants["ml-1"]  # released: the next of ml, in order
    assert [p.instance_id for p in pl.grantable(state, quotas)] == ["ml-2"]


def test_gpus_held_in_other_pools_count_and_cpu_requests_are_never_held_back():
    state = pool(host("a", {"T4": [0, 1]}), queue=[req("ml-gpu", "T4", 1, project="ml"),
                                                    req("ml-cpu", project="ml")])
    quotas = {"ml": ProjectGpuQuota(limit=2, held_elsewhere=2)}
    assert [p.instance_id for p in pl.grantable(state, quotas)] == ["ml-cpu"]
    assert set(pl.gpu_quota_waits(state, quotas)) == {"ml-gpu"}
    state.grants["x"] = grant("x", "a", "T4", [1])  # another project's grant does not count
    quotas["ml"].held_elsewhere = 1
    assert [p.instance_id for p in pl.grantable(state, quotas)] == ["ml-gpu", "ml-cpu"]


def test_without_a_quota_nothing_changes():
    state = pool(host("a", {"T4": [0]}), queue=[req("a", "T4", 1, project="ml"), req("b", "T4", 1, project="cv")])
    assert [p.instance_id for p in pl.grantable(state)] == ["a"]
    assert pl.gpu_quota_waits(state, {}) == {}


@pytest.mark.timeout(180)
def test_instances_past_the_gpu_quota_queue_saying_why(stack_factory):
    """Two GPUs, project ml may hold one: ml's second instance waits (its row and the pool's queue
    say why) while another project takes the free GPU; when ml's first instance goes, the second
    starts."""
    from common import accounts
    from workflows.pool import pool_workflow_id

    stack = stack_factory(extra_env={"STANDBY_GPUS": "T4:2"})
    with stack.db.session() as session:
        ml = accounts.ensure_project(session, "ml")
        ml.max_gpus = 1
        accounts.ensure_project(session, "cv")
    ids = {}
    with stack.db.session() as session:
        ids = {name: accounts.get_project(session, name).id for name in ("ml", "cv")}
    gpu = {"gpu_type": "T4", "gpu_count": 1, "min_instances": 1}
    stack.create_endpoint("quota-ml-one", project_id=ids["ml"], **gpu)
    stack.wait_status("quota-ml-one", "running")
    stack.create_endpoint("quota-ml-two", project_id=ids["ml"], **gpu)

    def waiting():
        rows = stack.instances("quota-ml-two")
        return rows and "GPU quota" in (rows[0].reason or "") and rows[0]
    row = wait_until(waiting, 30, message="ml's second instance to wait for the quota")
    assert row.status == "queued" and "project ml holds 1 of its 1 GPUs" in row.reason, row.reason
    view = stack.runner.run(stack.client.get_workflow_handle(pool_workflow_id(stack.settings.pool)).query("queue"))
    entries = view["queue"] if isinstance(view, dict) else view.queue
    reasons = [e["reason"] if isinstance(e, dict) else e.reason for e in entries]
    assert any("GPU quota" in r for r in reasons), entries
    # Another project is not held back by ml's quota: it gets the free GPU.
    stack.create_endpoint("quota-cv", project_id=ids["cv"], **gpu)
    stack.wait_status("quota-cv", "running")
    assert stack.endpoint("quota-ml-two").status == "queued"
    stack.signal("quota-ml-one", "stop")
    stack.signal("quota-cv", "stop")
    stack.wait_status("quota-ml-two", "running", 60)
    assert "GPU quota" not in (stack.instances("quota-ml-two")[0].reason or "")
    if os.environ.get("STANDBY_RECORD_HISTORIES"):  # the pool's path through a quota wait (tests/test_replay.py)
        from tests.test_replay import HISTORIES

        wid = pool_workflow_id(stack.settings.pool)
        history = stack.runner.run(stack.client.get_workflow_handle(wid).fetch_history())
        (HISTORIES / "pool-quota.json").write_text(
            json.dumps({"workflow_id": wid, "history": json.loads(history.to_json())}, indent=1))
    stack.signal("quota-ml-two", "stop")
