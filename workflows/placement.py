"""Placement in a pool of hosts, as pure functions over the pool's state (docs/architecture.md
"Hosts and pools"). The pool's workflow (workflows/pool.py) keeps a `PoolState`, feeds it
registrations, requests and releases, and asks these functions where an instance goes.

- A host is a worker with its GPUs (indices per type), CPU cores, memory and disk. What it can
  take is its capacity times the overcommit it declares (CPU is time-shared; memory and GPUs are
  not); what it has free is that minus what the pool granted on it.
- An instance goes to one host that has all its GPUs (one type, all on that host), CPU, memory
  and disk free, that is up (not draining, not down) and, for a fixed-port command on the
  process backend, can give it a network namespace.
- Requests wait in FIFO order per class (a GPU type, or "cpu" for CPU-only instances): a request
  never overtakes an earlier one of its class, so a large request cannot starve; the first
  resources freed on any host of the pool go to the head of the queue.
- Policy per pool: `binpack` (the default) puts an instance on the host that has the least room
  left that still fits it, which keeps whole hosts free for large multi-GPU requests (the costly
  failure in a GPU pool is a request that could run but cannot be placed because free GPUs are
  scattered) and lets idle hosts be powered down; `spread` puts it where the most room is left,
  which spreads load and an endpoint's instances over hosts. Ties go to the host running fewer
  instances of the same endpoint, then to the name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

UP, DRAINING, DOWN = "up", "draining", "down"
BINPACK, SPREAD = "binpack", "spread"
POLICIES = (BINPACK, SPREAD)
CPU_CLASS = "cpu"


@dataclass
class HostInfo:
    """What a worker tells its pool about its host (at start, and when it changes)."""

    name: str
    pool: str
    task_queue: str
    address: str = ""
    gpus: dict[str, list[int]] = field(default_factory=dict)  # type -> device indices
    cpu_cores: float = 0.0
    memory_gb: float = 0.0
    disk_gb: float = 0.0
    # How much may be granted per unit of capacity: CPU is time-shared, memory and disk are not.
    cpu_overcommit: float = 1.0
    memory_overcommit: float = 1.0
    disk_overcommit: float = 1.0
    netns: str = ""  # "net", "user+net" or "": whether fixed-port commands can run here
    backend: str = "process"
    started_at: float = 0.0


@dataclass
class HostState:
    info: HostInfo
    state: str = UP
    reason: str = ""


@dataclass
class PlacementRequest:
    requester_workflow_id: str
    endpoint: str
    instance_id: str
    gpu_type: str = ""
    gpu_count: int = 0
    cpu_cores: float = 0.0
    memory_gb: float = 0.0
    disk_gb: float = 0.0
    needs_netns: bool = False
    at: float = 0.0
    # The endpoint's project: its GPU quota bounds what its instances hold at once.
    project: str = ""


@dataclass
class Placement:
    """A grant: where the instance runs, and what it holds there until released."""

    instance_id: str
    endpoint: str
    host: str
    task_queue: str
    address: str = ""
    gpu_type: str = ""
    gpus: list[int] = field(default_factory=list)
    cpu_cores: float = 0.0
    memory_gb: float = 0.0
    disk_gb: float = 0.0
    requester_workflow_id: str = ""
    project: str = ""


@dataclass
class ProjectGpuQuota:
    """A project's GPU quota as its pool applies it: at most `limit` GPUs held at once, of which
    `held_elsewhere` are held in other pools now (README.md "Accounts and projects")."""

    limit: int
    held_elsewhere: int = 0


@dataclass
class PoolState:
    pool: str
    policy: str = BINPACK
    hosts: dict[str, HostState] = field(default_factory=dict)
    grants: dict[str, Placement] = field(default_factory=dict)  # instance id -> placement
    queue: list[PlacementRequest] = field(default_factory=list)
    # Queue positions last written to the database, to write only changes.
    published: dict[str, int] = field(default_factory=dict)


@dataclass
class Free:
    gpus: dict[str, list[int]]
    cpu_cores: float
    memory_gb: float
    disk_gb: float


def request_class(req: PlacementRequest) -> str:
    return req.gpu_type if req.gpu_count > 0 else CPU_CLASS


def free_on(state: PoolState, host: HostState, held: list | None = None) -> Free:
    """What the host has free: its capacity times its overcommit, minus the pool's grants there
    (`held`: those grants, when the caller has them indexed already)."""
    info = host.info
    if held is None:
        held = [g for g in state.grants.values() if g.host == info.name]
    used_gpus = {(g.gpu_type, i) for g in held for i in g.gpus}
    return Free(
        gpus={t: [i for i in idx if (t, i) not in used_gpus] for t, idx in info.gpus.items()},
        cpu_cores=info.cpu_cores * info.cpu_overcommit - sum(g.cpu_cores for g in held),
        memory_gb=info.memory_gb * info.memory_overcommit - sum(g.memory_gb for g in held),
        disk_gb=info.disk_gb * info.disk_overcommit - sum(g.disk_gb for g in held),
    )


def _indexed(state: PoolState) -> tuple[dict[str, Free], dict[tuple[str, str], int]]:
    """Free resources per host and grants per (host, endpoint), in one pass over the grants, so
    a decision over Q requests and H hosts costs O(grants + Q x H), not O(Q x H x grants)."""
    held: dict[str, list] = {name: [] for name in state.hosts}
    per_endpoint: dict[tuple[str, str], int] = {}
    for grant in state.grants.values():
        held.setdefault(grant.host, []).append(grant)
        key = (grant.host, grant.endpoint)
        per_endpoint[key] = per_endpoint.get(key, 0) + 1
    return {name: free_on(state, host, held[name]) for name, host in state.hosts.items()}, per_endpoint


def gpu_type_on(info: HostInfo, gpu_type: str) -> str | None:
    """The host's own spelling of a GPU type asked for in any case."""
    wanted = gpu_type.strip().upper()
    return next((t for t in info.gpus if t.upper() == wanted), None)


def _eligible(host: HostState, req: PlacementRequest) -> bool:
    return not (req.needs_netns and host.info.backend == "process" and not host.info.netns)


def _fits(free: Free, info: HostInfo, req: PlacementRequest) -> list[int] | None:
    """The GPU indices the request would get on this host, or None when it does not fit now."""
    gpus: list[int] = []
    if req.gpu_count > 0:
        kind = gpu_type_on(info, req.gpu_type)
        available = free.gpus.get(kind, []) if kind else []
        if len(available) < req.gpu_count:
            return None
        gpus = available[: req.gpu_count]
    epsilon = 1e-9
    if req.cpu_cores > free.cpu_cores + epsilon or req.memory_gb > free.memory_gb + epsilon \
            or req.disk_gb > free.disk_gb + epsilon:
        return None
    return gpus


def _room_left(free: Free, req: PlacementRequest, info: HostInfo) -> tuple:
    """What is left on a host after placing the request, most scarce resource first."""
    kind = gpu_type_on(info, req.gpu_type) if req.gpu_count > 0 else None
    gpus_left = len(free.gpus.get(kind, [])) - req.gpu_count if kind else sum(len(v) for v in free.gpus.values())
    return (gpus_left, free.memory_gb - req.memory_gb, free.cpu_cores - req.cpu_cores)


def choose_host(state: PoolState, req: PlacementRequest, free: dict[str, Free] | None = None,
                per_endpoint: dict[tuple[str, str], int] | None = None) -> Placement | None:
    """Where the request goes now under the pool's policy, or None (it waits)."""
    if free is None or per_endpoint is None:
        free, per_endpoint = _indexed(state)
    options = []
    for name, host in state.hosts.items():
        if host.state != UP or not _eligible(host, req):
            continue
        gpus = _fits(free[name], host.info, req)
        if gpus is None:
            continue
        same_endpoint = per_endpoint.get((name, req.endpoint), 0)
        room = _room_left(free[name], req, host.info)
        rank = room if state.policy == BINPACK else tuple(-r for r in room)
        options.append((rank, same_endpoint, name, gpus))
    if not options:
        return None
    _, _, name, gpus = min(options)
    info = state.hosts[name].info
    kind = gpu_type_on(info, req.gpu_type) if req.gpu_count > 0 else ""
    return Placement(req.instance_id, req.endpoint, name, info.task_queue, info.address, kind or "", gpus,
                     req.cpu_cores, req.memory_gb, req.disk_gb, req.requester_workflow_id, req.project)


def project_gpus(state: PoolState, project: str) -> int:
    """GPUs the project's instances hold in this pool."""
    return sum(len(g.gpus) for g in state.grants.values() if g.project == project)


def grantable(state: PoolState, quotas: dict[str, ProjectGpuQuota] | None = None) -> list[Placement]:
    """Requests that can be placed now, in FIFO order per class; the state is not changed. A
    request that cannot be placed blocks the later ones of its class (no overtaking). A GPU
    request past its project's quota waits without blocking other projects' requests, but blocks
    its own project's later ones."""
    quotas = quotas or {}
    held = {project: project_gpus(state, project) + quota.held_elsewhere for project, quota in quotas.items()}
    free, per_endpoint = _indexed(state)
    blocked: set[str] = set()
    over_quota: set[str] = set()
    out = []
    for req in state.queue:
        kind = request_class(req)
        if kind in blocked:
            continue
        quota = quotas.get(req.project) if req.gpu_count > 0 else None
        if quota is not None and (req.project in over_quota or held[req.project] + req.gpu_count > quota.limit):
            over_quota.add(req.project)
            continue
        placement = choose_host(state, req, free, per_endpoint)
        if placement is None:
            blocked.add(kind)
            continue
        if quota is not None:
            held[req.project] += len(placement.gpus)
        out.append(placement)
        room = free[placement.host]
        if placement.gpus:
            room.gpus[placement.gpu_type] = [i for i in room.gpus[placement.gpu_type] if i not in placement.gpus]
        room.cpu_cores -= placement.cpu_cores
        room.memory_gb -= placement.memory_gb
        room.disk_gb -= placement.disk_gb
    return out


def gpu_quota_waits(state: PoolState, quotas: dict[str, ProjectGpuQuota]) -> dict[str, str]:
    """Why each waiting GPU request past its project's quota waits, by instance id (the queue
    says so: the instance's row and the pool's `queue` query)."""
    held = {project: project_gpus(state, project) + quota.held_elsewhere for project, quota in quotas.items()}
    waits: dict[str, str] = {}
    over_quota: set[str] = set()
    for req in state.queue:
        quota = quotas.get(req.project) if req.gpu_count > 0 else None
        if quota is None:
            continue
        if req.project in over_quota or held[req.project] + req.gpu_count > quota.limit:
            over_quota.add(req.project)
            waits[req.instance_id] = (f"project {req.project} holds {held[req.project]} of its {quota.limit} GPUs "
                                      f"(its GPU quota) and this instance needs {req.gpu_count}: it waits until the "
                                      "project's other instances release some")
    return waits


def queue_positions(queue: list[PlacementRequest]) -> dict[str, int]:
    """1-based position of each waiting request among requests of its class."""
    seen: dict[str, int] = {}
    positions = {}
    for req in queue:
        kind = request_class(req)
        seen[kind] = seen.get(kind, 0) + 1
        positions[req.instance_id] = seen[kind]
    return positions


def never_fits(hosts: list[HostInfo], req: PlacementRequest, pool: str) -> str | None:
    """Why no host of the pool could ever take the request (empty, it would fit), in words that
    say which pool has what. Down hosts count: they may come back."""
    if not hosts:
        return f"pool {pool!r} has no hosts yet: start a worker with --pool {pool} (or name another pool)"
    for info in hosts:
        empty = Free({t: list(i) for t, i in info.gpus.items()}, info.cpu_cores * info.cpu_overcommit,
                     info.memory_gb * info.memory_overcommit, info.disk_gb * info.disk_overcommit)
        if _eligible(HostState(info), req) and _fits(empty, info, req) is not None:
            return None
    return f"no host of pool {pool!r} can ever hold this instance ({describe_request(req)}); it has: " + \
        "; ".join(describe_host(info) for info in hosts)


def describe_request(req: PlacementRequest) -> str:
    parts = [f"{req.gpu_count} x {req.gpu_type or 'any'} GPU"] if req.gpu_count else []
    parts += [f"{req.cpu_cores:g} CPU", f"{req.memory_gb:g} GB memory", f"{req.disk_gb:g} GB disk"]
    if req.needs_netns:
        parts.append("a network namespace for its fixed port")
    return ", ".join(parts)


def describe_host(info: HostInfo) -> str:
    gpus = ", ".join(f"{t} x {len(i)}" for t, i in info.gpus.items() if i) or "no GPUs"
    return (f"{info.name}: {gpus}, {info.cpu_cores * info.cpu_overcommit:g} CPU, "
            f"{info.memory_gb * info.memory_overcommit:g} GB memory, {info.disk_gb * info.disk_overcommit:g} GB disk"
            + ("" if info.netns or info.backend != "process" else ", no network namespaces"))
