"""PoolWorkflow (id `pool-<name>`): one resource pool's hosts, its placements and its queue.

Workers join with a `host_up` signal (signal-with-start, so the pool exists from its first host
on) and heart-beat in the database; this workflow looks at the heartbeats every few seconds and
marks a silent host `down`, telling the instances placed there that they are lost, so their
endpoints replace them on other hosts. Instances ask for a place with `request`; the decision is
workflows/placement.py's (FIFO per class, the pool's policy); the answer goes back to the instance
workflow as a `placed` signal, and `release` returns what it held. Operators drain a host (no new
instances there; those running finish) with `drain_host` / `undrain_host`, and pick the policy
with `set_policy` — from the UI, the API or the Temporal CLI:

    temporal workflow signal --workflow-id pool-default --name drain_host --input '{"host": "gpu-1"}'
    temporal workflow query  --workflow-id pool-default --type queue
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows import placement as pl
    from workflows.activity_types import (
        HostStateRecord,
        HostsSeenInput,
        ProjectGpuQuotasInput,
        QueuePosition,
        QueuePositionsInput,
    )
    from workflows.placement import HostInfo, HostState, Placement, PlacementRequest, PoolState, ProjectGpuQuota

SIGNAL_HOST_UP = "host_up"
SIGNAL_REQUEST = "request"
SIGNAL_RELEASE = "release"
SIGNAL_DRAIN = "drain_host"
SIGNAL_UNDRAIN = "undrain_host"
SIGNAL_POLICY = "set_policy"
QUERY_QUEUE = "queue"
# workflow.patched id: GPU quotas per project (histories from before them read no quota).
PATCH_PROJECT_GPU_QUOTAS = "project-gpu-quotas"
# Sent to instance workflows.
SIGNAL_PLACED = "placed"
SIGNAL_HOST_LOST = "host_lost"
SIGNAL_UNPLACEABLE = "unplaceable"  # no host of the pool is up: its endpoint may use another pool

LOCAL = dict(start_to_close_timeout=timedelta(seconds=30),
             retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10)))


@dataclass
class PoolInput:
    pool: str
    # A host silent for this long is down; heartbeats are looked at every check_seconds.
    down_after_seconds: float = 15.0
    check_seconds: float = 2.0
    continue_as_new_events: int = 5000
    state: PoolState | None = None


@dataclass
class HostRef:
    host: str
    reason: str = ""


@dataclass
class PolicyRequest:
    policy: str


@dataclass
class ReleaseRequest:
    instance_id: str


@dataclass
class HostLost:
    instance_id: str
    host: str
    reason: str


@dataclass
class HostView:
    name: str
    state: str
    reason: str
    address: str
    gpus: dict[str, list[int]]
    free_gpus: dict[str, list[int]]
    cpu_cores: float
    free_cpu_cores: float
    memory_gb: float
    free_memory_gb: float
    disk_gb: float
    free_disk_gb: float
    instances: list[str]


@dataclass
class QueueEntry:
    endpoint: str
    instance_id: str
    kind: str  # the GPU type, or "cpu"
    gpu_count: int
    position: int
    # Why it waits beyond its turn, e.g. its project's GPU quota.
    reason: str = ""


@dataclass
class PoolView:
    pool: str
    policy: str
    hosts: list[HostView] = field(default_factory=list)
    queue: list[QueueEntry] = field(default_factory=list)


def pool_workflow_id(pool: str) -> str:
    return f"pool-{pool}"


@workflow.defn(name="PoolWorkflow")
class PoolWorkflow:
    @workflow.init
    def __init__(self, inp: PoolInput) -> None:
        # Built here, so that the signal of a signal-with-start finds it.
        self.inp = inp
        self.state = inp.state if inp.state is not None else PoolState(pool=inp.pool)
        self._dirty = True
        # Host states last written to the database, to write only changes.
        self._recorded: dict[str, tuple[str, str]] = {}
        # Grants asked for again (their answer may have been lost), to send once more.
        self._resend: list[Placement] = []
        # Waiting requests told that no host of the pool is up (told once each).
        self._told_unplaceable: set[str] = set()
        # Requests waiting for their project's GPU quota, and why; the reasons last written.
        self._quota_waits: dict[str, str] = {}
        self._published_reasons: dict[str, str] = {}

    @workflow.run
    async def run(self, inp: PoolInput) -> None:
        while True:
            watching = any(h.state != pl.DOWN for h in self.state.hosts.values())
            try:
                await workflow.wait_condition(lambda: self._dirty,
                                              timeout=timedelta(seconds=inp.check_seconds) if watching else None)
            except TimeoutError:
                pass
            self._dirty = False
            if watching:
                await self._mark_silent_hosts_down()
            await self._place_waiting()
            await self._tell_unplaceable()
            while self._resend:
                granted = self._resend.pop(0)
                await self._tell(granted.requester_workflow_id, SIGNAL_PLACED, granted)
            await self._publish()
            info = workflow.info()
            if info.is_continue_as_new_suggested() or info.get_current_history_length() > inp.continue_as_new_events:
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not self._dirty:
                    workflow.continue_as_new(PoolInput(inp.pool, inp.down_after_seconds, inp.check_seconds,
                                                       inp.continue_as_new_events, self.state))

    async def _mark_silent_hosts_down(self) -> None:
        names = [name for name, h in self.state.hosts.items() if h.state != pl.DOWN]
        seen: dict[str, float] = await workflow.execute_local_activity(
            "hosts_last_seen", HostsSeenInput(names), result_type=dict, **LOCAL)
        now = workflow.now().timestamp()
        for name in names:
            last = seen.get(name) or self.state.hosts[name].info.started_at
            if now - last > self.inp.down_after_seconds:
                await self._host_down(name, f"no heartbeat for {now - last:.0f} s "
                                            f"(down after {self.inp.down_after_seconds:g} s)")

    async def _host_down(self, name: str, reason: str) -> None:
        host = self.state.hosts[name]
        host.state, host.reason = pl.DOWN, reason
        lost = [g for g in self.state.grants.values() if g.host == name]
        for grant in lost:
            # Its resources went with the host: the grant goes, and its instance hears it is lost.
            del self.state.grants[grant.instance_id]
        await asyncio.gather(*[self._tell(g.requester_workflow_id, SIGNAL_HOST_LOST,
                                          HostLost(g.instance_id, name, f"host {name} is down ({reason})"))
                               for g in lost])

    async def _project_gpu_quotas(self) -> dict[str, ProjectGpuQuota]:
        """The GPU quotas of the projects with GPU requests waiting here, read fresh each round (a
        site admin may change one at any time), with what they hold in other pools."""
        projects = sorted({r.project for r in self.state.queue if r.project and r.gpu_count > 0})
        if not projects or not workflow.patched(PATCH_PROJECT_GPU_QUOTAS):
            return {}
        found: dict = await workflow.execute_local_activity(
            "project_gpu_quotas", ProjectGpuQuotasInput(self.state.pool, projects), result_type=dict, **LOCAL)
        return {name: ProjectGpuQuota(limit=int(limit), held_elsewhere=int(elsewhere))
                for name, (limit, elsewhere) in found.items() if limit is not None}

    async def _place_waiting(self) -> None:
        quotas = await self._project_gpu_quotas()
        placed = pl.grantable(self.state, quotas)
        self._quota_waits = pl.gpu_quota_waits(self.state, quotas) if quotas else {}
        if not placed:
            return
        granted = {p.instance_id for p in placed}
        self.state.queue = [r for r in self.state.queue if r.instance_id not in granted]
        for placement in placed:
            self.state.grants[placement.instance_id] = placement
        # All answers leave in one workflow task (one round trip, not one per placement).
        await asyncio.gather(*[self._tell(p.requester_workflow_id, SIGNAL_PLACED, p) for p in placed])

    async def _tell_unplaceable(self) -> None:
        """Requests that wait in a pool with no host up hear it once (a multi-pool endpoint then
        places them in its other pool); they keep their turn here in case a host comes back."""
        if any(h.state == pl.UP for h in self.state.hosts.values()):
            self._told_unplaceable.clear()
            return
        why = (f"no host of pool {self.state.pool} is up ("
               + (", ".join(f"{n}: {h.state}" for n, h in sorted(self.state.hosts.items())) or "none joined") + ")")
        for req in self.state.queue:
            if req.instance_id not in self._told_unplaceable:
                self._told_unplaceable.add(req.instance_id)
                await self._tell(req.requester_workflow_id, SIGNAL_UNPLACEABLE, HostLost(req.instance_id, "", why))

    async def _tell(self, workflow_id: str, signal: str, arg) -> None:
        try:
            await workflow.get_external_workflow_handle(workflow_id).signal(signal, arg)
        except Exception as err:  # it ended meanwhile; its release (or none) is on its way
            workflow.logger.warning("could not signal %s to %s: %s", signal, workflow_id, err)

    async def _publish(self) -> None:
        positions = pl.queue_positions(self.state.queue)
        waits = {iid: reason for iid, reason in self._quota_waits.items() if iid in positions}

        def reason_change(iid: str) -> str | None:  # None: unchanged, not written
            now = waits.get(iid, "")
            return now if now != self._published_reasons.get(iid, "") else None

        changes = [QueuePosition(endpoint=r.endpoint, instance_id=r.instance_id, position=positions[r.instance_id],
                                 reason=reason_change(r.instance_id))
                   for r in self.state.queue if self.state.published.get(r.instance_id) != positions[r.instance_id]
                   or reason_change(r.instance_id) is not None]
        changes += [QueuePosition(endpoint="", instance_id=iid, position=None)
                    for iid in self.state.published if iid not in positions]
        self.state.published = positions
        self._published_reasons = waits
        if changes:
            await workflow.execute_local_activity("record_queue_positions", QueuePositionsInput(changes), **LOCAL)
        records = [HostStateRecord(name, h.state, h.reason) for name, h in self.state.hosts.items()
                   if self._recorded.get(name) != (h.state, h.reason)]
        for record in records:
            await workflow.execute_local_activity("record_host_state", record, **LOCAL)
            self._recorded[record.host] = (record.state, record.reason)

    # ---------------------------------------------------------------- signals
    @workflow.signal(name=SIGNAL_HOST_UP)
    def host_up(self, info: HostInfo) -> None:
        known = self.state.hosts.get(info.name)
        if known is not None and known.state == pl.DOWN:
            # Back after being down: what was placed there was lost and replaced; its worker
            # stops what nobody wants any more (workers/reaper.py).
            known.state, known.reason = pl.UP, "back up"
        state = known.state if known is not None else pl.UP
        reason = known.reason if known is not None else "joined"
        self.state.hosts[info.name] = HostState(info, state, reason)
        self._dirty = True

    @workflow.signal(name=SIGNAL_REQUEST)
    def request(self, req: PlacementRequest) -> None:
        granted = self.state.grants.get(req.instance_id)
        if granted is not None:
            # Asked again (its answer may have been lost): the same place, at once.
            self._resend.append(granted)
        elif all(r.instance_id != req.instance_id for r in self.state.queue):
            self.state.queue.append(req)
        self._dirty = True

    @workflow.signal(name=SIGNAL_RELEASE)
    def release(self, rel: ReleaseRequest) -> None:
        self.state.grants.pop(rel.instance_id, None)
        self.state.queue = [r for r in self.state.queue if r.instance_id != rel.instance_id]
        self._dirty = True

    @workflow.signal(name=SIGNAL_DRAIN)
    def drain_host(self, ref: HostRef) -> None:
        host = self.state.hosts.get(ref.host)
        if host is not None and host.state == pl.UP:
            host.state, host.reason = pl.DRAINING, ref.reason or "drained by an operator"
            self._dirty = True

    @workflow.signal(name=SIGNAL_UNDRAIN)
    def undrain_host(self, ref: HostRef) -> None:
        host = self.state.hosts.get(ref.host)
        if host is not None and host.state == pl.DRAINING:
            host.state, host.reason = pl.UP, ref.reason or "undrained by an operator"
            self._dirty = True

    @workflow.signal(name=SIGNAL_POLICY)
    def set_policy(self, req: PolicyRequest) -> None:
        if req.policy in pl.POLICIES:
            self.state.policy = req.policy
            self._dirty = True

    # ---------------------------------------------------------------- query
    @workflow.query(name=QUERY_QUEUE)
    def queue(self) -> PoolView:
        positions = pl.queue_positions(self.state.queue)
        hosts = []
        for name, host in sorted(self.state.hosts.items()):
            free = pl.free_on(self.state, host)
            info = host.info
            hosts.append(HostView(
                name, host.state, host.reason, info.address, info.gpus, free.gpus,
                info.cpu_cores * info.cpu_overcommit, free.cpu_cores, info.memory_gb * info.memory_overcommit,
                free.memory_gb, info.disk_gb * info.disk_overcommit, free.disk_gb,
                sorted(g.instance_id for g in self.state.grants.values() if g.host == name)))
        queue = [QueueEntry(r.endpoint, r.instance_id, pl.request_class(r), r.gpu_count, positions[r.instance_id],
                            self._quota_waits.get(r.instance_id, "")) for r in self.state.queue]
        return PoolView(self.state.pool, self.state.policy, hosts, queue)
