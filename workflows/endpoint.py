"""EndpointWorkflow (id `endpoint-<name>`): an endpoint's whole life, from creation to purge.

It is the only thing that decides to start, drain or release an instance. It owns the idle
timer and the purge timer. Instances are child workflows (InstanceWorkflow) that report back
with `instance_changed`. Decisions live in workflows/lifecycle.py as pure functions; this file
turns signals into state changes and decisions into activities and child workflows.
"""
from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from common.models import I_DRAINING, I_FAILED, I_READY, I_STOPPED
    from workflows import autoscale as asc
    from workflows import lifecycle as lc
    from workflows.activity_types import (
        EndpointStatusUpdate,
        EventRecord,
        InstanceRecord,
        LifecycleSpec,
        LoadSpecInput,
        PurgeInput,
        WarmWindowsInput,
        WarmWindowsResult,
    )
    from workflows.contracts import (
        ERR_NOT_SERVING,
        ERR_REPLICA_QUOTA,
        ERR_START_FAILED,
        QUERY_STATUS,
        SIGNAL_RESTART,
        SIGNAL_SCALE,
        SIGNAL_SPEC_CHANGED,
        SIGNAL_STOP,
        SIGNAL_TERMINATE,
        SIGNAL_TRAFFIC,
        SIGNAL_USAGE,
        SIGNAL_WAKE,
        UPDATE_SCALE_OUT,
        UPDATE_WAKE,
        ActionRequest,
        EndpointInput,
        ScaleOutRequest,
        ScaleOutResult,
        ScaleRequest,
        TrafficReport,
        WakeRequest,
        WakeResult,
        instance_workflow_id,
    )
    from workflows.instance import (
        CAUSE_HOST_LOST,
        CAUSE_POOL_UNAVAILABLE,
        SIGNAL_INSTANCE_CHANGED,
        SIGNAL_RELEASE,
        SIGNAL_SPEC_UPDATED,
        InstanceChange,
        InstanceInput,
        ReleaseRequest,
    )

# Database writes run as local activities: no task-queue round trip, so a wake costs tens of
# milliseconds less per step. They are idempotent, so a re-run after a worker crash is harmless.
DB_WRITE = dict(
    start_to_close_timeout=timedelta(seconds=30),
    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10)),
)
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MAX_TIMER_SECONDS = 366 * 24 * 3600.0
# workflow.patched ids: changes of behaviour that running histories must replay without.
PATCH_SPEC_TO_INSTANCES = "spec-to-instances"
PATCH_AUTOSCALE = "autoscale"
PATCH_WARM_WINDOWS = "warm-windows"


@workflow.defn(name="EndpointWorkflow")
class EndpointWorkflow:
    @workflow.init
    def __init__(self, inp: EndpointInput) -> None:
        self.name = inp.name
        # Rebuilt from the carried state after continue-as-new; else loaded in run().
        self.state: lc.EndpointState | None = inp.state  # type: ignore[assignment]
        self._dirty = True
        # Signals that arrive before the spec is loaded on first start are replayed after.
        self._early: list = []
        # Events noted by signal handlers (which cannot run activities), flushed by the loop.
        self._events: list[tuple[str, str]] = []
        # Instances a signal handler decided to release (it cannot signal them itself).
        self._release_soon: list[tuple[str, str]] = []

    # ---------------------------------------------------------------- run loop
    @workflow.run
    async def run(self, inp: EndpointInput) -> str:
        if self.state is None:
            spec: LifecycleSpec = await workflow.execute_local_activity(
                "load_lifecycle_spec", LoadSpecInput(self.name), result_type=LifecycleSpec, **DB_WRITE)
            if not spec.exists:
                workflow.logger.warning("endpoint %s has no spec row; nothing to manage", self.name)
                return "missing"
            self.state = lc.EndpointState(spec=spec)
            await self._event("created", f"endpoint {self.name} created")
            problems = lc.spec_problems(spec)
            if problems:
                self.state.desired = lc.WANT_FAILED
                self.state.failure_reason = "spec refused: " + "; ".join(problems)
            for handler, arg in self._early:
                handler(arg)
            self._early.clear()
        while True:
            await self._reconcile()
            state = self.state
            if state.desired == lc.WANT_TERMINATED and not lc.live(state):
                await workflow.wait_condition(workflow.all_handlers_finished)
                await workflow.execute_activity(
                    "purge_endpoint", PurgeInput(self.name, state.failure_reason or "terminated"), **DB_WRITE)
                return "terminated"
            deadline = self._next_deadline()
            # Bounded, whatever a spec says: a timer past MAX_TIMER_SECONDS is just looked at again.
            timeout = None if deadline is None else min(MAX_TIMER_SECONDS, max(0.05, deadline - self._now()))
            try:
                await workflow.wait_condition(lambda: self._dirty,
                                              timeout=None if timeout is None else timedelta(seconds=timeout))
            except TimeoutError:
                pass
            self._dirty = False
            self._maybe_continue_as_new()

    def _maybe_continue_as_new(self) -> None:
        info = workflow.info()
        if not (info.is_continue_as_new_suggested()
                or info.get_current_history_length() > self.state.spec.continue_as_new_events):
            return
        # Only between decisions: no handler waiting, no child about to start.
        if not workflow.all_handlers_finished() or any(i.status == lc.I_NEW for i in self.state.instances.values()):
            return
        workflow.continue_as_new(EndpointInput(name=self.name, state=self.state))

    async def _reconcile(self) -> None:
        state = self.state
        now = self._now()
        if state.spec_reload_pending:
            state.spec_reload_pending = False
            spec = await workflow.execute_local_activity(
                "load_lifecycle_spec", LoadSpecInput(self.name), result_type=LifecycleSpec, **DB_WRITE)
            problems = lc.spec_problems(spec) if spec.exists else []
            if problems:
                await self._event("spec_refused", "spec change refused, the previous one stays: " + "; ".join(problems))
            elif spec.exists:
                state.spec = spec
                if workflow.patched(PATCH_SPEC_TO_INSTANCES):
                    await self._tell_instances(spec)

        if state.desired != lc.SERVING:
            for view in lc.live(state):
                await self._release(view, "endpoint " + state.desired)
            if state.desired == lc.WANT_STOPPED and not lc.live(state) and state.stopped_at is None:
                state.stopped_at = now
                state.purge_at = now + state.spec.purge_after_seconds
            if state.desired == lc.WANT_STOPPED and state.purge_at is not None and now >= state.purge_at:
                state.desired = lc.WANT_TERMINATED
                state.failure_reason = "purged after being stopped"
                await self._event("purge", f"stopped for {state.spec.purge_after_seconds}s: purging")
        else:
            if state.restart_pending:
                old = [v for v in lc.live(state) if v.generation < state.generation]
                for view in old:
                    await self._release(view, "restart")
                if not old:
                    state.restart_pending = False
                    for _ in range(min(state.restart_target, state.spec.max_instances)):
                        self._plan_instance()
            if (state.spec.warm_windows or state.warm) and workflow.patched(PATCH_WARM_WINDOWS):
                await self._warm_windows(now)
            autoscaling = state.spec.autoscaling and workflow.patched(PATCH_AUTOSCALE)
            if autoscaling:
                await self._autoscale(now)
            for _ in range(lc.wanted_new_instances(state)):
                if not await self._undrain_one():
                    self._plan_instance()
            drain, _ = lc.idle_to_drain(state, now)
            for iid in drain:
                await self._begin_drain(state.instances[iid])
            if autoscaling:
                for iid in lc.autoscale_surplus(state, now):
                    await self._begin_drain(state.instances[iid], "the autoscaler needs fewer instances")
            release, _ = lc.drained(state, now)
            for iid in release:
                await self._release(state.instances[iid], "idle")

        while self._release_soon:
            iid, why = self._release_soon.pop(0)
            if iid in state.instances:
                await self._release(state.instances[iid], why)
        await self._start_planned()
        while self._events:
            kind, message = self._events.pop(0)
            await self._event(kind, message)
        await self._publish()
        lc.prune(state, now)

    async def _warm_windows(self, now: float) -> None:
        """Warm windows (workflows/warm_windows.py): the instances they keep now, an event when one
        opens or closes, and a timer on the next change (in _next_deadline). Worked out by a local
        activity, only when the text changed or the next change has come."""
        state = self.state
        text = state.spec.warm_windows or ""
        if text == state.warm_text and (state.warm_next is None or now < state.warm_next):
            return
        result: WarmWindowsResult = await workflow.execute_local_activity(
            "warm_windows_now", WarmWindowsInput(text, now, state.spec.max_instances), result_type=WarmWindowsResult,
            **DB_WRITE)
        for line in result.open_windows:
            if line not in state.warm_open:
                await self._event("warm_window", f"warm window open: {line} (keeping {result.instances} warm)")
        for line in state.warm_open:
            if line not in result.open_windows:
                await self._event("warm_window", f"warm window closed: {line} (idle instances beyond "
                                                 f"{max(result.instances, state.spec.min_instances)} go after "
                                                 f"the idle retention)")
        state.warm, state.warm_open, state.warm_next = result.instances, result.open_windows, result.next_change
        state.warm_text = text

    async def _autoscale(self, now: float) -> None:
        """Ask the autoscaler (workflows/autoscale.py) how many instances to have; a changed answer
        is an `autoscale` event naming its inputs. The loop then starts or drains instances."""
        decision = asc.decide(self.state.autoscale, lc.autoscale_inputs(self.state, now))
        if decision.changed:
            await self._event("autoscale", decision.message)

    async def _tell_instances(self, spec: LifecycleSpec) -> None:
        """Live changes (health checks, timeouts) reach the running instances' workflows now,
        not only the next instance (docs/architecture.md "One spec")."""
        for view in lc.live(self.state):
            if view.status == lc.I_NEW or view.release_sent:
                continue
            try:
                await workflow.get_external_workflow_handle(instance_workflow_id(self.name, view.id)).signal(
                    SIGNAL_SPEC_UPDATED, spec)
            except Exception as err:  # it ended meanwhile: its last report is on its way
                workflow.logger.warning("could not tell %s of the new spec: %s", view.id, err)

    def _next_deadline(self) -> float | None:
        state, now = self.state, self._now()
        times = [
            lc.idle_to_drain(state, now)[1],
            lc.drained(state, now)[1],
            lc.next_stale_report(state, now),
            state.purge_at if state.desired == lc.WANT_STOPPED else None,
            asc.next_look(state.autoscale, lc.autoscale_inputs(state, now))
            if state.spec.autoscaling and state.desired == lc.SERVING else None,
            state.warm_next if state.desired == lc.SERVING else None,
        ]
        ended = [v.ended_at + 61 for v in state.instances.values() if v.ended_at is not None]
        times.extend(ended)
        times = [t for t in times if t is not None]
        return min(times) if times else None

    # ---------------------------------------------------------------- instances
    def _plan_instance(self) -> lc.InstanceView:
        """Decide an instance; its child workflow is started by _start_planned in the loop."""
        iid = "".join(ID_ALPHABET[workflow.random().randrange(26)] for _ in range(8))
        view = lc.InstanceView(id=iid, status=lc.I_NEW, generation=self.state.generation, created_at=self._now(),
                               pool=lc.choose_pool(self.state, self._now()))
        self.state.instances[iid] = view
        self._dirty = True
        return view

    async def _start_planned(self) -> None:
        for view in [v for v in self.state.instances.values() if v.status == lc.I_NEW]:
            await workflow.start_child_workflow(
                "InstanceWorkflow",
                InstanceInput(self.name, view.id, view.generation, workflow.info().workflow_id, self.state.spec,
                              pool=view.pool),
                id=instance_workflow_id(self.name, view.id),
                parent_close_policy=ParentClosePolicy.ABANDON,
            )
            if view.status == lc.I_NEW:  # its first report may already have arrived
                # Only an instance that needs GPUs waits in a queue; others provision at once.
                view.status = "queued" if self.state.spec.gpu_count > 0 else "provisioning"

    async def _undrain_one(self) -> bool:
        """Demand came back while an instance drains: keep it instead of starting another."""
        for view in lc.undrainable(self.state):
            lc.undrain(self.state, view, self._now())
            await workflow.execute_local_activity(
                "record_instance", InstanceRecord(self.name, view.id, I_READY, event_kind="instance_undrained",
                                                  event_message=f"instance {view.id} kept: demand returned"),
                **DB_WRITE)
            return True
        return False

    async def _begin_drain(self, view: lc.InstanceView, why: str = "") -> None:
        view.status = I_DRAINING
        view.draining_since = self._now()
        why = why or f"idle for {self.state.spec.idle_retention_seconds}s"
        # The proxy stops routing to it once its view refreshes; the drain grace covers that.
        await workflow.execute_local_activity(
            "record_instance", InstanceRecord(self.name, view.id, I_DRAINING, event_kind="instance_draining",
                                              event_message=f"instance {view.id} {why}: draining"),
            **DB_WRITE)

    async def _release(self, view: lc.InstanceView, reason: str) -> None:
        if view.release_sent:
            return
        view.release_sent = True
        if view.status == lc.I_NEW:  # never started: nothing to stop
            view.status, view.ended_at = I_STOPPED, self._now()
            return
        try:
            await workflow.get_external_workflow_handle(instance_workflow_id(self.name, view.id)).signal(
                SIGNAL_RELEASE, ReleaseRequest(reason))
        except Exception as err:  # the child already ended; its last report is on its way or lost
            workflow.logger.warning("release of %s failed: %s", view.id, err)
            view.status, view.ended_at = I_STOPPED, self._now()

    # ---------------------------------------------------------------- publishing
    async def _publish(self) -> None:
        state = self.state
        status = lc.derive_status(state)
        reason = state.failure_reason if state.desired == lc.WANT_FAILED else ""
        if status == state.published_status and reason == state.published_reason:
            return
        state.published_status, state.published_reason = status, reason
        await workflow.execute_local_activity(
            "record_endpoint_status",
            EndpointStatusUpdate(self.name, status, reason, state.stopped_at, state.purge_at,
                                 event_kind="status", event_message=f"endpoint is {status}" + (f": {reason}" if reason else "")),
            **DB_WRITE)

    async def _event(self, kind: str, message: str, instance_id: str | None = None) -> None:
        await workflow.execute_local_activity("record_event", EventRecord(self.name, kind, message, instance_id), **DB_WRITE)

    def _now(self) -> float:
        return workflow.now().timestamp()

    def _note(self, kind: str, message: str) -> None:
        self._events.append((kind, message))
        self._dirty = True

    def _early_or(self, handler, arg) -> bool:
        if self.state is None:
            self._early.append((handler, arg))
            return True
        return False

    # ---------------------------------------------------------------- signals
    @workflow.signal(name=SIGNAL_STOP)
    def stop(self, req: ActionRequest | None = None) -> None:
        if self._early_or(self.stop, req):
            return
        if self.state.desired == lc.SERVING:
            self.state.desired = lc.WANT_STOPPED
            self.state.wake_pending = False
            self._note("stop", "stop requested" + (f": {req.reason}" if req and req.reason else ""))
        elif self.state.desired == lc.WANT_FAILED:
            self._note("ignored", "stop ignored: a failed endpoint can only be terminated")

    @workflow.signal(name=SIGNAL_RESTART)
    def restart(self, req: ActionRequest | None = None) -> None:
        if self._early_or(self.restart, req):
            return
        state = self.state
        if state.desired in (lc.WANT_FAILED, lc.WANT_TERMINATED):
            self._note("ignored", f"restart ignored: endpoint is {state.desired}")
            return  # a failed endpoint can only be terminated
        was_serving = any(v.status in (I_READY, I_DRAINING) for v in lc.live(state))
        state.desired = lc.SERVING
        state.generation += 1
        state.restart_pending = True
        state.restart_target = max(state.spec.min_instances, 1 if was_serving else 0)
        state.stopped_at = state.purge_at = None
        self._note("restart", f"restart requested: generation {state.generation}")

    @workflow.signal(name=SIGNAL_TERMINATE)
    def terminate(self, req: ActionRequest | None = None) -> None:
        if self._early_or(self.terminate, req):
            return
        if self.state.desired != lc.WANT_TERMINATED:
            self.state.desired = lc.WANT_TERMINATED
            self.state.wake_pending = False
            self._note("terminate", "terminate requested: purging everything")

    @workflow.signal(name=SIGNAL_WAKE)
    def wake(self, req: ActionRequest | None = None) -> None:
        if self._early_or(self.wake, req):
            return
        if self.state.desired == lc.SERVING and not lc.routable(self.state):
            if not self.state.wake_pending:
                self._note("wake", "wake requested")
            self.state.wake_pending = True

    @workflow.signal(name=SIGNAL_TRAFFIC)
    def traffic(self, report: TrafficReport) -> None:
        if self._early_or(self.traffic, report):
            return
        previous = self.state.traffic.get(report.reporter)
        if previous is None or report.seq > previous.seq:
            self.state.traffic[report.reporter] = report
            lc.observe_traffic_load(self.state, report)
            self._dirty = True

    @workflow.signal(name=SIGNAL_USAGE)
    def usage(self, report: asc.UsageReport) -> None:
        """A worker's CPU, memory and GPU samples of this endpoint's instances (workers/usage.py)."""
        if self._early_or(self.usage, report):
            return
        if self.state.spec.autoscaling:
            asc.observe_usage(self.state.autoscale, report)
            self._dirty = True

    @workflow.signal(name=SIGNAL_SCALE)
    def scale(self, req: ScaleRequest) -> None:
        if self._early_or(self.scale, req):
            return
        spec = self.state.spec
        if req.min_instances is not None:
            spec.min_instances = max(0, req.min_instances)
        if req.max_instances is not None:
            spec.max_instances = max(1, req.max_instances)
        spec.min_instances = min(spec.min_instances, spec.max_instances)
        self._dirty = True

    @workflow.signal(name=SIGNAL_SPEC_CHANGED)
    def spec_changed(self, req: ActionRequest | None = None) -> None:
        if self._early_or(self.spec_changed, req):
            return
        self.state.spec_reload_pending = True
        self._dirty = True

    @workflow.signal(name=SIGNAL_INSTANCE_CHANGED)
    def instance_changed(self, change: InstanceChange) -> None:
        if self._early_or(self.instance_changed, change):
            return
        state = self.state
        view = state.instances.get(change.instance_id)
        if view is None or view.status in lc.TERMINAL:
            return
        if change.status == I_READY and view.status == I_DRAINING:
            return  # a late report; the drain stands
        if change.cause == CAUSE_POOL_UNAVAILABLE:
            # Its pool has no host up: while another pool of the endpoint has, place it there.
            state.unavailable_pools[change.pool or view.pool] = change.at
            if lc.available_pools(state, change.at) and not view.release_sent:
                self._release_soon.append((view.id, f"pool {change.pool} has no host up: placing it in another pool"))
            self._dirty = True
            return
        view.address = change.address or view.address
        view.status = change.status
        if change.status == I_READY:
            view.ready_at = change.at
            state.wake_pending = False
        if change.status in lc.TERMINAL:
            view.ended_at = change.at
            view.reason = change.reason
            if change.status == I_FAILED and view.ready_at is None and not view.release_sent \
                    and state.desired == lc.SERVING and change.cause != CAUSE_HOST_LOST:
                # It never became ready: the spec is broken (bad command, health path, timeout).
                # Retrying would loop forever, so the endpoint fails and can only be terminated.
                state.desired = lc.WANT_FAILED
                state.failure_reason = change.reason
                state.wake_pending = False
                self._note("failed", f"instance {view.id} never became ready: {change.reason}")
            elif change.status == I_FAILED and view.ready_at is not None and not view.release_sent \
                    and state.desired == lc.SERVING and change.cause != CAUSE_HOST_LOST \
                    and lc.record_death(state, change.at):
                state.desired = lc.WANT_FAILED
                state.failure_reason = (f"crash loop: {lc.CRASH_LOOP_DEATHS} instances died within "
                                        f"{lc.CRASH_LOOP_WINDOW_SECONDS / 60:.0f} min; last: {change.reason}")
                state.wake_pending = False
                self._note("failed", state.failure_reason)
        self._dirty = True

    # ---------------------------------------------------------------- updates
    @workflow.update(name=UPDATE_WAKE)
    async def wake_until_ready(self, req: WakeRequest | None = None) -> WakeResult:
        await workflow.wait_condition(lambda: self.state is not None)
        ready = lc.routable(self.state)
        if ready:
            return WakeResult(ready[0].id, ready[0].address, cold_start=False, ready_at=ready[0].ready_at)
        self.wake(None)
        await workflow.wait_condition(lambda: bool(lc.routable(self.state)) or self.state.desired != lc.SERVING)
        ready = lc.routable(self.state)
        if not ready:
            raise self._not_serving_error()
        return WakeResult(ready[0].id, ready[0].address, cold_start=True, ready_at=ready[0].ready_at)

    @wake_until_ready.validator
    def _validate_wake(self, req: WakeRequest | None = None) -> None:
        if self.state is not None and self.state.desired != lc.SERVING:
            raise self._not_serving_error()

    @workflow.update(name=UPDATE_SCALE_OUT)
    async def scale_out(self, req: ScaleOutRequest | None = None) -> ScaleOutResult:
        await workflow.wait_condition(lambda: self.state is not None)
        state = self.state
        request_id = req.request_id if req else ""
        iid = state.scale_outs.get(request_id) if request_id else None
        if iid is None:
            if state.desired != lc.SERVING:
                raise self._not_serving_error()
            if len(lc.live(state)) >= state.spec.max_instances:
                raise ApplicationError("deployment replica quota exceeded", type=ERR_REPLICA_QUOTA,
                                       non_retryable=True)
            iid = self._plan_instance().id
            if request_id:
                state.scale_outs[request_id] = iid
        await workflow.wait_condition(
            lambda: iid not in state.instances or state.instances[iid].status in (I_READY, *lc.TERMINAL))
        view = state.instances.get(iid)
        if view is None or view.status != I_READY:
            reason = view.reason if view else "instance ended"
            raise ApplicationError(f"instance {iid} did not become ready: {reason}", type=ERR_START_FAILED,
                                   non_retryable=True)
        return ScaleOutResult(iid, view.address, view.ready_at)

    @scale_out.validator
    def _validate_scale_out(self, req: ScaleOutRequest | None = None) -> None:
        if self.state is not None and self.state.desired != lc.SERVING:
            raise self._not_serving_error()

    def _not_serving_error(self) -> ApplicationError:
        state = self.state
        if state.desired == lc.WANT_FAILED:
            return ApplicationError(f"endpoint {self.name} failed: {state.failure_reason}", type=ERR_START_FAILED,
                                    non_retryable=True)
        return ApplicationError(f"endpoint {self.name} is {lc.derive_status(state)}", type=ERR_NOT_SERVING,
                                non_retryable=True)

    # ---------------------------------------------------------------- query
    @workflow.query(name=QUERY_STATUS)
    def status(self) -> lc.EndpointStatusView:
        return lc.status_view(self.name, self.state, self._now())
