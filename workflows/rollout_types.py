"""Messages between an endpoint's workflow and its RolloutWorkflow (workflows/rollout.py).

The endpoint's workflow owns the instances and the traffic split; the rollout decides the steps of
one update. The rollout sends `rollout_step` (the split it wants now, how many new instances of
each revision to keep, which old instances to release, whether the old set is kept from idle
release) and the endpoint answers with `observed` (its new and old instances, failures, request
and error counts) whenever that changes. Pure dataclasses: both sides import them in the sandbox.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Signals of RolloutWorkflow.
SIGNAL_OBSERVED = "observed"
SIGNAL_COMMAND = "command"
# Signal of EndpointWorkflow, from its rollout.
SIGNAL_ROLLOUT_STEP = "rollout_step"
QUERY_ROLLOUT = "status"

COMMAND_PROMOTE, COMMAND_ROLLBACK, COMMAND_ABORT = "promote", "rollback", "abort"
SUCCEEDED, ROLLED_BACK, ABORTED = "succeeded", "rolled_back", "aborted"


@dataclass
class RolloutOptions:
    """One update's settings, every one resolved (the request's, else the worker's settings)."""

    strategy: str = "rolling"
    steps: list[int] = field(default_factory=list)
    pause_seconds: float = 60.0
    manual: bool = False
    settle_seconds: float = 10.0
    error_rate: float = 0.05
    window_seconds: float = 300.0


@dataclass
class RolloutInput:
    endpoint: str
    parent_workflow_id: str
    rollout: int
    # The revision rolled out; 0 for a rolling restart (each instance replaced by one of its own
    # revision, the split unchanged).
    target: int
    # The split before the update: what a rollback returns to.
    base_split: dict[int, int] = field(default_factory=dict)
    options: RolloutOptions = field(default_factory=RolloutOptions)
    # How long a new instance may take to become ready (its endpoint's startup timeout).
    startup_timeout_seconds: float = 1200.0
    # Whether the target's source still needs pinning (a revision made by this update).
    pin: bool = True


@dataclass
class InstanceRef:
    id: str
    revision: int = 0


@dataclass
class RolloutObservation:
    rollout: int
    seq: int = 0
    # New: instances started for this update (its generation, of the target revision).
    new_ready: list[InstanceRef] = field(default_factory=list)
    new_pending: int = 0
    new_failures: list[str] = field(default_factory=list)
    # Old: every other live instance; those ready and not on their way out, oldest first.
    old_ready: list[InstanceRef] = field(default_factory=list)
    old_live: int = 0
    # Requests and errors (status 500 and above, refused connections) the proxies counted on the
    # new instances since they started.
    new_requests: int = 0
    new_errors: int = 0
    # False once the endpoint was stopped, failed or terminated: the update ends.
    serving: bool = True


@dataclass
class RolloutStep:
    rollout: int
    seq: int
    split: dict[int, int] = field(default_factory=dict)
    # New instances to keep, per revision (started when fewer; never released while it runs).
    new_counts: dict[int, int] = field(default_factory=dict)
    # Old instances to drain and release now (after the split above is in place).
    release: list[str] = field(default_factory=list)
    # Keep the old set from idle release (blue-green's rollback window).
    hold_old: bool = False
    phase: str = ""
    done: bool = False
    outcome: str = ""
    reason: str = ""


@dataclass
class RolloutCommand:
    kind: str
    reason: str = ""


@dataclass
class RolloutState:
    """An update in progress, as the endpoint's workflow carries it (through continue-as-new)."""

    rollout: int
    workflow_id: str
    target: int
    generation: int
    base_split: dict[int, int] = field(default_factory=dict)
    options: RolloutOptions = field(default_factory=RolloutOptions)
    # "deploy" (a revision), "restart" (the same revisions, fresh instances), "rollback" (to an
    # earlier good revision).
    kind: str = "deploy"
    started: bool = False
    pin: bool = True
    # The last step applied, and the last observation sent (compared to send only changes).
    step: RolloutStep | None = None
    applied_seq: int = 0
    obs_seq: int = 0
    last_observation: RolloutObservation | None = None
    last_sent_at: float = 0.0
    # The revision a rollback abandons.
    abandons: int = 0
    abort_sent: bool = False
