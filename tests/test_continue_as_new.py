"""Continue-as-new of EndpointWorkflow and InstanceWorkflow keeps the endpoint's state.

A tiny history limit (60 events) makes both workflows continue-as-new within seconds; the
endpoint must keep serving the same instance, its traffic figures, and release it when idle.
"""
from __future__ import annotations

import time

import pytest

from tests.conftest import wait_until
from workflows.contracts import ScaleRequest, TrafficReport, InstanceTraffic, instance_workflow_id

pytestmark = pytest.mark.timeout(120)

NAME = "renewed"


def run_id(stack, workflow_id: str) -> str:
    return stack.runner.run(stack.client.get_workflow_handle(workflow_id).describe()).run_id


def started_by_continue_as_new(stack, workflow_id: str) -> bool:
    """The current run's first history event says which run it continues."""
    async def first_event():
        async for event in stack.client.get_workflow_handle(workflow_id).fetch_history_events():
            return event
    event = stack.runner.run(first_event())
    return bool(event.workflow_execution_started_event_attributes.continued_execution_run_id)


def test_endpoint_and_instance_survive_continue_as_new(stack_factory):
    stack = stack_factory(extra_env={"STANDBY_CONTINUE_AS_NEW_EVENTS": "60"})
    stack.create_endpoint(NAME, min_instances=1, max_instances=2, idle_retention_seconds=2)
    stack.wait_status(NAME, "running", 40)
    [inst] = stack.instances(NAME)
    endpoint_wf, instance_wf = f"endpoint-{NAME}", instance_workflow_id(NAME, inst.id)
    endpoint_run, instance_run = run_id(stack, endpoint_wf), run_id(stack, instance_wf)

    # A proxy reports a request in flight, again and again: each report is a history event.
    seq = 0

    def report(in_flight: int, seq_no: int | None = None, reporter: str = "proxy-1") -> None:
        stack.signal(NAME, "traffic", TrafficReport(
            reporter=reporter, seq=seq if seq_no is None else seq_no, sent_at=time.time(),
            instances=[InstanceTraffic(inst.id, in_flight=in_flight, last_request_at=time.time())]))

    def in_flight() -> int:
        return stack.query(NAME)["instances"][0]["in_flight"]

    def endpoint_renewed() -> bool:
        nonlocal seq
        seq += 1
        report(1)
        return run_id(stack, endpoint_wf) != endpoint_run

    wait_until(endpoint_renewed, 40, interval=0.05, message="EndpointWorkflow to continue-as-new")
    # The instance continues-as-new on its own, from its health checks every second.
    wait_until(lambda: run_id(stack, instance_wf) != instance_run, 40,
               message="InstanceWorkflow to continue-as-new")
    assert started_by_continue_as_new(stack, endpoint_wf)
    assert started_by_continue_as_new(stack, instance_wf)

    # Same instance, still serving; the traffic figures came through continue-as-new too.
    status = stack.query(NAME)
    assert status["status"] == "running" and status["min_instances"] == 1
    [view] = [v for v in status["instances"] if v["status"] == "ready"]
    assert view["id"] == inst.id and view["in_flight"] == 1
    assert stack.endpoint(NAME).status == "running"
    assert [(i.id, i.status) for i in stack.instances(NAME)] == [(inst.id, "ready")]
    # A late report with an old sequence number is still recognised as old, and dropped. Signals
    # are handled in order, so once proxy-2's report shows, the late one has been handled.
    report(0, seq_no=1)
    report(5, seq_no=1, reporter="proxy-2")
    wait_until(lambda: in_flight() in (5, 6), 10, message="proxy-2's report")
    assert in_flight() == 6

    # Scaled to zero with a request in flight: kept past the idle retention.
    stack.signal(NAME, "scale", ScaleRequest(min_instances=0))
    time.sleep(3)
    assert [(i.id, i.status) for i in stack.instances(NAME)] == [(inst.id, "ready")]

    # The request ends: idle release works on the renewed runs.
    seq += 1
    report(0)
    report(0, seq_no=2, reporter="proxy-2")
    stack.wait_status(NAME, "standby", 30)
    [ended] = stack.instances(NAME)
    assert ended.id == inst.id and ended.status == "stopped"
    kinds = [ev.kind for ev in stack.events(NAME)]
    assert "instance_draining" in kinds and "instance_stopped" in kinds
