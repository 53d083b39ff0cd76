"""EndpointWorkflow (id `endpoint-<name>`): an endpoint's whole life, from creation to purge.

It is the only thing that decides to start, drain or release an instance. It owns the idle
timer, the purge timer and the traffic split between revisions. Instances are child workflows
(InstanceWorkflow) that report back with `instance_changed`; an update is a child RolloutWorkflow
(workflows/rollout.py) that decides its steps and sends them with `rollout_step`. Decisions live
in workflows/lifecycle.py and workflows/rollout_logic.py as pure functions; this file turns
signals into state changes and decisions into activities and child workflows.
"""
from __future__ import annotations

import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from common.models import I_DRAINING, I_FAILED, I_READY, I_STOPPED
    from workflows import autoscale as asc
    from common.revisions import (
        BLUE_GREEN,
        CANARY,
        R_DEPLOYING,
        R_FAILED,
        R_RETIRED,
        R_SERVING,
        ROLLING,
        STRATEGIES,
        primary,
    )
    from workflows import lifecycle as lc
    from workflows import rollout_logic as rl
    from workflows.activity_types import (
        EndpointStatusUpdate,
        EventRecord,
        InstanceRecord,
        LifecycleSpec,
        LoadSpecInput,
        PrepareRevisionInput,
        PrepareRevisionResult,
        PurgeInput,
        WarmWindowsInput,
        WarmWindowsResult,
        RevisionsRecord,
        RevisionState,
    )
    from workflows.contracts import (
        ERR_BAD_SPLIT,
        ERR_NO_ROLLOUT,
        ERR_NOT_SERVING,
        ERR_NOTHING_TO_ROLL_BACK,
        ERR_REPLICA_QUOTA,
        ERR_ROLLOUT_ACTIVE,
        ERR_START_FAILED,
        QUERY_STATUS,
        ROLLOUT_WORKFLOW,
        SIGNAL_RESTART,
        SIGNAL_SCALE,
        SIGNAL_SPEC_CHANGED,
        SIGNAL_STOP,
        SIGNAL_TERMINATE,
        SIGNAL_TRAFFIC,
        SIGNAL_USAGE,
        SIGNAL_WAKE,
        UPDATE_DEPLOY,
        UPDATE_PROMOTE,
        UPDATE_ROLLBACK,
        UPDATE_SCALE_OUT,
        UPDATE_SET_TRAFFIC,
        UPDATE_WAKE,
        ActionRequest,
        DeployRequest,
        DeployResult,
        EndpointInput,
        PromoteRequest,
        PromoteResult,
        RollbackRequest,
        RollbackResult,
        ScaleOutRequest,
        ScaleOutResult,
        ScaleRequest,
        TrafficReport,
        TrafficSplitRequest,
        TrafficSplitResult,
        WakeRequest,
        WakeResult,
        instance_workflow_id,
        rollout_workflow_id,
    )
    from workflows.rollout_types import (
        COMMAND_ABORT,
        COMMAND_PROMOTE,
        COMMAND_ROLLBACK,
        ROLLED_BACK,
        SIGNAL_COMMAND,
        SIGNAL_OBSERVED,
        SIGNAL_ROLLOUT_STEP,
        SUCCEEDED,
        RolloutCommand,
        RolloutInput,
        RolloutOptions,
        RolloutState,
        RolloutStep,
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
# Revisions, the traffic split and updates (README.md "Revisions and updates"): taken on when the
# spec first carries revisions; a restart while instances run becomes a rolling restart.
PATCH_REVISIONS = "revisions"
# While an update runs, its rollout hears from the endpoint at least this often (a failed signal
# tells the endpoint the rollout is gone, so traffic is never left split by accident).
ROLLOUT_KEEPALIVE_SECONDS = 30.0


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
        # Revision states to write with the next split (states are written with the traffic).
        self._revision_states: list[RevisionState] = []
        # Commands for the running rollout (promote, rollback, abort), sent by the loop.
        self._rollout_commands: list[RolloutCommand] = []
        self._spec_loads = 0

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
            elif spec.revisions:
                await self._adopt_revisions()
                await self._pin_at_creation()
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
        if self.state.rollout is not None and not self.state.rollout.started or self._rollout_commands:
            return
        workflow.continue_as_new(EndpointInput(name=self.name, state=self.state))

    async def _reconcile(self) -> None:
        state = self.state
        now = self._now()
        if state.spec_reload_pending:
            state.spec_reload_pending = False
            spec = await workflow.execute_local_activity(
                "load_lifecycle_spec", LoadSpecInput(self.name), result_type=LifecycleSpec, **DB_WRITE)
            self._spec_loads += 1
            problems = lc.spec_problems(spec) if spec.exists else []
            if problems:
                await self._event("spec_refused", "spec change refused, the previous one stays: " + "; ".join(problems))
            elif spec.exists:
                state.spec = spec
                if workflow.patched(PATCH_SPEC_TO_INSTANCES):
                    await self._tell_instances(spec)
                if spec.revisions and not state.split:
                    await self._adopt_revisions()

        # An update: started, then its steps applied (the split first, so that no request goes to
        # an instance on its way out), whatever the endpoint's state.
        if state.rollout is not None and not state.rollout.started:
            await self._start_rollout()
        await self._apply_rollout_step()
        await self._send_rollout_commands()
        # A split changed by hand (set_traffic, rollback) is written before any instance of a
        # revision that lost its share starts draining below.
        await self._record_split()

        if state.desired != lc.SERVING:
            if state.rollout is not None and state.rollout.started and lc.live(state) \
                    and not state.rollout.abort_sent:
                state.rollout.abort_sent = True
                self._rollout_commands.append(RolloutCommand(COMMAND_ABORT, f"endpoint {state.desired}"))
                await self._send_rollout_commands()
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
                        self._plan_instance(primary(state.split))
            if (state.spec.warm_windows or state.warm) and workflow.patched(PATCH_WARM_WINDOWS):
                await self._warm_windows(now)
            autoscaling = state.spec.autoscaling and workflow.patched(PATCH_AUTOSCALE)
            if autoscaling:
                await self._autoscale(now)
            for revision, count in lc.wanted_by_revision(state).items():
                for _ in range(count):
                    if not await self._undrain_one(revision if state.split else None):
                        self._plan_instance(revision)
            for revision, count in lc.rollout_new_needed(state).items():
                for _ in range(count):
                    self._plan_instance(revision)
            for iid in lc.to_retire(state):
                await self._retire(state.instances[iid], "its revision has no traffic share")
            for iid in lc.scaled_down(state):
                await self._retire(state.instances[iid], f"scaled down to {state.spec.instance_count} instances")
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
        await self._record_split()
        while self._events:
            kind, message = self._events.pop(0)
            await self._event(kind, message)
        await self._publish()
        await self._tell_rollout()
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
        if state.rollout is not None and state.rollout.started:
            times.append(state.rollout.last_sent_at + ROLLOUT_KEEPALIVE_SECONDS)
        times = [t for t in times if t is not None]
        return min(times) if times else None

    # ---------------------------------------------------------------- instances
    def _plan_instance(self, revision: int = 0) -> lc.InstanceView:
        """Decide an instance (of `revision`; 0 without revisions); its child workflow is started by
        _start_planned in the loop."""
        iid = "".join(ID_ALPHABET[workflow.random().randrange(26)] for _ in range(8))
        if self.state.split and not revision:
            revision = primary(self.state.split)
        info = lc.revision_info(self.state.spec, revision) if revision else None
        view = lc.InstanceView(id=iid, status=lc.I_NEW, generation=self.state.generation, created_at=self._now(),
                               pool=lc.choose_pool(self.state, self._now(), info.pools if info else None),
                               revision=revision)
        self.state.instances[iid] = view
        self._dirty = True
        return view

    async def _start_planned(self) -> None:
        for view in [v for v in self.state.instances.values() if v.status == lc.I_NEW]:
            spec = lc.spec_for_revision(self.state.spec, view.revision)
            await workflow.start_child_workflow(
                "InstanceWorkflow",
                InstanceInput(self.name, view.id, view.generation, workflow.info().workflow_id, spec,
                              pool=view.pool, revision=view.revision),
                id=instance_workflow_id(self.name, view.id),
                parent_close_policy=ParentClosePolicy.ABANDON,
            )
            if view.status == lc.I_NEW:  # its first report may already have arrived
                # Only an instance that needs GPUs waits in a queue; others provision at once.
                view.status = "queued" if spec.gpu_count > 0 else "provisioning"

    async def _undrain_one(self, revision: int | None = None) -> bool:
        """Demand came back while an instance drains: keep it instead of starting another."""
        for view in lc.undrainable(self.state, revision):
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

    async def _retire(self, view: lc.InstanceView, reason: str) -> None:
        """Take an instance out on purpose (an update replaced it, its revision lost its share, a
        scale-down): drained first when it serves, so no request in flight fails, and never kept
        back by returning demand."""
        view.retiring = True
        if view.status == I_READY and not view.release_sent:
            view.status = I_DRAINING
            view.draining_since = self._now()
            await workflow.execute_local_activity(
                "record_instance", InstanceRecord(self.name, view.id, I_DRAINING, event_kind="instance_draining",
                                                  event_message=f"instance {view.id} draining: {reason}"),
                **DB_WRITE)
        elif view.status != I_DRAINING:
            await self._release(view, reason)

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


    # ---------------------------------------------------------------- revisions and updates
    async def _adopt_revisions(self) -> None:
        """The spec carries revisions for the first time (a new endpoint, or one made before
        revisions, after its spec reloads): route by their recorded shares from now on."""
        if not workflow.patched(PATCH_REVISIONS):
            return
        state = self.state
        split = {info.number: info.traffic for info in state.spec.revisions if info.traffic > 0}
        if not split:  # no share recorded yet: the newest revision takes all
            split = {max(info.number for info in state.spec.revisions): 100}
        lc.adopt_split(state, split)
        # What the database holds already needs no writing; a split it lacks is written next.
        state.recorded_split = {info.number: info.traffic for info in state.spec.revisions if info.traffic > 0}

    async def _pin_at_creation(self) -> None:
        """A revision's source is pinned when it is made (README.md "Revisions and updates"): the
        first revision's, when its endpoint's workflow starts. A source that cannot be pinned (no
        such commit, directory or repository) fails the endpoint now rather than at its first call."""
        state = self.state
        first = primary(state.split)
        info = lc.revision_info(state.spec, first)
        if info is None or info.pinned:
            return
        pinned = await self._prepare_revision(first)
        if not pinned.ok:
            state.desired = lc.WANT_FAILED
            state.failure_reason = f"the source of revision {first} could not be pinned: {pinned.reason}"
            self._revision_states.append(RevisionState(first, R_FAILED, pinned.reason))

    async def _prepare_revision(self, number: int) -> PrepareRevisionResult:
        try:
            return await workflow.execute_activity(
                "prepare_revision", PrepareRevisionInput(self.name, number), result_type=PrepareRevisionResult,
                start_to_close_timeout=timedelta(hours=1), heartbeat_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=["SourceError"]))
        except Exception as err:  # an ActivityError: the cause says why
            return PrepareRevisionResult(ok=False, reason=str(getattr(err, "cause", None) or err))

    def _options(self, req: DeployRequest | None, strategy: str = ROLLING) -> RolloutOptions:
        spec = self.state.spec

        def given(value, default):
            return default if value is None else value

        return RolloutOptions(
            strategy=(req.strategy if req and req.strategy in STRATEGIES else strategy),
            steps=list(req.steps) if req and req.steps else [],
            pause_seconds=given(req.pause_seconds if req else None, spec.canary_pause_seconds),
            manual=bool(req and req.manual),
            settle_seconds=given(req.settle_seconds if req else None, spec.rollout_settle_seconds),
            error_rate=given(req.error_rate if req else None, spec.rollout_error_rate),
            window_seconds=given(req.window_seconds if req else None, spec.blue_green_window_seconds),
        )

    def _new_rollout(self, kind: str, target: int, options: RolloutOptions, abandons: int = 0) -> RolloutState:
        state = self.state
        state.rollout_seq += 1
        state.generation += 1
        state.rollout = RolloutState(rollout=state.rollout_seq, workflow_id=rollout_workflow_id(self.name, state.rollout_seq),
                                     target=target, generation=state.generation, options=options, kind=kind,
                                     abandons=abandons)
        self._dirty = True
        return state.rollout

    async def _start_rollout(self) -> None:
        state, r = self.state, self.state.rollout
        r.base_split = dict(state.split)
        info = lc.revision_info(state.spec, r.target) if r.target else None
        if r.target and info is None:
            state.rollout = None
            await self._event("rollout_refused", f"update {r.rollout}: revision {r.target} does not exist")
            return
        r.pin = bool(info and not info.pinned)
        what = {"deploy": f"revision {r.target} rolling out ({r.options.strategy})",
                "rollback": f"rolling back to revision {r.target} (revision {r.abandons} leaves)",
                "restart": "rolling restart of the running instances"}[r.kind]
        states = [RevisionState(r.target, R_DEPLOYING, "", r.options.strategy)] if r.kind == "deploy" else []
        await workflow.execute_local_activity(
            "record_revisions", RevisionsRecord(self.name, None, states, "rollout_started", f"update {r.rollout}: {what}"),
            **DB_WRITE)
        await workflow.start_child_workflow(
            ROLLOUT_WORKFLOW,
            RolloutInput(self.name, workflow.info().workflow_id, r.rollout, r.target, dict(r.base_split), r.options,
                         float(state.spec.startup_timeout_seconds), r.pin),
            id=r.workflow_id,
            parent_close_policy=ParentClosePolicy.ABANDON,
        )
        r.started = True
        r.last_sent_at = 0.0

    async def _apply_rollout_step(self) -> None:
        """The rollout's last step: its split (written before anything is released), new instances
        to keep (planned by the reconcile), old instances to release, and its end."""
        state, r = self.state, self.state.rollout
        if r is None or r.step is None or r.step.seq <= r.applied_seq:
            return
        step = r.step
        r.applied_seq = step.seq
        if step.split and step.split != state.split:
            state.split = dict(step.split)
            await self._record_split()
        for iid in step.release:
            view = state.instances.get(iid)
            if view is not None and view.status in lc.LIVE and not view.release_sent:
                await self._retire(view, f"replaced by update {r.rollout}")
        if step.done:
            await self._finish_rollout(r, step.outcome, step.reason, step.split or r.base_split)

    async def _finish_rollout(self, r: RolloutState, outcome: str, reason: str, split: dict[int, int]) -> None:
        state = self.state
        state.rollout = None
        state.split = dict(split) if split else state.split
        if outcome == SUCCEEDED:
            if r.target:
                state.good = [g for g in state.good if g not in (r.target, r.abandons)] + [r.target]
                self._revision_states.append(RevisionState(r.target, R_SERVING, ""))
            if r.kind == "rollback" and r.abandons:
                self._revision_states.append(RevisionState(r.abandons, R_FAILED, f"rolled back to revision {r.target}"))
            message = {"deploy": f"revision {r.target} serves all traffic ({r.options.strategy})",
                       "rollback": f"rolled back to revision {r.target}",
                       "restart": "rolling restart done"}[r.kind]
            kind = "rollout_succeeded"
        else:
            if r.target and r.kind == "deploy" and r.target not in state.split:
                self._revision_states.append(RevisionState(
                    r.target, R_FAILED if outcome == ROLLED_BACK else R_RETIRED,
                    reason if outcome == ROLLED_BACK else f"update aborted: {reason}"))
            message = f"{'rolled back' if outcome == ROLLED_BACK else 'aborted'}: {reason}"
            kind = "rollout_rolled_back" if outcome == ROLLED_BACK else "rollout_aborted"
        for number in r.base_split:
            if number not in state.split and number != r.abandons:
                self._revision_states.append(RevisionState(number, R_RETIRED, f"replaced by update {r.rollout}"))
        self._note(kind, f"update {r.rollout}: {message}")
        # The split it ends with is written first; then the instances it leaves behind go.
        await self._record_split(force=True)
        if outcome != SUCCEEDED:
            for view in lc.live(state):
                if lc.started_by(r, view) and not view.release_sent:
                    await self._retire(view, f"update {r.rollout} {outcome.replace('_', ' ')}")

    async def _rollout_gone(self, r: RolloutState, why: str) -> None:
        """The rollout ended without a last step (terminated by an operator): the split it started
        from comes back, so traffic is never left split by accident. A rollout that ended with its
        last step is not gone: that step reached this workflow before its end did (it signals, then
        completes), so it is applied as sent."""
        if self.state.rollout is not r:
            return
        if r.step is not None and r.step.done:
            await self._apply_rollout_step()
            return
        await self._finish_rollout(r, "aborted", why, r.base_split)

    async def _send_rollout_commands(self) -> None:
        r = self.state.rollout
        if r is None or not r.started:
            return
        while self._rollout_commands:
            command = self._rollout_commands.pop(0)
            try:
                await workflow.get_external_workflow_handle(r.workflow_id).signal(SIGNAL_COMMAND, command)
            except Exception as err:  # it ended meanwhile
                await self._rollout_gone(r, f"the update's workflow ended: {err}")
                return

    async def _tell_rollout(self) -> None:
        """Send the running rollout what it watches, when that changed (and at least every
        ROLLOUT_KEEPALIVE_SECONDS)."""
        r = self.state.rollout
        if r is None or not r.started:
            return
        now = self._now()
        obs = rl.observe(self.state, now)
        if obs == r.last_observation and now - r.last_sent_at < ROLLOUT_KEEPALIVE_SECONDS:
            return
        r.obs_seq += 1
        r.last_observation, r.last_sent_at = obs, now
        try:
            await workflow.get_external_workflow_handle(r.workflow_id).signal(
                SIGNAL_OBSERVED, dataclasses.replace(obs, seq=r.obs_seq))
        except Exception as err:
            await self._rollout_gone(r, f"the update's workflow ended: {err}")

    async def _record_split(self, force: bool = False) -> None:
        """Write the split (and revision states) where the proxy reads it, when it changed."""
        state = self.state
        if not state.split or (state.split == state.recorded_split and not self._revision_states and not force):
            return
        before = state.recorded_split
        states = list(self._revision_states)
        self._revision_states.clear()
        named = {s.number for s in states}
        deploying = state.rollout.target if state.rollout is not None else None
        for number in state.split:
            if number not in before and number not in named and number != deploying:
                states.append(RevisionState(number, R_SERVING, ""))
        for number in before:
            if number not in state.split and number not in named and number != deploying:
                states.append(RevisionState(number, R_RETIRED, "no traffic share"))
        shares = ", ".join(f"revision {n} {p}%" for n, p in sorted(state.split.items()))
        await workflow.execute_local_activity(
            "record_revisions",
            RevisionsRecord(self.name, dict(state.split), states,
                            "traffic" if state.split != before else "", f"traffic: {shares}"),
            **DB_WRITE)
        state.recorded_split = dict(state.split)

    def _wake_revision(self, revision: int) -> int:
        """The revision a wake or scale-out is for: the one asked for while it has a share, else
        the primary one (0 without revisions)."""
        split = self.state.split
        if not split:
            return 0
        return revision if revision in split else primary(split)

    def _routable(self, revision: int) -> list[lc.InstanceView]:
        return [v for v in lc.routable(self.state) if not revision or v.revision == revision]

    def _ask_wake(self, revision: int) -> None:
        state = self.state
        if not state.wake_pending:
            state.wake_revisions = []
        if revision and revision not in state.wake_revisions:
            state.wake_revisions.append(revision)
        if not state.wake_pending:
            self._note("wake", "wake requested" + (f" (revision {revision})" if revision else ""))
        state.wake_pending = True
        self._dirty = True

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
        if state.split and state.desired == lc.SERVING and lc.routable(state) and workflow.patched(PATCH_REVISIONS):
            # Instances run: replace them one at a time, each new one serving before an old one
            # leaves (README.md "Revisions and updates"), instead of stopping them all first.
            if state.rollout is not None:
                self._note("ignored", f"restart ignored: update {state.rollout.rollout} is in progress")
                return
            self._new_rollout("restart", 0, self._options(None))
            self._note("restart", "rolling restart requested")
            return
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
            self._ask_wake(self._wake_revision(0))

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
            if view.revision in state.wake_revisions:
                state.wake_revisions.remove(view.revision)
            state.wake_pending = bool(state.wake_revisions) and bool(state.split)
        if change.status in lc.TERMINAL:
            view.ended_at = change.at
            view.reason = change.reason
            if change.status == I_FAILED and lc.in_new_group(state, view):
                pass  # an update's new instance: its rollout sees the failure and rolls back
            elif change.status == I_FAILED and view.ready_at is None and not view.release_sent \
                    and state.desired == lc.SERVING and change.cause != CAUSE_HOST_LOST \
                    and len(state.split) > 1 and view.revision != lc.good_revision(state) \
                    and lc.good_revision(state) in state.split:
                # A revision given a share by hand that cannot start: its share goes back to the
                # last good revision; the endpoint goes on serving.
                good = lc.good_revision(state)
                state.split = lc.move_share(state.split, view.revision, good)
                if view.revision in state.wake_revisions:
                    state.wake_revisions.remove(view.revision)
                self._revision_states.append(RevisionState(view.revision, R_FAILED, change.reason))
                self._note("revision_failed", f"revision {view.revision} never became ready ({change.reason}): "
                                              f"its share goes to revision {good}")
            elif change.status == I_FAILED and view.ready_at is None and not view.release_sent \
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

    @workflow.signal(name=SIGNAL_ROLLOUT_STEP)
    def rollout_step(self, step: RolloutStep) -> None:
        """A step of the running update, from its RolloutWorkflow."""
        if self._early_or(self.rollout_step, step):
            return
        r = self.state.rollout
        if r is None or step.rollout != r.rollout or (r.step is not None and step.seq <= r.step.seq):
            return
        r.step = step
        self._dirty = True

    # ---------------------------------------------------------------- updates
    @workflow.update(name=UPDATE_WAKE)
    async def wake_until_ready(self, req: WakeRequest | None = None) -> WakeResult:
        await workflow.wait_condition(lambda: self.state is not None)
        asked = req.revision if req else 0
        ready = self._routable(self._wake_revision(asked))
        if ready:
            return WakeResult(ready[0].id, ready[0].address, cold_start=False, ready_at=ready[0].ready_at,
                              revision=ready[0].revision)
        if self.state.desired == lc.SERVING:
            self._ask_wake(self._wake_revision(asked))
        # The revision asked for may lose its share meanwhile (an update ends): then the primary.
        await workflow.wait_condition(lambda: bool(self._routable(self._wake_revision(asked)))
                                      or self.state.desired != lc.SERVING)
        ready = self._routable(self._wake_revision(asked))
        if not ready:
            raise self._not_serving_error()
        return WakeResult(ready[0].id, ready[0].address, cold_start=True, ready_at=ready[0].ready_at,
                          revision=ready[0].revision)

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
            iid = self._plan_instance(self._wake_revision(req.revision if req else 0)).id
            if request_id:
                state.scale_outs[request_id] = iid
        await workflow.wait_condition(
            lambda: iid not in state.instances or state.instances[iid].status in (I_READY, *lc.TERMINAL))
        view = state.instances.get(iid)
        if view is None or view.status != I_READY:
            reason = view.reason if view else "instance ended"
            raise ApplicationError(f"instance {iid} did not become ready: {reason}", type=ERR_START_FAILED,
                                   non_retryable=True)
        return ScaleOutResult(iid, view.address, view.ready_at, view.revision)

    @scale_out.validator
    def _validate_scale_out(self, req: ScaleOutRequest | None = None) -> None:
        if self.state is not None and self.state.desired != lc.SERVING:
            raise self._not_serving_error()

    @workflow.update(name=UPDATE_DEPLOY)
    async def deploy(self, req: DeployRequest) -> DeployResult:
        """Roll a revision out with the strategy asked for (README.md "Revisions and updates")."""
        await workflow.wait_condition(lambda: self.state is not None)
        self._refuse_while_updating()
        # The web app made the revision just now: the spec (its revisions) is loaded again first.
        self.state.spec_reload_pending = True
        r = self._new_rollout("deploy", req.revision, self._options(req))
        self._note("deploy", f"update {r.rollout}: revision {req.revision} ({r.options.strategy}) requested")
        return DeployResult(r.rollout, req.revision, r.options.strategy)

    @deploy.validator
    def _validate_deploy(self, req: DeployRequest) -> None:
        if self.state is None:
            return
        self._refuse_unless_serving_or_stopped()
        self._refuse_while_updating()
        if req.strategy not in STRATEGIES:
            raise ApplicationError(f"strategy must be one of {', '.join(STRATEGIES)}, got {req.strategy!r}",
                                   type=ERR_BAD_SPLIT, non_retryable=True)

    @workflow.update(name=UPDATE_SET_TRAFFIC)
    async def set_traffic(self, req: TrafficSplitRequest) -> TrafficSplitResult:
        """Split traffic between revisions by hand (shares summing to 100)."""
        await workflow.wait_condition(lambda: self.state is not None)
        state = self.state
        if not state.spec.revisions:  # loaded before revisions existed: know them first
            loads = self._spec_loads
            state.spec_reload_pending = True
            self._dirty = True
            await workflow.wait_condition(lambda: self._spec_loads > loads)
        self._refuse_while_updating()
        split = self._checked_split(req.traffic)
        if not state.split:
            lc.adopt_split(state, split)
        state.split = split
        state.wake_revisions = [r for r in state.wake_revisions if r in split]
        self._note("traffic", "traffic split set: " + ", ".join(f"revision {n} {p}%" for n, p in split.items()))
        return TrafficSplitResult(dict(split))

    @set_traffic.validator
    def _validate_set_traffic(self, req: TrafficSplitRequest) -> None:
        if self.state is None:
            return
        self._refuse_unless_serving_or_stopped()
        self._refuse_while_updating()
        self._checked_split(req.traffic, loaded=bool(self.state.spec.revisions))

    def _checked_split(self, traffic: dict[int, int], loaded: bool = True) -> dict[int, int]:
        from common.revisions import SplitError, check_split

        known = [info.number for info in self.state.spec.revisions] or list(self.state.split)
        if not known and not loaded:
            known = [int(k) for k in traffic]  # checked again once the revisions are loaded
        try:
            return check_split(traffic, known)
        except SplitError as err:
            raise ApplicationError(str(err), type=ERR_BAD_SPLIT, non_retryable=True) from None

    @workflow.update(name=UPDATE_ROLLBACK)
    async def rollback(self, req: RollbackRequest | None = None) -> RollbackResult:
        """All traffic back to the last good revision: an update in progress rolls back at once; a
        hand-made split returns to it; after an update finished, the revision before it comes back
        (a rolling update)."""
        await workflow.wait_condition(lambda: self.state is not None)
        state = self.state
        reason = (req.reason if req else "") or "requested"
        r = state.rollout
        if r is not None:
            self._rollout_commands.append(RolloutCommand(COMMAND_ROLLBACK, reason))
            self._dirty = True
            back = primary(r.base_split) if r.started else primary(state.split)
            return RollbackResult(back, f"update {r.rollout} is rolling back to its starting split", r.rollout)
        good = lc.good_revision(state)
        if state.split and state.split != {good: 100}:
            state.split = {good: 100}
            state.wake_revisions = [good] if state.wake_revisions else []
            self._note("rollback", f"rollback ({reason}): all traffic to revision {good}")
            return RollbackResult(good, f"all traffic returned to revision {good}")
        earlier = [g for g in state.good if g != good]
        if not earlier:
            raise ApplicationError(f"nothing to roll back to: revision {good or 1} is the only good revision",
                                   type=ERR_NOTHING_TO_ROLL_BACK, non_retryable=True)
        r = self._new_rollout("rollback", earlier[-1], self._options(None), abandons=good)
        self._note("rollback", f"rollback ({reason}): revision {earlier[-1]} comes back, rolling")
        return RollbackResult(earlier[-1], f"rolling back from revision {good} to revision {earlier[-1]}",
                              r.rollout)

    @rollback.validator
    def _validate_rollback(self, req: RollbackRequest | None = None) -> None:
        if self.state is not None:
            self._refuse_unless_serving_or_stopped()

    @workflow.update(name=UPDATE_PROMOTE)
    async def promote(self, req: PromoteRequest | None = None) -> PromoteResult:
        """A canary's next step now (its pause cut short, or a manual one), or the end of a
        blue-green rollback window."""
        await workflow.wait_condition(lambda: self.state is not None)
        r = self.state.rollout
        if r is None or r.options.strategy not in (CANARY, BLUE_GREEN) or r.kind != "deploy":
            raise ApplicationError("nothing to promote: no canary or blue-green update is in progress",
                                   type=ERR_NO_ROLLOUT, non_retryable=True)
        self._rollout_commands.append(RolloutCommand(COMMAND_PROMOTE))
        self._dirty = True
        return PromoteResult(r.rollout, f"update {r.rollout} ({r.options.strategy}) promoted")

    def _refuse_while_updating(self) -> None:
        r = self.state.rollout
        if r is not None:
            raise ApplicationError(
                f"update {r.rollout} ({r.kind}, {r.options.strategy}) is in progress: wait for it, promote it or "
                "roll it back first", type=ERR_ROLLOUT_ACTIVE, non_retryable=True)

    def _refuse_unless_serving_or_stopped(self) -> None:
        if self.state.desired in (lc.WANT_FAILED, lc.WANT_TERMINATED):
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
