"""Placement in a pool (workflows/placement.py): pure functions, tested directly."""
from __future__ import annotations

import pytest

from workflows import placement as pl
from workflows.placement import HostInfo, HostState, Placement, PlacementRequest, PoolState


def host(name, gpus=None, cpu=8.0, memory=64.0, disk=500.0, netns="net", state=pl.UP, **kw) -> HostState:
    info = HostInfo(name=name, pool="p", task_queue=f"q-{name}", address=f"10.0.0.{len(name)}",
                    gpus=gpus or {}, cpu_cores=cpu, memory_gb=memory, disk_gb=disk, netns=netns, **kw)
    return HostState(info, state)


def pool(*hosts, policy=pl.BINPACK, grants=(), queue=()) -> PoolState:
    state = PoolState(pool="p", policy=policy, hosts={h.info.name: h for h in hosts})
    for g in grants:
        state.grants[g.instance_id] = g
    state.queue = list(queue)
    return state


def req(iid, gpu_type="", gpu_count=0, cpu=1.0, memory=1.0, disk=10.0, endpoint="ep", **kw) -> PlacementRequest:
    return PlacementRequest(f"wf-{iid}", endpoint, iid, gpu_type, gpu_count, cpu, memory, disk, **kw)


def grant(iid, host_name, gpu_type="", gpus=(), cpu=1.0, memory=1.0, disk=10.0, endpoint="ep") -> Placement:
    return Placement(iid, endpoint, host_name, f"q-{host_name}", "", gpu_type, list(gpus), cpu, memory, disk)


def test_all_of_an_instances_gpus_come_from_one_host():
    state = pool(host("a", {"T4": [0, 1]}), host("b", {"T4": [0, 1]}), grants=[grant("x", "a", "T4", [0])])
    # a has 1 free, b has 2: a 2-GPU request can only go to b, though the pool has 3 free.
    placed = pl.choose_host(state, req("i", "T4", 2))
    assert (placed.host, placed.gpus, placed.task_queue) == ("b", [0, 1], "q-b")


@pytest.mark.parametrize("policy, expected", [(pl.BINPACK, "a"), (pl.SPREAD, "b")])
def test_binpack_fills_the_fullest_host_spread_the_emptiest(policy, expected):
    state = pool(host("a", {"T4": [0, 1, 2, 3]}), host("b", {"T4": [0, 1, 2, 3]}), policy=policy,
                 grants=[grant("x", "a", "T4", [0, 1])])
    assert pl.choose_host(state, req("i", "T4", 1)).host == expected


def test_gpu_type_matches_in_any_case_and_is_granted_in_the_hosts_spelling():
    placed = pl.choose_host(pool(host("a", {"A100": [0]})), req("i", "a100", 1))
    assert (placed.gpu_type, placed.gpus) == ("A100", [0])


def test_cpu_memory_and_disk_are_held_with_the_declared_overcommit():
    state = pool(host("a", cpu=2.0, memory=4.0, cpu_overcommit=4.0))
    assert pl.choose_host(state, req("i", cpu=8.0, memory=1.0)).host == "a"  # 2 cores x 4
    assert pl.choose_host(state, req("i", cpu=9.0, memory=1.0)) is None
    state.grants["x"] = grant("x", "a", memory=3.5)
    assert pl.choose_host(state, req("i", memory=1.0)) is None  # memory is not overcommitted
    assert pl.choose_host(state, req("i", memory=0.5)).host == "a"


def test_draining_and_down_hosts_take_no_new_instance():
    state = pool(host("a", {"T4": [0]}, state=pl.DRAINING), host("b", {"T4": [0]}, state=pl.DOWN),
                 host("c", {"T4": [0]}))
    assert pl.choose_host(state, req("i", "T4", 1)).host == "c"
    state.hosts["c"].state = pl.DRAINING
    assert pl.choose_host(state, req("i", "T4", 1)) is None


def test_a_fixed_port_command_needs_a_host_with_network_namespaces():
    state = pool(host("plain", netns=""), host("nsok", netns="user+net"))
    assert pl.choose_host(state, req("i", needs_netns=True)).host == "nsok"
    assert pl.choose_host(pool(host("plain", netns="")), req("i", needs_netns=True)) is None
    # Containers get their namespace from the engine.
    docker_host = host("dk", netns="", backend="docker")
    assert pl.choose_host(pool(docker_host), req("i", needs_netns=True)).host == "dk"


def test_ties_go_to_the_host_with_fewer_instances_of_the_same_endpoint():
    state = pool(host("a"), host("b"), policy=pl.SPREAD, grants=[grant("x", "a", endpoint="ep", cpu=0, memory=0,
                                                                       disk=0)])
    assert pl.choose_host(state, req("i", endpoint="ep", cpu=0, memory=0, disk=0)).host == "b"


def test_queue_is_fifo_per_class_and_a_waiting_request_blocks_later_ones_of_its_class():
    state = pool(host("a", {"T4": [0, 1], "A100": [0]}),
                 queue=[req("big", "T4", 3), req("small", "T4", 1), req("other", "A100", 1), req("cpu")])
    granted = [p.instance_id for p in pl.grantable(state)]
    # big cannot fit (3 > 2): small waits behind it; other classes go on.
    assert granted == ["other", "cpu"]
    assert pl.queue_positions(state.queue) == {"big": 1, "small": 2, "other": 1, "cpu": 1}


def test_the_first_gpu_freed_on_any_host_goes_to_the_head_of_the_queue():
    state = pool(host("a", {"T4": [0]}), host("b", {"T4": [0]}),
                 grants=[grant("x", "a", "T4", [0]), grant("y", "b", "T4", [0])],
                 queue=[req("first", "T4", 1), req("second", "T4", 1)])
    assert pl.grantable(state) == []
    del state.grants["y"]  # released on b
    [placed] = pl.grantable(state)
    assert (placed.instance_id, placed.host) == ("first", "b")


def test_grantable_does_not_hand_out_the_same_gpus_twice():
    state = pool(host("a", {"T4": [0, 1]}), queue=[req("one", "T4", 1), req("two", "T4", 1), req("three", "T4", 1)])
    placed = pl.grantable(state)
    assert [(p.instance_id, p.gpus) for p in placed] == [("one", [0]), ("two", [1])]


def test_never_fits_says_which_pool_has_what():
    hosts = [host("a", {"T4": [0, 1]}).info, host("b", {"T4": [0, 1]}, state=pl.DOWN).info]
    assert pl.never_fits(hosts, req("i", "T4", 2), "p") is None
    message = pl.never_fits(hosts, req("i", "T4", 4), "p")
    assert message.startswith("no host of pool 'p' can ever hold this instance (4 x T4 GPU")
    assert "a: T4 x 2, 8 CPU, 64 GB memory, 500 GB disk" in message
    assert pl.never_fits(hosts, req("i", "A100", 1), "p").startswith("no host of pool 'p'")
    assert "has no hosts yet" in pl.never_fits([], req("i"), "p")
