"""InstanceWorkflow: one instance's life, as a child of its EndpointWorkflow.

a place in its pool (a host with its GPUs, CPU, memory and disk free; workflows/pool.py) ->
provision on that host's own task queue -> readiness probe within the startup timeout -> serve
with liveness checks every health interval -> (release) -> stop -> give the place back -> record
usage. Every change is reported to the parent with an `instance_changed` signal; the parent alone
decides to release an instance, with a `release` signal. A host that goes down takes its
instances with it: the pool says so (`host_lost`) and the instance ends, lost, without trying to
reach the host; its endpoint replaces it elsewhere.

Started with ParentClosePolicy.ABANDON so the parent's continue-as-new never kills a serving
instance; parent and child talk by workflow id.
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from common.models import (
        I_FAILED,
        I_PROVISIONING,
        I_QUEUED,
        I_READY,
        I_STOPPED,
        I_STOPPING,
    )
    from workflows.activity_types import (
        GpuGrant,
        GpuRelease,
        GpuRequest,
        InstanceRecord,
        LifecycleSpec,
        LivenessInput,
        LivenessResult,
        StartInstanceInput,
        StartInstanceResult,
        StopInstanceInput,
    )
    from workflows.contracts import SIGNAL_PROCESS_EXITED
    from workflows.lifecycle import live_spec_fields
    from workflows.gpu_pool import SIGNAL_GRANTED
    from workflows.placement import Placement, PlacementRequest
    from workflows.pool import SIGNAL_HOST_LOST, SIGNAL_PLACED, SIGNAL_UNPLACEABLE, HostLost, pool_workflow_id
    from workflows.pool import SIGNAL_RELEASE as SIGNAL_POOL_RELEASE
    from workflows.pool import SIGNAL_REQUEST as SIGNAL_POOL_REQUEST
    from workflows.pool import ReleaseRequest as PoolRelease

SIGNAL_RELEASE = "release"
# workflow.patched id: placement through the pool's workflow (histories started before pools
# replay the old per-host GPU queue).
PATCH_POOLS = "pools"
# An instance whose pool has no workflow yet (no host joined) asks again this often.
POOL_RETRY_SECONDS = 5.0
CAUSE_HOST_LOST, CAUSE_POOL_UNAVAILABLE = "host_lost", "pool_unavailable"
SIGNAL_SPEC_UPDATED = "spec_updated"  # from the parent: the endpoint's spec changed
SIGNAL_INSTANCE_CHANGED = "instance_changed"  # sent to the parent endpoint workflow

# Database writes run as local activities: no task-queue round trip, so a wake costs tens of
# milliseconds less per step. They are idempotent, so a re-run after a worker crash is harmless.
DB_WRITE = dict(
    start_to_close_timeout=timedelta(seconds=30),
    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10)),
)


@dataclass
class InstanceChange:
    instance_id: str
    status: str
    generation: int = 0
    address: str = ""
    reason: str = ""
    at: float = 0.0
    # Why it ended, when that is not the instance's fault: "host_lost" (its host went down; not a
    # crash of the endpoint's code) or "pool_unavailable" (no host of its pool is up).
    cause: str = ""
    pool: str = ""


@dataclass
class ServingState:
    """What a serving instance carries through continue-as-new."""

    address: str
    gpus: list[int]
    ready_at: float
    host_task_queue: str
    host: str = ""
    pool: str = ""


@dataclass
class InstanceInput:
    endpoint: str
    instance_id: str
    generation: int
    parent_workflow_id: str
    spec: LifecycleSpec
    serving: ServingState | None = None
    # The pool its endpoint chose for it (one of the spec's pools).
    pool: str = ""
    # The revision it runs (README.md "Revisions and updates"); 0 for an endpoint without revisions.
    revision: int = 0


@dataclass
class ReleaseRequest:
    reason: str = ""


@workflow.defn(name="InstanceWorkflow")
class InstanceWorkflow:
    @workflow.init
    def __init__(self, inp: InstanceInput) -> None:
        self.inp = inp
        self.status = I_QUEUED
        self.grant: GpuGrant | None = None
        self.release_reason: str | None = None
        self.gpus: list[int] = list(inp.serving.gpus) if inp.serving else []
        self.address = inp.serving.address if inp.serving else ""
        self._last_notify: asyncio.Future | None = None
        self._exited = False
        self.pool = (inp.serving.pool if inp.serving else "") or inp.pool or (inp.spec.pools or ["default"])[0]
        self.placement: Placement | None = None
        # Where its host-bound activities run (the host's own task queue), once placed.
        self.task_queue = inp.serving.host_task_queue if inp.serving else ""
        self.host = inp.serving.host if inp.serving else ""
        self.lost: str | None = None  # why its host is gone
        self.unplaceable: str | None = None
        self._pooled = bool(inp.serving and inp.serving.pool)  # placed through the pool workflow

    @workflow.signal(name=SIGNAL_PLACED)
    def placed(self, placement: Placement) -> None:
        if placement.instance_id == self.inp.instance_id and self.placement is None:
            self.placement = placement

    @workflow.signal(name=SIGNAL_HOST_LOST)
    def host_lost(self, lost: HostLost) -> None:
        if lost.instance_id == self.inp.instance_id and self.lost is None:
            self.lost = lost.reason

    @workflow.signal(name=SIGNAL_UNPLACEABLE)
    def unplaceable_now(self, lost: HostLost) -> None:
        """No host of the pool is up: the endpoint may place it in its other pool."""
        if lost.instance_id == self.inp.instance_id:
            self.unplaceable = lost.reason

    @workflow.signal(name=SIGNAL_GRANTED)
    def gpus_granted(self, grant: GpuGrant) -> None:
        self.grant = grant

    @workflow.signal(name=SIGNAL_PROCESS_EXITED)
    def process_exited(self) -> None:
        """The worker saw the process exit on its own: check its liveness now, not at the next
        health interval (workers/exit_watch.py)."""
        self._exited = True

    @workflow.signal(name=SIGNAL_SPEC_UPDATED)
    def spec_updated(self, spec: LifecycleSpec) -> None:
        """The endpoint's live spec fields changed (health path and interval, timeouts): the
        serving loop uses them from its next turn."""
        self.inp.spec = dataclasses.replace(self.inp.spec, **{name: getattr(spec, name)
                                                              for name in live_spec_fields()})

    @workflow.signal(name=SIGNAL_RELEASE)
    def release(self, req: ReleaseRequest | None = None) -> None:
        if self.release_reason is None:
            self.release_reason = (req.reason if req else "") or "released"

    @workflow.query(name="status")
    def query_status(self) -> InstanceChange:
        return InstanceChange(self.inp.instance_id, self.status, self.inp.generation, self.address)

    @workflow.run
    async def run(self, inp: InstanceInput) -> str:
        spec = inp.spec
        if inp.serving is not None:
            self.status = I_READY
            return await self._serve(inp.serving)

        if workflow.patched(PATCH_POOLS):
            self._pooled = True
            if not await self._place():
                if self.lost is not None:
                    return await self._finish(I_FAILED, self.lost, cause=CAUSE_HOST_LOST)
                return await self._finish(I_STOPPED, self.release_reason or "released while waiting for a place")
        else:  # started before pools: its host's own GPU queue (workflows/gpu_pool.py)
            self.task_queue = spec.host_task_queue
            if spec.gpu_count > 0:
                # Waiting for GPUs can take long: the row shows it (with its queue position).
                await self._record(I_QUEUED, generation=inp.generation, gpu_type=spec.gpu_type,
                                   event_kind="instance_created", event_message=f"instance {inp.instance_id} created")
                if not await self._acquire_gpus():
                    return await self._finish(I_STOPPED, self.release_reason or "released while queued")

        # Provision and readiness probe run as one activity on the pool's host; it records the
        # instance's rows itself, so nothing else sits between a wake and a ready instance.
        self.status = I_PROVISIONING
        self._notify()
        start_task = workflow.start_activity(
            "start_instance",
            StartInstanceInput(inp.endpoint, inp.instance_id, inp.generation, spec.health_path,
                               spec.startup_timeout_seconds, self.gpus,
                               self.placement.gpu_type if self.placement else spec.gpu_type, inp.revision),
            result_type=StartInstanceResult,
            task_queue=self.task_queue,
            start_to_close_timeout=timedelta(seconds=spec.startup_timeout_seconds + 120),
            # How soon a start cut by a worker crash is retried (on the restarted worker), which
            # adopts the process the first attempt started: the activity beats every ~2 s.
            heartbeat_timeout=timedelta(seconds=6),
            # A retry after a worker crash adopts the process the first attempt started.
            retry_policy=RetryPolicy(maximum_attempts=5, non_retryable_error_types=["SourceError"]),
        )
        # A release (stop/terminate), or its host going down, must not wait for the probe.
        await workflow.wait_condition(lambda: start_task.done() or self.release_reason is not None
                                      or self.lost is not None)
        if not start_task.done():
            start_task.cancel()
            if self.lost is not None:
                return await self._finish(I_FAILED, self.lost, cause=CAUSE_HOST_LOST)
            await self._stop_process()
            return await self._finish(I_STOPPED, self.release_reason)
        try:
            started: StartInstanceResult = start_task.result()
        except ActivityError as err:
            started = StartInstanceResult(ready=False, reason=f"provisioning failed: {_cause(err)}")
        if not started.ready:
            await self._stop_process()
            return await self._finish(I_FAILED, started.reason)

        self.address = started.address
        self.status = I_READY
        await self._notify()
        ready_at = started.ready_at or workflow.now().timestamp()
        return await self._serve(ServingState(started.address, self.gpus, ready_at, self.task_queue, self.host,
                                              self.pool if self._pooled else ""))

    async def _serve(self, serving: ServingState) -> str:
        while True:
            spec = self.inp.spec  # live changes land here (spec_updated)
            await self._wait(lambda: self.release_reason is not None or self._exited or self.lost is not None,
                             spec.health_interval_seconds)
            self._exited = False
            if self.lost is not None:  # nothing to stop: the host is gone
                return await self._finish(I_FAILED, self.lost, ready_at=serving.ready_at, died=True,
                                          cause=CAUSE_HOST_LOST)
            if self.release_reason is not None:
                await self._stop_process()
                return await self._finish(I_STOPPED, self.release_reason, ready_at=serving.ready_at)
            check = workflow.start_activity(
                "check_liveness",
                LivenessInput(self.inp.endpoint, self.inp.instance_id, serving.address, spec.health_path),
                result_type=LivenessResult,
                task_queue=serving.host_task_queue,
                start_to_close_timeout=timedelta(seconds=30),
                # One missed probe must not kill the instance: the activity itself retries
                # the HTTP probe a few times before it reports the instance dead.
                retry_policy=RetryPolicy(maximum_attempts=2),
            )
            # A check sent to a host that went down would wait out its timeouts: the loss wins.
            await workflow.wait_condition(lambda: check.done() or self.lost is not None)
            if not check.done():
                check.cancel()
                return await self._finish(I_FAILED, self.lost, ready_at=serving.ready_at, died=True,
                                          cause=CAUSE_HOST_LOST)
            try:
                live: LivenessResult = check.result()
            except ActivityError as err:
                live = LivenessResult(alive=True, reason=f"liveness check error: {_cause(err)}")
            if not live.alive:
                await self._stop_process()
                return await self._finish(I_FAILED, f"instance died while serving: {live.reason}",
                                          ready_at=serving.ready_at, died=True)
            info = workflow.info()
            if info.is_continue_as_new_suggested() or info.get_current_history_length() > spec.continue_as_new_events:
                await workflow.wait_condition(workflow.all_handlers_finished)
                inp = self.inp
                workflow.continue_as_new(InstanceInput(inp.endpoint, inp.instance_id, inp.generation,
                                                       inp.parent_workflow_id, spec, serving, self.pool,
                                                       inp.revision))

    async def _wait(self, condition, seconds: float) -> bool:
        try:
            await workflow.wait_condition(condition, timeout=timedelta(seconds=seconds))
            return True
        except TimeoutError:
            return False

    async def _acquire_gpus(self) -> bool:
        spec = self.inp.spec
        await workflow.execute_activity(
            "request_gpus",
            GpuRequest(spec.pool, workflow.info().workflow_id, self.inp.endpoint, self.inp.instance_id,
                       spec.gpu_type, spec.gpu_count),
            **DB_WRITE,
        )
        self._notify()
        await workflow.wait_condition(lambda: self.grant is not None or self.release_reason is not None)
        if self.grant is None:
            return False  # released while queued; _finish withdraws the request
        self.gpus = list(self.grant.gpus)
        await self._record(I_PROVISIONING, gpus=self.gpus,
                           event_kind="gpus_granted",
                           event_message=f"GPUs {spec.gpu_type} {self.gpus} granted")
        return True

    async def _place(self) -> bool:
        """A place in its pool: asked of the pool's workflow, waited for (the row shows the queue
        position meanwhile). False when released (or lost) first."""
        spec, inp = self.inp.spec, self.inp
        await self._record(I_QUEUED, generation=inp.generation, gpu_type=spec.gpu_type,
                           revision=inp.revision or None, event_kind="instance_created",
                           event_message=f"instance {inp.instance_id} created"
                                         + (f" (revision {inp.revision})" if inp.revision else "")
                                         + f", asking pool {self.pool} for a place")
        self._notify()
        request = PlacementRequest(workflow.info().workflow_id, inp.endpoint, inp.instance_id, spec.gpu_type,
                                   spec.gpu_count, spec.cpu_cores, spec.memory_gb, spec.disk_gb, spec.needs_netns,
                                   workflow.now().timestamp(), spec.project)
        told = False
        while self.placement is None and self.release_reason is None and self.lost is None:
            if not told:
                try:
                    await workflow.get_external_workflow_handle(pool_workflow_id(self.pool)).signal(
                        SIGNAL_POOL_REQUEST, request)
                    told = True
                except Exception:  # no host ever joined this pool: its workflow does not exist yet
                    await self._record(I_QUEUED, reason=f"waiting for a host: none has joined pool {self.pool} "
                                                        f"(start a worker with --pool {self.pool})")
            await self._wait(lambda: self.placement is not None or self.release_reason is not None
                             or self.lost is not None or self.unplaceable is not None,
                             1e9 if told else POOL_RETRY_SECONDS)
            if self.unplaceable is not None:
                await self._record(I_QUEUED, reason=self.unplaceable)
                self._notify(self.unplaceable, cause=CAUSE_POOL_UNAVAILABLE)
                self.unplaceable = None
        if self.placement is None:
            return False
        placement = self.placement
        self.gpus, self.task_queue, self.host = list(placement.gpus), placement.task_queue, placement.host
        gpus = f", GPUs {placement.gpu_type} {placement.gpus}" if placement.gpus else ""
        await self._record(I_PROVISIONING, host=placement.host, gpus=self.gpus, gpu_type=placement.gpu_type,
                           reason="", event_kind="instance_placed",
                           event_message=f"instance {inp.instance_id} placed on {placement.host} "
                                         f"(pool {self.pool}{gpus})")
        return True

    async def _release_gpus(self) -> None:
        """Give back what it held: its place in the pool (or, started before pools, its GPUs)."""
        if self._pooled:
            try:
                await workflow.get_external_workflow_handle(pool_workflow_id(self.pool)).signal(
                    SIGNAL_POOL_RELEASE, PoolRelease(self.inp.instance_id))
            except Exception as err:  # the pool's workflow is gone: nothing is held there
                workflow.logger.warning("could not give back the place of %s: %s", self.inp.instance_id, err)
        elif self.inp.spec.gpu_count > 0:
            await workflow.execute_activity("release_gpus", GpuRelease(self.inp.spec.pool, self.inp.instance_id),
                                            **DB_WRITE)

    async def _stop_process(self) -> None:
        self.status = I_STOPPING
        await self._record(I_STOPPING)
        stop = workflow.start_activity(
            "stop_instance",
            StopInstanceInput(self.inp.endpoint, self.inp.instance_id, self.inp.spec.stop_grace_seconds),
            task_queue=self.task_queue,
            start_to_close_timeout=timedelta(seconds=self.inp.spec.stop_grace_seconds + 60),
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
        )
        # Retried until its host answers, unless the host is down: its worker, back, stops what
        # nobody wants (workers/reaper.py).
        await workflow.wait_condition(lambda: stop.done() or self.lost is not None)
        if not stop.done():
            stop.cancel()
            return
        stop.result()

    async def _finish(self, status: str, reason: str, ready_at: float | None = None, died: bool = False,
                      cause: str = "") -> str:
        await self._release_gpus()
        self.status = status
        stopped_at = workflow.now().timestamp()
        if status == I_FAILED:
            kind = "instance_died" if died else "instance_failed"
        else:
            kind = "instance_stopped"
        if cause == CAUSE_HOST_LOST:
            kind = "instance_lost"
        await self._record(status, reason=reason, stopped_at=stopped_at, gpu_count=self.inp.spec.gpu_count,
                           event_kind=kind, event_message=f"instance {self.inp.instance_id} {status}: {reason}")
        await self._notify(reason, cause=cause)
        return status

    async def _record(self, status: str, **fields) -> None:
        await workflow.execute_local_activity(
            "record_instance",
            InstanceRecord(endpoint=self.inp.endpoint, instance_id=self.inp.instance_id, status=status, **fields),
            **DB_WRITE,
        )

    def _notify(self, reason: str = "", cause: str = ""):
        """Tell the parent about the current status without waiting for the signal to land, so the
        next step (provision, probe) is scheduled in the same workflow task. Signals are chained:
        each waits for the previous one, so the parent sees them in order. Awaiting the returned
        task waits for this one and all before it."""
        change = InstanceChange(self.inp.instance_id, self.status, self.inp.generation, self.address, reason,
                                workflow.now().timestamp(), cause, self.pool)
        previous = self._last_notify

        async def send() -> None:
            if previous is not None:
                await previous
            try:
                await workflow.get_external_workflow_handle(self.inp.parent_workflow_id).signal(
                    SIGNAL_INSTANCE_CHANGED, change)
            except Exception as err:  # the parent may be gone (terminated by an operator)
                workflow.logger.warning("could not notify %s: %s", self.inp.parent_workflow_id, err)

        self._last_notify = asyncio.ensure_future(send())
        return self._last_notify

def _cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__
