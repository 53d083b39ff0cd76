"""RolloutWorkflow (id `endpoint-<name>-rollout-<n>`): one update of an endpoint, started by its
EndpointWorkflow as a child (README.md "Revisions and updates").

It pins the new revision's source, then drives the update step by step: it tells the endpoint the
split it wants, how many new instances of each revision to keep and which old instances to
release (`rollout_step`), and waits for what the endpoint observes (`observed`): new instances
ready or failed, and the requests and errors the proxies counted on them. The endpoint's workflow
owns the instances and the split throughout; this one only decides. Every wait is durable: a
worker or Temporal restart resumes the update where it was.

- rolling (also a restart): one new instance at a time (surge 1); once ready it takes its share
  of the traffic and must serve for the settle period without errors above the threshold, then
  one old instance is released. A failed readiness, a death or too many errors roll back.
- blue-green: the whole new set first; then all traffic switches at once; the old set is kept for
  the rollback window (errors above the threshold in it roll back), then released.
- canary: steps of percentages, each held for a pause (or until promoted, when manual) while its
  errors stay below the threshold; 100% ends it. Errors or a failure roll back.

A rollback returns the split the update started from and releases the new instances. Nothing
running: the split switches at once.
"""
from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from common.revisions import BLUE_GREEN, CANARY, DEFAULT_CANARY_STEPS, blend
    from workflows.activity_types import PrepareRevisionInput, PrepareRevisionResult
    from workflows.rollout_logic import canary_steps, health_problem, instances_for_share, next_old
    from workflows.rollout_types import (
        ABORTED,
        COMMAND_ABORT,
        COMMAND_PROMOTE,
        COMMAND_ROLLBACK,
        QUERY_ROLLOUT,
        ROLLED_BACK,
        SIGNAL_COMMAND,
        SIGNAL_OBSERVED,
        SIGNAL_ROLLOUT_STEP,
        SUCCEEDED,
        RolloutCommand,
        RolloutInput,
        RolloutObservation,
        RolloutStep,
    )

# A revision's source is pinned once; a clone is bounded by STANDBY_MODEL_GIT_TIMEOUT_SECONDS on
# the worker, this only bounds the activity as a whole.
PIN_TIMEOUT = timedelta(hours=1)
# New instances get their startup timeout plus this long (a queue for GPUs, placement) to be ready.
READY_MARGIN_SECONDS = 120.0


class _RollBack(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Abort(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@workflow.defn(name="RolloutWorkflow")
class RolloutWorkflow:
    @workflow.init
    def __init__(self, inp: RolloutInput) -> None:
        self.inp = inp
        self.obs: RolloutObservation | None = None
        self.commands: list[RolloutCommand] = []
        self._promote_pending = False
        self._changed = False
        self.seq = 0
        self.split = dict(inp.base_split)
        self.new_counts: dict[int, int] = {}
        self.released: list[str] = []
        self.hold_old = False
        self.phase = "pinning the source" if inp.pin and inp.target else "starting"
        self.outcome = ""
        self.reason = ""

    # ---------------------------------------------------------------- messages
    @workflow.signal(name=SIGNAL_OBSERVED)
    def observed(self, obs: RolloutObservation) -> None:
        if obs.rollout == self.inp.rollout and (self.obs is None or obs.seq > self.obs.seq):
            self.obs = obs
            self._changed = True

    @workflow.signal(name=SIGNAL_COMMAND)
    def command(self, cmd: RolloutCommand) -> None:
        self.commands.append(cmd)
        self._changed = True

    @workflow.query(name=QUERY_ROLLOUT)
    def status(self) -> RolloutStep:
        return self._step_message(done=bool(self.outcome))

    # ---------------------------------------------------------------- run
    @workflow.run
    async def run(self, inp: RolloutInput) -> str:
        try:
            if inp.pin and inp.target:
                await self._pin()
            await self._wait_until(lambda: self.obs is not None, None)
            self._check(allow_promote=False)
            obs = self.obs
            if not obs.old_ready and obs.old_live == 0:
                self.phase = "nothing was running: switched at once"
                self.split = blend(inp.base_split, inp.target, 100) if inp.target else dict(inp.base_split)
            elif inp.target and inp.options.strategy == BLUE_GREEN:
                await self._blue_green()
            elif inp.target and inp.options.strategy == CANARY:
                await self._canary()
            else:
                await self._rolling()
            return await self._finish(SUCCEEDED, "")
        except _RollBack as rollback:
            return await self._finish(ROLLED_BACK, rollback.reason)
        except _Abort as abort:
            return await self._finish(ABORTED, abort.reason)

    async def _pin(self) -> None:
        try:
            pinned: PrepareRevisionResult = await workflow.execute_activity(
                "prepare_revision", PrepareRevisionInput(self.inp.endpoint, self.inp.target),
                result_type=PrepareRevisionResult, start_to_close_timeout=PIN_TIMEOUT,
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=["SourceError"]))
        except ActivityError as err:
            pinned = PrepareRevisionResult(ok=False, reason=str(err.cause or err))
        if not pinned.ok:
            raise _RollBack(f"the source of revision {self.inp.target} could not be pinned: {pinned.reason}")
        self.phase = "starting"

    # ---------------------------------------------------------------- strategies
    async def _rolling(self) -> None:
        inp, opts = self.inp, self.inp.options
        replaced = 0
        while True:
            old = next_old(self.obs, set(self.released))
            if old is None:
                break
            revision = inp.target or old.revision
            self.new_counts[revision] = self.new_counts.get(revision, 0) + 1
            self.phase = f"rolling: starting new instance {replaced + 1}"
            await self._send()
            await self._await_new_ready()
            if inp.target:
                self.split = blend(inp.base_split, inp.target, self._new_share())
            self.phase = f"rolling: new instance {replaced + 1} settling for {opts.settle_seconds:g}s"
            await self._send()
            await self._watch(opts.settle_seconds, allow_promote=False)
            self.released.append(old.id)
            if inp.target:
                self.split = blend(inp.base_split, inp.target, self._new_share())
            self.phase = f"rolling: releasing old instance {old.id}"
            await self._send(release=[old.id])
            replaced += 1
        if inp.target:
            self.split = blend(inp.base_split, inp.target, 100)
        self.phase = f"rolling: done, {replaced} instance(s) replaced"

    async def _blue_green(self) -> None:
        inp, opts = self.inp, self.inp.options
        old = [ref.id for ref in self.obs.old_ready]
        self.new_counts = {inp.target: max(1, len(old))}
        self.phase = f"blue-green: starting {self.new_counts[inp.target]} new instance(s)"
        await self._send()
        await self._await_new_ready()
        self.split = blend(inp.base_split, inp.target, 100)
        self.hold_old = True
        self.phase = f"blue-green: switched; the old set is kept {opts.window_seconds:g}s for a rollback"
        await self._send()
        await self._watch(opts.window_seconds, allow_promote=True)
        self.hold_old = False
        old = [ref.id for ref in self.obs.old_ready if ref.id not in self.released]
        self.released.extend(old)
        self.phase = "blue-green: old set released"
        await self._send(release=old)

    async def _canary(self) -> None:
        inp, opts = self.inp, self.inp.options
        started_with = max(1, len(self.obs.old_ready))
        for percent in canary_steps(opts.steps or list(DEFAULT_CANARY_STEPS)):
            if percent >= 100:
                break
            self.new_counts = {inp.target: instances_for_share(started_with, percent)}
            self.phase = f"canary {percent}%: starting"
            await self._send()
            await self._await_new_ready()
            self.split = blend(inp.base_split, inp.target, percent)
            waits = "until promoted" if opts.manual else f"{opts.pause_seconds:g}s"
            self.phase = f"canary {percent}%: watching {waits}"
            await self._send()
            await self._watch(None if opts.manual else opts.pause_seconds, allow_promote=True)
        self.split = blend(inp.base_split, inp.target, 100)
        old = [ref.id for ref in self.obs.old_ready if ref.id not in self.released]
        self.released.extend(old)
        self.phase = "canary 100%: promoted"
        await self._send(release=old)

    # ---------------------------------------------------------------- waiting
    def _new_share(self) -> float:
        new = len(self.obs.new_ready)
        old = len([ref for ref in self.obs.old_ready if ref.id not in self.released])
        return 100.0 * new / max(1, new + old)

    def _ready_enough(self) -> bool:
        ready: dict[int, int] = {}
        for ref in self.obs.new_ready:
            ready[ref.revision] = ready.get(ref.revision, 0) + 1
        return all(ready.get(revision, 0) >= count for revision, count in self.new_counts.items())

    async def _await_new_ready(self) -> None:
        seconds = self.inp.startup_timeout_seconds + READY_MARGIN_SECONDS
        deadline = self._now() + seconds
        while True:
            self._check(allow_promote=False)
            if self._ready_enough():
                return
            if self._now() >= deadline:
                raise _RollBack(f"new instances were not ready within {seconds:g}s")
            await self._wait_until(self._interrupted, deadline - self._now())

    async def _watch(self, seconds: float | None, allow_promote: bool) -> None:
        """Serve for `seconds` (None: until promoted) while the new instances' errors stay below the
        threshold; a failure, a rollback or too many errors roll back."""
        start_requests, start_errors = self.obs.new_requests, self.obs.new_errors
        end = None if seconds is None else self._now() + seconds
        while True:
            if self._check(allow_promote=allow_promote):
                return  # promoted
            problem = health_problem(max(0, self.obs.new_requests - start_requests),
                                     max(0, self.obs.new_errors - start_errors), self.inp.options.error_rate)
            if problem:
                raise _RollBack(f"new instances unhealthy: {problem}")
            if end is not None and self._now() >= end:
                return
            await self._wait_until(self._interrupted, None if end is None else max(0.0, end - self._now()))

    def _interrupted(self) -> bool:
        return self._changed

    def _check(self, allow_promote: bool) -> bool:
        """Act on what arrived: a rollback or abort raises, a failed new instance rolls back, a
        promote answers True (when it may end the current wait). Clears the change flag."""
        self._changed = False
        while self.commands:
            cmd = self.commands.pop(0)
            if cmd.kind == COMMAND_ROLLBACK:
                raise _RollBack(f"rolled back by request{': ' + cmd.reason if cmd.reason else ''}")
            if cmd.kind == COMMAND_ABORT:
                raise _Abort(cmd.reason or "aborted")
            if cmd.kind == COMMAND_PROMOTE:
                self._promote_pending = True  # kept for the next wait a promote may end
        if self.obs is not None:
            if not self.obs.serving:
                raise _Abort("the endpoint stopped serving")
            if self.obs.new_failures:
                raise _RollBack(self.obs.new_failures[0])
        if allow_promote and self._promote_pending:
            self._promote_pending = False
            return True
        return False

    async def _wait_until(self, condition, seconds: float | None) -> bool:
        try:
            await workflow.wait_condition(condition, timeout=None if seconds is None else timedelta(seconds=seconds))
            return True
        except TimeoutError:
            return False

    # ---------------------------------------------------------------- telling the endpoint
    def _step_message(self, release: list[str] | None = None, done: bool = False) -> RolloutStep:
        return RolloutStep(rollout=self.inp.rollout, seq=self.seq, split=dict(self.split),
                           new_counts=dict(self.new_counts), release=list(release or []), hold_old=self.hold_old,
                           phase=self.phase, done=done, outcome=self.outcome, reason=self.reason)

    async def _send(self, release: list[str] | None = None, done: bool = False) -> None:
        self.seq += 1
        step = self._step_message(release, done)
        try:
            await workflow.get_external_workflow_handle(self.inp.parent_workflow_id).signal(SIGNAL_ROLLOUT_STEP, step)
        except Exception as err:  # the endpoint's workflow is gone (terminated): nothing left to update
            raise _Abort(f"the endpoint's workflow is gone: {err}") from None

    async def _finish(self, outcome: str, reason: str) -> str:
        self.outcome, self.reason = outcome, reason
        if outcome != SUCCEEDED:
            self.split = dict(self.inp.base_split)
            self.new_counts = {}
            self.hold_old = False
            self.phase = f"rolled back: {reason}" if outcome == ROLLED_BACK else f"aborted: {reason}"
        try:
            await self._send(done=True)
        except _Abort:
            pass
        return outcome

    def _now(self) -> float:
        return workflow.now().timestamp()
