"""Unit tests for the GPU pool's pure functions: free_gpus, queue_positions, grantable."""
from __future__ import annotations

from workflows.activity_types import GpuRequest
from workflows.gpu_pool import PoolState, free_gpus, grantable, queue_positions


def req(iid: str, gpu_type: str = "A100", count: int = 1) -> GpuRequest:
    return GpuRequest(pool="host", requester_workflow_id=f"wf-{iid}", endpoint=f"ep-{iid}", instance_id=iid,
                      gpu_type=gpu_type, count=count)


def pool(inventory: dict, grants: dict | None = None, queue: list | None = None) -> PoolState:
    return PoolState(pool="host", inventory=inventory, grants=dict(grants or {}), queue=list(queue or []))


def granted(state: PoolState) -> list[tuple[str, list[int]]]:
    return [(r.instance_id, gpus) for r, gpus in grantable(state)]


def test_free_gpus_excludes_granted_indices_per_type():
    state = pool({"A100": [0, 1, 2], "T4": [3]}, grants={"x": [1], "y": [3]})
    assert free_gpus(state) == {"A100": [0, 2], "T4": []}


def test_grants_in_fifo_order_with_lowest_free_indices():
    state = pool({"A100": [0, 1, 2]}, grants={"x": [0]}, queue=[req("a"), req("b"), req("c")])
    assert granted(state) == [("a", [1]), ("b", [2])]
    # grantable only answers; the workflow applies the grants.
    assert [r.instance_id for r in state.queue] == ["a", "b", "c"]
    assert state.grants == {"x": [0]}


def test_large_request_is_not_overtaken_by_later_smaller_one_of_same_type():
    state = pool({"A100": [0, 1, 2]}, grants={"x": [0, 1]}, queue=[req("big", count=2), req("small", count=1)])
    # One A100 is free: enough for "small", but "big" came first and must not starve.
    assert granted(state) == []
    state.grants.clear()
    assert granted(state) == [("big", [0, 1]), ("small", [2])]


def test_blocked_type_does_not_block_other_types():
    state = pool({"A100": [0], "T4": [1, 2]}, grants={"x": [0]},
                 queue=[req("a100-wait", "A100"), req("t4-first", "T4"), req("a100-later", "A100"),
                        req("t4-second", "T4")])
    assert granted(state) == [("t4-first", [1]), ("t4-second", [2])]


def test_request_for_unknown_type_or_too_many_waits():
    state = pool({"T4": [0, 1]}, queue=[req("h100", "H100"), req("greedy", "T4", count=3), req("t4", "T4")])
    assert granted(state) == []


def test_queue_positions_are_per_type_and_one_based():
    queue = [req("a1", "A100"), req("t1", "T4"), req("a2", "A100", count=2), req("t2", "T4"), req("a3", "A100")]
    assert queue_positions(queue) == {"a1": 1, "t1": 1, "a2": 2, "t2": 2, "a3": 3}
    assert queue_positions([]) == {}


def test_positions_move_up_after_head_is_granted():
    state = pool({"A100": [0]}, queue=[req("a"), req("b"), req("c")])
    [(head, gpus)] = grantable(state)
    state.queue.remove(head)
    state.grants[head.instance_id] = gpus
    assert queue_positions(state.queue) == {"b": 1, "c": 2}
    assert granted(state) == []
