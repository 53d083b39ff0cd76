"""Replay checked-in histories of every long-lived workflow against today's code.

A change that would break running workflows (non-determinism) fails here. When a change is
intended, gate it with `workflow.patched()`; re-record only for brand-new behaviour with
`STANDBY_RECORD_HISTORIES=1 pytest tests/test_replay.py -k <its recorder>` (test_record_histories:
endpoint-pools, instance-pools, pool; test_record_revision_histories: endpoint-revisions, rollout-*),
never the histories of an earlier release.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.conftest import wait_until
from workflows.contracts import ScaleOutRequest, TrafficReport, InstanceTraffic, WakeRequest
from workflows.endpoint import EndpointWorkflow
from workflows.gpu_pool import GpuPoolWorkflow
from workflows.instance import InstanceWorkflow
from workflows.pool import PoolWorkflow
from workflows.rollout import RolloutWorkflow

HISTORIES = Path(__file__).parent / "histories"
# Histories recorded by earlier releases stay, each replayed by today's code: endpoint, instance
# and gpu_pool before pools existed; *-pools and pool since (placement through PoolWorkflow);
# pool-quota, a pool holding back a project past its GPU quota (recorded by
# tests/test_gpu_quota.py with STANDBY_RECORD_HISTORIES=1);
# endpoint-autoscale: an endpoint scaling on concurrency and CPU (workflows/autoscale.py);
# endpoint-warm: a warm window opening, then closed by a spec change (workflows/warm_windows.py);
# endpoint-revisions and rollout-* since revisions (updates through RolloutWorkflow).
KINDS = ("endpoint", "instance", "gpu_pool", "endpoint-pools", "instance-pools", "pool", "pool-quota",
         "endpoint-autoscale", "endpoint-warm", "endpoint-revisions", "rollout-rolling", "rollout-canary",
         "rollout-blue-green")
WORKFLOWS = [EndpointWorkflow, InstanceWorkflow, GpuPoolWorkflow, PoolWorkflow, RolloutWorkflow]


@pytest.mark.parametrize("kind", KINDS)
def test_replay_checked_in_history(kind):
    path = HISTORIES / f"{kind}.json"
    assert path.exists(), f"{path} missing: record it (see module docstring)"
    data = json.loads(path.read_text())
    history = WorkflowHistory.from_json(data["workflow_id"], data["history"])
    replayer = Replayer(workflows=WORKFLOWS)
    result = asyncio.run(replayer.replay_workflow(history, raise_on_replay_failure=False))
    assert result.replay_failure is None, f"{kind} history no longer replays: {result.replay_failure}"


@pytest.mark.skipif(not os.environ.get("STANDBY_RECORD_HISTORIES"), reason="records histories on demand")
def test_record_histories(stack):
    """A full life: wake, traffic, idle release, scale-out, stop, restart, terminate."""
    from workflows.pool import SIGNAL_DRAIN, SIGNAL_UNDRAIN, HostRef, pool_workflow_id

    stack.create_endpoint("replay", gpu_type="T4", gpu_count=1, max_instances=1, idle_retention_seconds=2)
    stack.wait_status("replay", "standby")
    pool = stack.client.get_workflow_handle(pool_workflow_id(stack.settings.pool))
    woke = stack.update("replay", "wake_until_ready", WakeRequest(request_id="w1"), timeout=60)
    iid = woke["instance_id"]
    stack.signal("replay", "traffic", TrafficReport(reporter="test:1", seq=1, sent_at=time.time(),
                                                    instances=[InstanceTraffic(iid, 1, time.time(), 1)]))
    stack.signal("replay", "traffic", TrafficReport(reporter="test:1", seq=2, sent_at=time.time(),
                                                    instances=[InstanceTraffic(iid, 0, time.time(), 1)]))
    stack.wait_status("replay", "standby", 30)
    stack.runner.run(pool.signal(SIGNAL_DRAIN, HostRef(stack.settings.host, "recording")))
    stack.runner.run(pool.signal(SIGNAL_UNDRAIN, HostRef(stack.settings.host, "recording")))
    stack.update("replay", "scale_out", ScaleOutRequest(request_id="s1"), timeout=60)
    stack.signal("replay", "spec_changed")
    stack.signal("replay", "stop")
    stack.wait_status("replay", "stopped", 30)
    stack.signal("replay", "restart")
    stack.wait_status("replay", "standby", 30)
    stack.signal("replay", "terminate")
    stack.wait_status("replay", "terminated", 30)
    wait_until(lambda: stack.runner.run(stack.handle("replay").describe()).status.name == "COMPLETED", 30)

    HISTORIES.mkdir(exist_ok=True)
    ids = {
        "endpoint-pools": "endpoint-replay",
        "instance-pools": f"endpoint-replay-instance-{iid}",
        "pool": pool_workflow_id(stack.settings.pool),
    }
    for kind, wid in ids.items():
        history = stack.runner.run(stack.client.get_workflow_handle(wid).fetch_history())
        (HISTORIES / f"{kind}.json").write_text(
            json.dumps({"workflow_id": wid, "history": json.loads(history.to_json())}, indent=1))


@pytest.mark.skipif(not os.environ.get("STANDBY_RECORD_HISTORIES"), reason="records histories on demand")
def test_record_autoscale_history(stack):
    """Autoscaling: a wake, load reports that panic it to three instances, CPU samples, the load
    gone (the autoscaler drains two, the idle retention the last), terminate."""
    from workflows.autoscale import InstanceUsage, UsageReport

    name = "replay-autoscale"
    stack.create_endpoint(name, max_instances=3, autoscaling=True, target_concurrency=2, target_cpu_percent=80,
                          autoscale_window_seconds=6, scale_down_delay_seconds=1, idle_retention_seconds=2)
    stack.wait_status(name, "standby")
    iid = stack.update(name, "wake_until_ready", WakeRequest(request_id="w1"), timeout=60)["instance_id"]
    for seq in range(1, 6):
        now = time.time()
        stack.signal(name, "traffic", TrafficReport(reporter="test:1", seq=seq, sent_at=now, load_seconds=6.0 * seq,
                                                    instances=[InstanceTraffic(iid, 6, now, seq)]))
        time.sleep(1.0)
    wait_until(lambda: sum(1 for i in stack.instances(name) if i.status == "ready") == 3, 60)
    stack.signal(name, "usage", UsageReport("recorder", time.time(), [InstanceUsage(iid, 30.0, 10.0, None, time.time())]))
    now = time.time()
    stack.signal(name, "traffic", TrafficReport(reporter="test:1", seq=10, sent_at=now, load_seconds=40.0,
                                                instances=[InstanceTraffic(iid, 0, now, 10)]))
    stack.wait_status(name, "standby", 60)
    stack.signal(name, "terminate")
    stack.wait_status(name, "terminated", 30)
    wait_until(lambda: stack.runner.run(stack.handle(name).describe()).status.name == "COMPLETED", 30)
    history = stack.runner.run(stack.handle(name).fetch_history())
    (HISTORIES / "endpoint-autoscale.json").write_text(
        json.dumps({"workflow_id": f"endpoint-{name}", "history": json.loads(history.to_json())}, indent=1))


@pytest.mark.skipif(not os.environ.get("STANDBY_RECORD_HISTORIES"), reason="records histories on demand")
def test_record_warm_window_history(stack):
    """A warm window open now keeps an instance; the spec loses it (the window closes), the idle
    retention releases the instance; terminate."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import select

    from common.models import Endpoint

    name = "replay-warm"
    now = datetime.now(timezone.utc)
    window = f"daily {(now - timedelta(hours=1)):%H:%M}-{(now + timedelta(hours=1)):%H:%M}: 1"
    stack.create_endpoint(name, warm_windows=window, idle_retention_seconds=2)
    stack.wait_status(name, "running", 60)
    with stack.db.session() as s:
        s.scalar(select(Endpoint).where(Endpoint.name == name)).warm_windows = ""
    stack.signal(name, "spec_changed")
    stack.wait_status(name, "standby", 60)
    stack.signal(name, "terminate")
    stack.wait_status(name, "terminated", 30)
    wait_until(lambda: stack.runner.run(stack.handle(name).describe()).status.name == "COMPLETED", 30)
    history = stack.runner.run(stack.handle(name).fetch_history())
    (HISTORIES / "endpoint-warm.json").write_text(
        json.dumps({"workflow_id": f"endpoint-{name}", "history": json.loads(history.to_json())}, indent=1))


@pytest.mark.skipif(not os.environ.get("STANDBY_RECORD_HISTORIES"), reason="records histories on demand")
def test_record_revision_histories(stack):
    """Revisions and updates (README.md "Revisions and updates"): a rolling update, a split by
    hand and its rollback, a manual canary promoted, a blue-green update rolled back in its window,
    a rolling restart, a rollback to the revision before, terminate."""
    from workflows.contracts import (DeployRequest, PromoteRequest, RollbackRequest, TrafficSplitRequest,
                                     rollout_workflow_id)

    name = "replay-rev"
    stack.create_endpoint(name, min_instances=1, max_instances=3, idle_retention_seconds=60)
    stack.wait_status(name, "running", 60)

    def revision_state(number: int) -> str:
        from common.models import Revision

        with stack.db.session() as s:
            e = stack.endpoint(name)
            return s.query(Revision).filter_by(endpoint_id=e.id, number=number).one().state

    def deploy(request: DeployRequest, until: str) -> int:
        result = stack.update(name, "deploy", request, timeout=60)
        wait_until(lambda: revision_state(request.revision) == until, 90,
                   message=f"revision {request.revision} {until}")
        return result["rollout"]

    rolling = deploy(DeployRequest(stack.new_revision(name, env=[{"key": "V", "value": "2"}])), "serving")
    stack.update(name, "set_traffic", TrafficSplitRequest({1: 50, 2: 50}), timeout=60)
    time.sleep(2)
    stack.update(name, "rollback", RollbackRequest("recording"), timeout=60)
    number = stack.new_revision(name, env=[{"key": "V", "value": "3"}])
    result = stack.update(name, "deploy", DeployRequest(number, "canary", steps=[20], manual=True), timeout=60)
    wait_until(lambda: stack.query(name)["traffic"] == {"2": 80, "3": 20}, 60, message="the canary at 20%")
    stack.update(name, "promote", PromoteRequest(), timeout=60)
    wait_until(lambda: revision_state(number) == "serving", 90, message="the canary promoted")
    canary = result["rollout"]
    number = stack.new_revision(name, env=[{"key": "V", "value": "4"}])
    result = stack.update(name, "deploy", DeployRequest(number, "blue-green", window_seconds=60), timeout=60)
    wait_until(lambda: stack.query(name)["traffic"] == {"4": 100}, 60, message="switched to blue")
    stack.update(name, "rollback", RollbackRequest("recording"), timeout=60)
    wait_until(lambda: revision_state(number) == "failed", 60, message="blue-green rolled back")
    blue_green = result["rollout"]
    stack.signal(name, "restart")
    wait_until(lambda: stack.query(name)["rollout"] is None and len([
        i for i in stack.instances(name) if i.status == "ready" and i.generation > 0]) >= 1, 90,
               message="the rolling restart")
    stack.update(name, "rollback", RollbackRequest("recording"), timeout=60)
    wait_until(lambda: stack.query(name)["traffic"] == {"2": 100} and stack.query(name)["rollout"] is None, 90,
               message="rolled back to revision 2")
    stack.signal(name, "terminate")
    stack.wait_status(name, "terminated", 60)
    wait_until(lambda: stack.runner.run(stack.handle(name).describe()).status.name == "COMPLETED", 30)

    ids = {"endpoint-revisions": f"endpoint-{name}", "rollout-rolling": rollout_workflow_id(name, rolling),
           "rollout-canary": rollout_workflow_id(name, canary),
           "rollout-blue-green": rollout_workflow_id(name, blue_green)}
    for kind, wid in ids.items():
        history = stack.runner.run(stack.client.get_workflow_handle(wid).fetch_history())
        (HISTORIES / f"{kind}.json").write_text(
            json.dumps({"workflow_id": wid, "history": json.loads(history.to_json())}, indent=1))
