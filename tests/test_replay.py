"""Replay checked-in histories of every long-lived workflow against today's code.

A change that would break running workflows (non-determinism) fails here. When a change is
intended, gate it with `workflow.patched()`; re-record only for brand-new behaviour with
`STANDBY_RECORD_HISTORIES=1 pytest tests/test_replay.py -k record`.
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

HISTORIES = Path(__file__).parent / "histories"
# Histories recorded by earlier releases stay, each replayed by today's code: endpoint, instance
# and gpu_pool before pools existed; *-pools and pool since (placement through PoolWorkflow);
# pool-quota, a pool holding back a project past its GPU quota (recorded by
# tests/test_gpu_quota.py with STANDBY_RECORD_HISTORIES=1).
KINDS = ("endpoint", "instance", "gpu_pool", "endpoint-pools", "instance-pools", "pool", "pool-quota")
WORKFLOWS = [EndpointWorkflow, InstanceWorkflow, GpuPoolWorkflow, PoolWorkflow]


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
