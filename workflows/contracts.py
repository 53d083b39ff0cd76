"""Names and messages callers use to talk to the workflows: the web app, the proxy, the CLI.

Workflow ids, signal/update/query names are a contract with the ops CLI
(`temporal workflow signal --workflow-id endpoint-<name> --name stop`): never rename them.
Every message is one dataclass so that fields can be added without breaking running workflows.
"""
from __future__ import annotations

from dataclasses import dataclass

from workflows.traffic_types import InstanceTraffic, TrafficReport  # noqa: F401 (re-exported)

ENDPOINT_WORKFLOW = "EndpointWorkflow"
INSTANCE_WORKFLOW = "InstanceWorkflow"
GPU_POOL_WORKFLOW = "GpuPoolWorkflow"

# Signals of EndpointWorkflow (fire and forget). stop/restart/terminate/wake take no argument
# or an empty JSON object, so the CLI can send them bare.
SIGNAL_STOP = "stop"
SIGNAL_RESTART = "restart"
SIGNAL_TERMINATE = "terminate"
SIGNAL_WAKE = "wake"
SIGNAL_TRAFFIC = "traffic"
SIGNAL_SCALE = "scale"
SIGNAL_SPEC_CHANGED = "spec_changed"
# From a worker: CPU, memory and GPU samples of the endpoint's instances (UsageReport).
SIGNAL_USAGE = "usage"
# Updates of EndpointWorkflow (the caller waits for the answer).
UPDATE_WAKE = "wake_until_ready"
UPDATE_SCALE_OUT = "scale_out"
QUERY_STATUS = "status"
# Signal of InstanceWorkflow, sent by the worker whose instance process exited on its own.
SIGNAL_PROCESS_EXITED = "process_exited"

# ApplicationError types raised by updates: callers map them to their own errors.
ERR_REPLICA_QUOTA = "ReplicaQuotaExceeded"  # proxy code 1007
ERR_NOT_SERVING = "EndpointNotServing"  # stopped / failed / terminated: must not wake
ERR_START_FAILED = "InstanceStartFailed"  # the instance failed its readiness probe


def endpoint_workflow_id(name: str) -> str:
    return f"endpoint-{name}"


def instance_workflow_id(endpoint_name: str, instance_id: str) -> str:
    return f"endpoint-{endpoint_name}-instance-{instance_id}"


def gpu_pool_workflow_id(pool: str) -> str:
    return f"gpu-pool-{pool}"


@dataclass
class EndpointInput:
    name: str
    # Carried through continue-as-new; None on first start.
    state: "EndpointState | None" = None


@dataclass
class ActionRequest:
    """Argument of stop / restart / terminate / wake signals; all fields optional."""

    reason: str = ""
    request_id: str = ""


@dataclass
class ScaleRequest:
    min_instances: int | None = None
    max_instances: int | None = None


@dataclass
class WakeRequest:
    request_id: str = ""


@dataclass
class WakeResult:
    instance_id: str
    address: str
    cold_start: bool
    # When the instance became ready (unix seconds, workflow time), so a caller can tell whether
    # its request waited for that start.
    ready_at: float | None = None


@dataclass
class ScaleOutRequest:
    request_id: str = ""


@dataclass
class ScaleOutResult:
    instance_id: str
    address: str
    ready_at: float | None = None


# At the bottom: lifecycle imports TrafficReport from here; the annotation above is resolved
# lazily (by the data converter), after both modules are loaded.
from workflows.lifecycle import EndpointState  # noqa: E402
