"""Inputs and results of the worker's activities, as seen by the workflows.

Pure dataclasses with no I/O, so workflow code can import them inside the sandbox. Activity
names are the method names of `workers.activities.StandbyActivities`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from common.spec_fields import LIFECYCLE, python_type, read_by


@dataclass
class RevisionInfo:
    """What the lifecycle needs of one revision (common/revisions.py): its traffic share and state
    as last recorded, whether its source is pinned, and the resources and place its instances need."""

    number: int
    traffic: int = 0
    state: str = "pending"
    pinned: bool = False
    gpu_type: str = ""
    gpu_count: int = 0
    cpu_cores: float = 1.0
    memory_gb: float = 1.0
    pools: list[str] = field(default_factory=list)
    needs_netns: bool = False


def _lifecycle_spec_fields() -> list:
    spec_fields = [(f.name, python_type(f), field(default_factory=lambda d=f.default: list(d))
                    if isinstance(f.default, list) else field(default=f.default))
                   for f in read_by(LIFECYCLE) if f.name != "name"]
    platform = [
        # The GPU pool (one per host) and that host's activity task queue.
        ("pool", str, field(default="")),
        ("host_task_queue", str, field(default="")),
        ("purge_after_seconds", int, field(default=14 * 24 * 3600)),
        ("stop_grace_seconds", float, field(default=10.0)),
        # How long a draining instance waits after the proxy was told, so that requests routed
        # from a stale proxy view still reach a live instance (one view refresh, plus the time a
        # proxy takes to report a request that began after a quiet spell). Draining begins this
        # long before the idle retention ends (lifecycle.idle_to_drain).
        ("drain_grace_seconds", float, field(default=1.5)),
        ("continue_as_new_events", int, field(default=2000)),
        ("exists", bool, field(default=True)),
        # A fixed-port command on the process backend: only hosts with network namespaces take it.
        ("needs_netns", bool, field(default=False)),
        # Its project (common/account_models.py): its pool applies the project's GPU quota.
        ("project", str, field(default="")),
        # The endpoint's revisions, newest first; empty for an endpoint made before revisions.
        ("revisions", list[RevisionInfo], field(default_factory=list)),
        # Updates (README.md "Revisions and updates"): how long a new instance serves before the
        # next step, the error rate above which an update rolls back, how long blue-green keeps the
        # old set, and a canary's pause between steps.
        ("rollout_settle_seconds", float, field(default=10.0)),
        ("rollout_error_rate", float, field(default=0.05)),
        ("blue_green_window_seconds", float, field(default=300.0)),
        ("canary_pause_seconds", float, field(default=60.0)),
    ]
    return [("name", str)] + spec_fields + platform


# The part of an endpoint's spec the lifecycle needs: the fields whose declarations name the
# lifecycle as a reader (common/spec_fields.py), and the platform's settings beside them. Secrets
# never enter workflow history: the provision activity reads environment values from the database.
LifecycleSpec = make_dataclass("LifecycleSpec", _lifecycle_spec_fields())
LifecycleSpec.__module__ = __name__


@dataclass
class LoadSpecInput:
    name: str


@dataclass
class EndpointStatusUpdate:
    name: str
    status: str
    reason: str = ""
    stopped_at: float | None = None
    purge_at: float | None = None
    # Optional event recorded in the same transaction.
    event_kind: str = ""
    event_message: str = ""


@dataclass
class EventRecord:
    endpoint: str
    kind: str
    message: str = ""
    instance_id: str | None = None


@dataclass
class InstanceRecord:
    """Upsert of an instance row. Fields left None are not changed."""

    endpoint: str
    instance_id: str
    status: str
    generation: int | None = None
    revision: int | None = None
    reason: str | None = None
    host: str | None = None
    address: str | None = None
    port: int | None = None
    pid: int | None = None
    container_id: str | None = None
    gpu_type: str | None = None
    gpus: list[int] | None = None
    workdir: str | None = None
    log_path: str | None = None
    # Marks timestamps (workflow time, unix seconds): started_at / ready_at / stopped_at.
    started_at: float | None = None
    ready_at: float | None = None
    stopped_at: float | None = None
    gpu_count: int = 0
    event_kind: str = ""
    event_message: str = ""


@dataclass
class StartInstanceInput:
    """Provision and probe in one activity: one dispatch instead of two on the wake path."""

    endpoint: str
    instance_id: str
    generation: int
    health_path: str
    startup_timeout_seconds: int
    gpus: list[int] = field(default_factory=list)
    gpu_type: str = ""
    # The revision it runs (0: the endpoint's serving revision, or its spec without revisions).
    revision: int = 0


@dataclass
class StartInstanceResult:
    ready: bool
    reason: str = ""
    seconds: float = 0.0  # launch to first HTTP 200
    host: str = ""
    address: str = ""
    pid: int | None = None
    ready_at: float | None = None


@dataclass
class LivenessInput:
    endpoint: str
    instance_id: str
    address: str
    health_path: str


@dataclass
class LivenessResult:
    alive: bool
    reason: str = ""


@dataclass
class StopInstanceInput:
    endpoint: str
    instance_id: str
    grace_seconds: float = 10.0


@dataclass
class GpuRequest:
    pool: str
    requester_workflow_id: str
    endpoint: str
    instance_id: str
    gpu_type: str
    count: int


@dataclass
class GpuGrant:
    instance_id: str
    gpus: list[int]


@dataclass
class GpuRelease:
    pool: str
    instance_id: str


@dataclass
class GpuInventoryInput:
    pool: str


@dataclass
class GpuInventory:
    # {"A100": [0, 1], "T4": [2, 3]}
    gpus: dict[str, list[int]] = field(default_factory=dict)
    error: str = ""


@dataclass
class QueuePosition:
    endpoint: str
    instance_id: str
    position: int | None  # None once granted / withdrawn
    # Why it waits (its project's GPU quota), written on the instance's row; "" clears it, None
    # leaves the row's reason as it is.
    reason: str | None = None


@dataclass
class ProjectGpuQuotasInput:
    pool: str
    projects: list[str] = field(default_factory=list)


@dataclass
class QueuePositionsInput:
    positions: list[QueuePosition] = field(default_factory=list)


@dataclass
class PurgeInput:
    endpoint: str
    reason: str = ""


@dataclass
class HostStateRecord:
    """A host's state as its pool decided it (up, draining, down), for the hosts page."""

    host: str
    state: str
    reason: str = ""


@dataclass
class HostsSeenInput:
    names: list[str] = field(default_factory=list)


@dataclass
class WarmWindowsInput:
    text: str
    now: float
    max_instances: int


@dataclass
class WarmWindowsResult:
    """workflows/warm_windows.py `evaluate`: instances kept now, the open windows, the next change."""

    instances: int = 0
    open_windows: list[str] = field(default_factory=list)
    next_change: float | None = None


@dataclass
class PrepareRevisionInput:
    """Pin a revision's source, once: resolve its git ref to a commit, copy its source directory."""

    endpoint: str
    revision: int


@dataclass
class PrepareRevisionResult:
    ok: bool
    reason: str = ""
    commit: str = ""
    snapshot: str = ""


@dataclass
class RevisionState:
    number: int
    state: str
    reason: str = ""
    strategy: str | None = None


@dataclass
class RevisionsRecord:
    """The traffic split (every revision not named has no share) and revision states, written
    together with an optional event."""

    endpoint: str
    traffic: dict[int, int] | None = None
    states: list[RevisionState] = field(default_factory=list)
    event_kind: str = ""
    event_message: str = ""
