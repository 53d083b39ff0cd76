"""GpuPoolWorkflow: one durable FIFO of GPU requests per host pool.

Requests arrive as `request` signals (sent with signal-with-start by an activity, since a
workflow cannot signal-with-start another one); grants go back to the requesting instance
workflow as a `gpus_granted` signal; `release` returns GPUs, which go to the head of the queue.
Per GPU type the queue is strict FIFO: a small request never overtakes an earlier waiting one of
the same type, so a large request cannot starve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.activity_types import (
        GpuGrant,
        GpuInventory,
        GpuInventoryInput,
        GpuRelease,
        GpuRequest,
        QueuePosition,
        QueuePositionsInput,
    )

SIGNAL_REQUEST = "request"
SIGNAL_RELEASE = "release"
SIGNAL_GRANTED = "gpus_granted"  # sent to the requesting instance workflow
QUERY_QUEUE = "queue"


@dataclass
class PoolState:
    pool: str
    inventory: dict[str, list[int]] = field(default_factory=dict)
    # instance id -> granted indices
    grants: dict[str, list[int]] = field(default_factory=dict)
    grant_types: dict[str, str] = field(default_factory=dict)
    queue: list[GpuRequest] = field(default_factory=list)
    # positions last written to the database, to write only changes
    published: dict[str, int] = field(default_factory=dict)


@dataclass
class PoolInput:
    pool: str
    state: PoolState | None = None


@dataclass
class QueueEntry:
    endpoint: str
    instance_id: str
    gpu_type: str
    count: int
    position: int


@dataclass
class PoolView:
    pool: str
    inventory: dict[str, list[int]]
    free: dict[str, list[int]]
    grants: dict[str, list[int]]
    queue: list[QueueEntry]


def free_gpus(state: PoolState) -> dict[str, list[int]]:
    used = {i for indices in state.grants.values() for i in indices}
    return {t: [i for i in idx if i not in used] for t, idx in state.inventory.items()}


def queue_positions(queue: list[GpuRequest]) -> dict[str, int]:
    """1-based position of each waiting request among requests of the same GPU type."""
    seen: dict[str, int] = {}
    positions = {}
    for req in queue:
        seen[req.gpu_type] = seen.get(req.gpu_type, 0) + 1
        positions[req.instance_id] = seen[req.gpu_type]
    return positions


def grantable(state: PoolState) -> list[tuple[GpuRequest, list[int]]]:
    """Requests that can be granted now, in FIFO order per type; the state is not changed."""
    free = free_gpus(state)
    blocked: set[str] = set()
    out = []
    for req in state.queue:
        if req.gpu_type in blocked:
            continue
        available = free.get(req.gpu_type, [])
        if len(available) >= req.count:
            out.append((req, available[: req.count]))
            free[req.gpu_type] = available[req.count :]
        else:
            blocked.add(req.gpu_type)
    return out


@workflow.defn(name="GpuPoolWorkflow")
class GpuPoolWorkflow:
    @workflow.init
    def __init__(self, inp: PoolInput) -> None:
        # Built here, not in run(), so that the signal of a signal-with-start finds it.
        self.state = inp.state if inp.state is not None else PoolState(pool=inp.pool)
        self._dirty = False

    @workflow.run
    async def run(self, inp: PoolInput) -> None:
        inventory: GpuInventory = await workflow.execute_activity(
            "gpu_inventory",
            GpuInventoryInput(pool=inp.pool),
            result_type=GpuInventory,
            start_to_close_timeout=timedelta(seconds=30),
        )
        self.state.inventory = inventory.gpus
        self._dirty = True
        while True:
            await workflow.wait_condition(lambda: self._dirty)
            self._dirty = False
            for req, gpus in grantable(self.state):
                self.state.queue.remove(req)
                self.state.grants[req.instance_id] = gpus
                self.state.grant_types[req.instance_id] = req.gpu_type
                await workflow.get_external_workflow_handle(req.requester_workflow_id).signal(
                    SIGNAL_GRANTED, GpuGrant(instance_id=req.instance_id, gpus=gpus)
                )
            await self._publish_positions()
            if workflow.info().is_continue_as_new_suggested() or (
                workflow.info().get_current_history_length() > 5000
            ):
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not self._dirty:
                    workflow.continue_as_new(PoolInput(pool=self.state.pool, state=self.state))

    async def _publish_positions(self) -> None:
        positions = queue_positions(self.state.queue)
        changes = []
        endpoints = {r.instance_id: r.endpoint for r in self.state.queue}
        for iid, pos in positions.items():
            if self.state.published.get(iid) != pos:
                changes.append(QueuePosition(endpoint=endpoints[iid], instance_id=iid, position=pos))
        for iid in list(self.state.published):
            if iid not in positions:
                changes.append(QueuePosition(endpoint="", instance_id=iid, position=None))
        self.state.published = positions
        if changes:
            await workflow.execute_activity(
                "record_queue_positions",
                QueuePositionsInput(positions=changes),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )

    @workflow.signal(name=SIGNAL_REQUEST)
    def request(self, req: GpuRequest) -> None:
        state = self.state
        if any(q.instance_id == req.instance_id for q in state.queue):
            return  # a retried request activity must not queue twice
        if req.instance_id in state.grants:
            # The requester asks again: its grant signal may have been lost. Grant the same
            # GPUs again rather than queueing it behind others.
            state.grants.pop(req.instance_id)
            state.queue.insert(0, req)
        else:
            state.queue.append(req)
        self._dirty = True

    @workflow.signal(name=SIGNAL_RELEASE)
    def release(self, rel: GpuRelease) -> None:
        state = self.state
        state.grants.pop(rel.instance_id, None)
        state.grant_types.pop(rel.instance_id, None)
        state.queue = [q for q in state.queue if q.instance_id != rel.instance_id]
        self._dirty = True

    @workflow.query(name=QUERY_QUEUE)
    def queue(self) -> PoolView:
        state = self.state
        positions = queue_positions(state.queue)
        return PoolView(
            pool=state.pool,
            inventory=state.inventory,
            free=free_gpus(state),
            grants=state.grants,
            queue=[
                QueueEntry(q.endpoint, q.instance_id, q.gpu_type, q.count, positions[q.instance_id])
                for q in state.queue
            ],
        )
