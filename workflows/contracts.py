"""Names and messages callers use to talk to the workflows: the web app, the proxy, the CLI.

Workflow ids, signal/update/query names are a contract with the ops CLI
(`temporal workflow signal --workflow-id endpoint-<name> --name stop`): never rename them.
Every message is one dataclass so that fields can be added without breaking running workflows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from workflows.traffic_types import InstanceTraffic, TrafficReport  # noqa: F401 (re-exported)

ENDPOINT_WORKFLOW = "EndpointWorkflow"
INSTANCE_WORKFLOW = "InstanceWorkflow"
GPU_POOL_WORKFLOW = "GpuPoolWorkflow"
ROLLOUT_WORKFLOW = "RolloutWorkflow"

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
# Revisions and updates (README.md "Revisions and updates"): roll a revision out, split traffic,
# roll back to the last good revision, promote a paused canary or end a blue-green window.
UPDATE_DEPLOY = "deploy"
UPDATE_SET_TRAFFIC = "set_traffic"
UPDATE_ROLLBACK = "rollback"
UPDATE_PROMOTE = "promote"
QUERY_STATUS = "status"
# Signal of InstanceWorkflow, sent by the worker whose instance process exited on its own.
SIGNAL_PROCESS_EXITED = "process_exited"

# ApplicationError types raised by updates: callers map them to their own errors.
ERR_REPLICA_QUOTA = "ReplicaQuotaExceeded"  # proxy code 1007
ERR_NOT_SERVING = "EndpointNotServing"  # stopped / failed / terminated: must not wake
ERR_START_FAILED = "InstanceStartFailed"  # the instance failed its readiness probe
ERR_ROLLOUT_ACTIVE = "RolloutInProgress"  # another update runs: wait, promote or roll it back
ERR_NO_ROLLOUT = "NoRollout"  # promote with no update waiting for it
ERR_NOTHING_TO_ROLL_BACK = "NothingToRollBack"  # no earlier good revision
ERR_BAD_SPLIT = "BadTrafficSplit"  # names an unknown revision, or does not sum to 100


def endpoint_workflow_id(name: str) -> str:
    return f"endpoint-{name}"


def instance_workflow_id(endpoint_name: str, instance_id: str) -> str:
    return f"endpoint-{endpoint_name}-instance-{instance_id}"


def gpu_pool_workflow_id(pool: str) -> str:
    return f"gpu-pool-{pool}"


def rollout_workflow_id(endpoint_name: str, rollout: int) -> str:
    return f"endpoint-{endpoint_name}-rollout-{rollout}"


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
    # The revision the proxy routed the request to (0: the one with the largest share).
    revision: int = 0


@dataclass
class WakeResult:
    instance_id: str
    address: str
    cold_start: bool
    # When the instance became ready (unix seconds, workflow time), so a caller can tell whether
    # its request waited for that start.
    ready_at: float | None = None
    revision: int = 0


@dataclass
class ScaleOutRequest:
    request_id: str = ""
    revision: int = 0


@dataclass
class ScaleOutResult:
    instance_id: str
    address: str
    ready_at: float | None = None
    revision: int = 0


@dataclass
class DeployRequest:
    """Roll `revision` out (a revision the web app made). Options left None take the worker's
    settings (STANDBY_ROLLOUT_*, README.md "Revisions and updates")."""

    revision: int
    strategy: str = "rolling"
    # canary: the percentages of its steps (the last is 100); pause between them, or `manual`:
    # wait for a promote.
    steps: list[int] = field(default_factory=list)
    pause_seconds: float | None = None
    manual: bool = False
    # How long a new instance serves before the next step, and the error rate that rolls back.
    settle_seconds: float | None = None
    error_rate: float | None = None
    # blue-green: how long the old set is kept after the switch, for a quick rollback.
    window_seconds: float | None = None
    request_id: str = ""


@dataclass
class DeployResult:
    rollout: int
    revision: int
    strategy: str


@dataclass
class TrafficSplitRequest:
    traffic: dict[int, int] = field(default_factory=dict)
    request_id: str = ""


@dataclass
class TrafficSplitResult:
    traffic: dict[int, int] = field(default_factory=dict)


@dataclass
class RollbackRequest:
    reason: str = ""
    request_id: str = ""


@dataclass
class RollbackResult:
    revision: int
    message: str = ""
    rollout: int = 0


@dataclass
class PromoteRequest:
    request_id: str = ""


@dataclass
class PromoteResult:
    rollout: int
    message: str = ""


# At the bottom: lifecycle imports TrafficReport from here; the annotation above is resolved
# lazily (by the data converter), after both modules are loaded.
from workflows.lifecycle import EndpointState  # noqa: E402
