"""Every activity of the worker: the only code that writes observed state and touches instances.

Activities are methods of one class that holds its clients (database, backend, Temporal client);
the worker builds the real ones, a test may pass others. Sync activities run in the worker's
thread pool; those that talk to Temporal are async.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import delete, select
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from common.config import Settings
from common.db import Database
from common.account_models import Project
from common.models import (
    I_FAILED,
    I_QUEUED,
    I_READY,
    I_STOPPED,
    INSTANCE_LIVE_STATES,
    TERMINATED,
    Endpoint,
    Event,
    Host,
    Instance,
    MetricPoint,
)
from common.routes import RUNTIME_HEALTH_PATH
from common.secrets import SecretsKeyError, box_for, reveal_env
from common.spec_fields import LIFECYCLE, read_by
from workers.backends.base import Backend, LaunchRefused, LaunchSpec
from workflows.activity_types import (
    EndpointStatusUpdate,
    EventRecord,
    GpuInventory,
    GpuInventoryInput,
    GpuRelease,
    GpuRequest,
    HostsSeenInput,
    HostStateRecord,
    InstanceRecord,
    LifecycleSpec,
    LivenessInput,
    LivenessResult,
    LoadSpecInput,
    ProjectGpuQuotasInput,
    PrepareRevisionInput,
    PrepareRevisionResult,
    PurgeInput,
    QueuePositionsInput,
    RevisionInfo,
    RevisionsRecord,
    StartInstanceInput,
    StartInstanceResult,
    StopInstanceInput,
    WarmWindowsInput,
    WarmWindowsResult,
)
from workflows.contracts import GPU_POOL_WORKFLOW, gpu_pool_workflow_id

log = logging.getLogger(__name__)
# A proxy reports a request that began after a quiet spell within its report tick (proxy/traffic.py);
# this covers that tick and the signal's way to the workflow.
URGENT_REPORT_ALLOWANCE_SECONDS = 0.5


@dataclass
class ProvisionInput:
    endpoint: str
    instance_id: str
    generation: int
    gpus: list[int] = field(default_factory=list)
    revision: int = 0


@dataclass
class ProvisionResult:
    host: str
    address: str
    port: int
    pid: int | None
    container_id: str
    workdir: str
    log_path: str
    revision: int = 0


def _ts(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


def _as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes even for timezone-aware columns.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def append_log(path: str, line: str) -> None:
    """Platform lines go into the instance log beside the instance's own output."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"[standby {stamp}] {line}\n")


class StandbyActivities:
    def __init__(self, settings: Settings, db: Database, backend: Backend, client: Client | None = None):
        self.settings = settings
        self.db = db
        self.backend = backend
        self.client = client

    def all(self) -> list:
        return [
            self.load_lifecycle_spec, self.record_endpoint_status, self.record_event, self.record_instance,
            self.record_queue_positions, self.gpu_inventory, self.request_gpus, self.release_gpus,
            self.purge_endpoint, self.hosts_last_seen, self.record_host_state, self.project_gpu_quotas,
            self.warm_windows_now, self.prepare_revision, self.record_revisions,
        ]

    def host_bound(self) -> list:
        """Activities that must run on the host that runs the instance."""
        return [self.start_instance, self.check_liveness, self.stop_instance]

    def _endpoint(self, session, name: str) -> Endpoint:
        endpoint = session.scalar(select(Endpoint).where(Endpoint.name == name))
        if endpoint is None:
            raise ApplicationError(f"endpoint {name} not found", type="EndpointMissing", non_retryable=True)
        return endpoint

    # ------------------------------------------------------------ spec and observed state
    @activity.defn
    def load_lifecycle_spec(self, inp: LoadSpecInput) -> LifecycleSpec:
        s = self.settings
        with self.db.session() as session:
            e = session.scalar(select(Endpoint).where(Endpoint.name == inp.name))
            if e is None:
                return LifecycleSpec(name=inp.name, exists=False)
            spec = {f.name: getattr(e, f.name) for f in read_by(LIFECYCLE)}
            # Routes endpoints are served by the built-in runtime, which answers /ping once loaded.
            if e.source_kind == "routes":
                spec["health_path"] = RUNTIME_HEALTH_PATH
            return LifecycleSpec(
                **spec,
                needs_netns=_needs_netns(e.source_kind, e.image, e.start_command),
                # Instances started before pools used the per-host GPU queue of the worker that
                # loaded the spec (workflows/gpu_pool.py); new ones are placed in spec["pools"].
                pool=s.host, host_task_queue=s.host_task_queue,
                purge_after_seconds=s.purge_after_seconds, stop_grace_seconds=s.stop_grace_seconds,
                drain_grace_seconds=s.proxy_refresh_seconds + URGENT_REPORT_ALLOWANCE_SECONDS,
                continue_as_new_events=s.continue_as_new_events,
                project=session.get(Project, e.project_id).name,
                revisions=[_revision_info(e.source_kind, r) for r in e.revisions],
                rollout_settle_seconds=s.rollout_settle_seconds, rollout_error_rate=s.rollout_error_rate,
                blue_green_window_seconds=s.blue_green_window_seconds,
                canary_pause_seconds=s.canary_pause_seconds,
            )

    @activity.defn
    def record_endpoint_status(self, upd: EndpointStatusUpdate) -> None:
        with self.db.session() as session:
            e = self._endpoint(session, upd.name)
            e.status = upd.status
            e.status_reason = upd.reason
            e.stopped_at = _ts(upd.stopped_at)
            e.purge_at = _ts(upd.purge_at)
            e.status_updated_at = datetime.now(timezone.utc)
            if upd.status != "queued":
                e.queue_position = None
            if upd.event_kind:
                session.add(Event(endpoint_id=e.id, kind=upd.event_kind, message=upd.event_message))

    @activity.defn
    def record_revisions(self, rec: RevisionsRecord) -> None:
        """The traffic split (every revision it does not name has no share) and revision states,
        written in one transaction: the proxy routes by the split from its next refresh."""
        from common.models import Revision

        with self.db.session() as session:
            e = self._endpoint(session, rec.endpoint)
            by_number = {r.number: r for r in session.scalars(select(Revision).where(Revision.endpoint_id == e.id))}
            if rec.traffic is not None:
                for number, revision in by_number.items():
                    revision.traffic = int(rec.traffic.get(number, 0))
            for change in rec.states:
                revision = by_number.get(change.number)
                if revision is not None:
                    revision.state, revision.state_reason = change.state, change.reason
                    if change.strategy is not None:
                        revision.strategy = change.strategy
            if rec.event_kind:
                session.add(Event(endpoint_id=e.id, kind=rec.event_kind, message=rec.event_message))

    @activity.defn
    def prepare_revision(self, inp: PrepareRevisionInput) -> PrepareRevisionResult:
        """Pin a revision's source once: its git ref resolved to a commit, its source directory
        copied (workers/revision_source.py). A source that cannot be pinned is an answer, not a
        retry: the update rolls back (or the new endpoint fails) saying why."""
        from workers.revision_source import pin_revision
        from workers.sources import SourceError

        try:
            with heartbeating():
                pin = pin_revision(self.settings, self.db, inp.endpoint, inp.revision,
                                   heartbeat=lambda detail: activity.heartbeat(detail))
        except SourceError as err:
            return PrepareRevisionResult(ok=False, reason=str(err))
        if pin.commit or pin.snapshot:
            what = f"commit {pin.commit}" if pin.commit else f"a copy of its source directory ({pin.snapshot})"
            self.record_event(EventRecord(inp.endpoint, "revision_pinned", f"revision {inp.revision} pinned to {what}"))
        return PrepareRevisionResult(ok=True, commit=pin.commit, snapshot=pin.snapshot)

    @activity.defn
    def record_event(self, rec: EventRecord) -> None:
        with self.db.session() as session:
            e = self._endpoint(session, rec.endpoint)
            session.add(Event(endpoint_id=e.id, kind=rec.kind, message=rec.message, instance_id=rec.instance_id))

    @activity.defn
    def record_instance(self, rec: InstanceRecord) -> None:
        with self.db.session() as session:
            e = self._endpoint(session, rec.endpoint)
            inst = session.get(Instance, rec.instance_id)
            if inst is None:
                inst = Instance(id=rec.instance_id, endpoint_id=e.id, status=rec.status)
                session.add(inst)
            inst.status = rec.status
            if rec.revision is None and not inst.revision:
                # Started by a workflow from before revisions: it runs the serving revision.
                inst.revision = _serving_revision(session, e)
            for name in ("generation", "revision", "reason", "host", "address", "port", "pid", "container_id",
                         "gpu_type", "gpus", "workdir", "log_path"):
                value = getattr(rec, name)
                if value is not None:
                    setattr(inst, name, value)
            for name in ("started_at", "ready_at", "stopped_at"):
                value = getattr(rec, name)
                if value is not None:
                    setattr(inst, name, _ts(value))
            if rec.ready_at is not None and inst.price_per_hour is None:
                # Billed from now on at today's price (common/cost.py): GPUs as granted.
                inst.price_per_hour = self.settings.price_list.per_hour(inst.gpu_type, len(inst.gpus or []))
            if rec.status != I_QUEUED:
                inst.queue_position = None
            if rec.status in (I_STOPPED, I_FAILED):
                inst.gpu_seconds = self._gpu_seconds(inst, rec.gpu_count)
            if rec.event_kind:
                session.add(Event(endpoint_id=e.id, instance_id=inst.id, kind=rec.event_kind,
                                  message=rec.event_message))
            log_path = inst.log_path
        if rec.status == I_FAILED and rec.reason:
            append_log(log_path, f"instance failed: {rec.reason}")
        elif rec.event_message and rec.status in (I_READY, I_STOPPED, "draining"):
            append_log(log_path, rec.event_message)

    @staticmethod
    def _gpu_seconds(inst: Instance, gpu_count: int) -> float:
        """Billed from ready to stopped: queued and starting time is never billed."""
        ready, stopped = _as_utc(inst.ready_at), _as_utc(inst.stopped_at)
        if not gpu_count or ready is None or stopped is None:
            return 0.0
        return round(gpu_count * max(0.0, (stopped - ready).total_seconds()), 3)

    # ------------------------------------------------------------ instances on this host
    @activity.defn
    def start_instance(self, inp: StartInstanceInput) -> StartInstanceResult:
        """Provision the instance, record it, and probe it until it is ready.

        Retried after a worker crash: the backend's own record of what the first attempt launched
        (written before the launch returned, so a crash cannot lose it) is read back, and a
        process or container that still runs is adopted, probe and all, instead of started twice.
        """
        from workers.health import expectation, wait_until_ready

        info = activity.info()
        launched = None
        adopted = self.backend.adopt(inp.instance_id) if info.attempt > 1 else None
        if adopted is not None:
            launched = {"host": adopted.host, "address": adopted.address, "port": adopted.port, "pid": adopted.pid,
                        "container_id": adopted.container_id, "workdir": adopted.workdir,
                        "log_path": adopted.log_path, "started_at": adopted.started_at or time.time()}
            append_log(adopted.log_path, f"worker restarted (start attempt {info.attempt}): adopting the running "
                                         f"instance at {adopted.address} (pid {adopted.pid})")
            self.record_event(EventRecord(inp.endpoint, "instance_adopted",
                                          f"instance {inp.instance_id} adopted after a worker restart "
                                          f"(pid {adopted.pid})", inp.instance_id))
        if launched is None:
            with heartbeating():
                prov = self.provision(ProvisionInput(inp.endpoint, inp.instance_id, inp.generation, list(inp.gpus),
                                                     inp.revision))
            launched = {"host": prov.host, "address": prov.address, "port": prov.port, "pid": prov.pid,
                        "container_id": prov.container_id, "workdir": prov.workdir, "log_path": prov.log_path,
                        "started_at": time.time()}
            activity.heartbeat(launched)
            self.record_instance(InstanceRecord(
                inp.endpoint, inp.instance_id, "starting", generation=inp.generation,
                revision=prov.revision or None, gpu_type=inp.gpu_type,
                gpus=list(inp.gpus), host=prov.host, address=prov.address, port=prov.port, pid=prov.pid,
                container_id=prov.container_id, workdir=prov.workdir, log_path=prov.log_path,
                started_at=launched["started_at"], reason=f"waiting for {expectation(inp.health_path)}",
                event_kind="instance_starting",
                event_message=f"instance {inp.instance_id} started at {prov.address}, "
                              f"waiting for {expectation(inp.health_path)}"))
        deadline = launched["started_at"] + inp.startup_timeout_seconds
        progress = _ProbeProgress(self, inp.endpoint, inp.instance_id)
        result = wait_until_ready(
            launched["address"], inp.health_path, max(0.0, deadline - time.time()),
            is_alive=lambda: self.backend.liveness(inp.instance_id),
            heartbeat=lambda: activity.heartbeat(launched),
            on_answer=progress,
        )
        ready_at = time.time() if result.ready else None
        reason = result.reason
        if result.ready:
            _observe_start(inp.endpoint, ready_at - launched["started_at"])
            self.record_instance(InstanceRecord(
                inp.endpoint, inp.instance_id, "ready", ready_at=ready_at, reason="", event_kind="instance_ready",
                event_message=f"instance {inp.instance_id} ready in {result.seconds:.2f}s at {launched['address']} "
                              f"({result.reason})"))
        else:
            # The reason travels to every held request (docs/architecture.md "The proxy contract"):
            # make it say why.
            tail = last_log_lines(launched.get("log_path", ""), 5)
            if tail:
                reason += "; last log lines: " + " | ".join(tail)
        return StartInstanceResult(ready=result.ready, reason=reason, seconds=result.seconds,
                                   host=launched["host"], address=launched["address"], pid=launched["pid"],
                                   ready_at=ready_at)

    def provision(self, inp: ProvisionInput) -> ProvisionResult:
        from workers.revision_source import pin_revision, start_spec
        from workers.sources import SourceError
        from workers.workdir import log_path_for, prepare_workdir

        log_path = str(log_path_for(self.settings, inp.instance_id))
        for attempt in (1, 2):
            with self.db.session() as session:
                e = self._endpoint(session, inp.endpoint)
                # What runs: the instance's revision, its source as pinned (README.md "Revisions and
                # updates"); an endpoint without revisions runs its spec.
                run = start_spec(session, e, inp.revision) or {name: getattr(e, name) for name in (
                    "start_command", "image", "port", "source_dir", "env", "cpu_cores", "memory_gb", "git_url",
                    "git_ref", "routes", "model_version_id")}
                revision = run.get("revision", 0)
                if revision and not run.get("pinned") and attempt == 1:
                    number = revision
                else:
                    number = 0
                    # The one place a sealed secret is opened: for the instance's environment
                    # (common/secrets.py); a revision keeps its environment sealed as the endpoint does.
                    try:
                        env = reveal_env(run.get("env") or [], box_for(self.settings))
                    except SecretsKeyError as err:
                        raise ApplicationError(str(err), type="SecretsKeyError", non_retryable=True) from None
                    source_kind, source_dir = e.source_kind, run.get("source_dir") or ""
                    start_command, image, port = run.get("start_command") or "", run.get("image") or "", run["port"]
                    cpu, mem, disk = run["cpu_cores"], run["memory_gb"], e.disk_gb
                    routes_source = _routes_source(session, run) if source_kind == "routes" else None
            if not number:
                break
            # A revision made before revisions existed is pinned by its first start.
            try:
                pin_revision(self.settings, self.db, inp.endpoint, number,
                             heartbeat=lambda detail: activity.heartbeat(detail))
            except SourceError as err:
                append_log(log_path, f"source preparation failed: {err}")
                raise ApplicationError(str(err), type="SourceError", non_retryable=True) from err
        activity.heartbeat("preparing workdir")
        append_log(log_path, f"provisioning instance {inp.instance_id} of {inp.endpoint} "
                             f"(generation {inp.generation}{f', revision {revision}' if revision else ''}, "
                             f"GPUs {inp.gpus or 'none'})")
        try:
            workdir = prepare_workdir(self.settings, inp.instance_id,
                                      (source_dir or None) if source_kind == "server" else None)
            if routes_source is not None:
                start_command, commit = _prepare_routes(self.settings, routes_source, workdir, log_path)
                if commit and routes_source.get("version_id") and not routes_source.get("pinned_commit"):
                    self._record_commit(routes_source["version_id"], commit)
        except (OSError, ValueError) as err:
            append_log(log_path, f"source preparation failed: {err}")
            raise ApplicationError(str(err), type="SourceError", non_retryable=True) from err
        activity.heartbeat("launching")
        try:
            launched = self.backend.launch(LaunchSpec(
                instance_id=inp.instance_id, endpoint_name=inp.endpoint, start_command=start_command, image=image,
                port=port, workdir=str(workdir), log_path=log_path, env=env, gpus=list(inp.gpus), cpu_cores=cpu,
                memory_gb=mem, disk_gb=disk,
            ))
        except LaunchRefused as err:
            append_log(log_path, f"cannot start: {err}")
            raise ApplicationError(str(err), type="LaunchRefused", non_retryable=True) from err
        append_log(log_path, f"started on {launched.host} at {launched.address} (pid {launched.pid})")
        return ProvisionResult(host=launched.host, address=launched.address, port=launched.port, pid=launched.pid,
                               container_id=launched.container_id, workdir=str(workdir), log_path=log_path,
                               revision=revision)

    def _record_commit(self, version_id: int, commit: str) -> None:
        from common.models import ModelVersion

        with self.db.session() as session:
            version = session.get(ModelVersion, version_id)
            if version is not None and version.resolved_commit != commit:
                version.resolved_commit = commit

    @activity.defn
    def check_liveness(self, inp: LivenessInput) -> LivenessResult:
        from workers.health import expectation, probe

        def exited(live) -> LivenessResult:
            code = f" with code {live.exit_code}" if live.exit_code is not None else ""
            return LivenessResult(False, f"process exited{code}{': ' + live.detail if live.detail else ''}")

        live = self.backend.liveness(inp.instance_id)
        if not live.alive:
            return exited(live)
        # The process runs; a server that stopped answering is dead too, after a few tries.
        detail = ""
        for attempt in range(3):
            ok, detail = probe(inp.address, inp.health_path, timeout=5.0)
            if ok:
                return LivenessResult(True)
            time.sleep(0.5 * (attempt + 1))
        # A process being killed (its memory limit, say) closes its sockets before it is gone:
        # the reason it is dying beats "connection refused".
        live = self.backend.liveness(inp.instance_id)
        if not live.alive:
            return exited(live)
        why = getattr(self.backend, "resource_note", lambda _id: "")(inp.instance_id)
        return LivenessResult(False, f"health check failing: {detail}, expected {expectation(inp.health_path)}"
                              + (f" ({why})" if why else ""))

    @activity.defn
    def stop_instance(self, inp: StopInstanceInput) -> None:
        self.backend.stop(inp.instance_id, inp.grace_seconds)

    # ------------------------------------------------------------ GPU pool
    @activity.defn
    def gpu_inventory(self, inp: GpuInventoryInput) -> GpuInventory:
        from workers.gpus import load_inventory

        try:
            return GpuInventory(gpus=load_inventory(self.settings))
        except ValueError as err:
            log.error("GPU inventory unusable: %s", err)
            return GpuInventory(gpus={}, error=str(err))

    @activity.defn
    async def request_gpus(self, req: GpuRequest) -> None:
        # signal-with-start: the pool workflow exists from the first request on.
        from workflows.gpu_pool import SIGNAL_REQUEST, PoolInput

        await self.client.start_workflow(
            GPU_POOL_WORKFLOW, PoolInput(pool=req.pool), id=gpu_pool_workflow_id(req.pool),
            task_queue=self.settings.task_queue, start_signal=SIGNAL_REQUEST, start_signal_args=[req],
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )

    @activity.defn
    async def release_gpus(self, rel: GpuRelease) -> None:
        from workflows.gpu_pool import SIGNAL_RELEASE

        await self.client.get_workflow_handle(gpu_pool_workflow_id(rel.pool)).signal(SIGNAL_RELEASE, rel)

    @activity.defn
    def record_queue_positions(self, inp: QueuePositionsInput) -> None:
        with self.db.session() as session:
            touched = set()
            for pos in inp.positions:
                inst = session.get(Instance, pos.instance_id)
                if inst is None:
                    continue
                inst.queue_position = pos.position
                if pos.reason is not None:
                    inst.reason = pos.reason
                touched.add(inst.endpoint_id)
            session.flush()
            for endpoint_id in touched:
                e = session.get(Endpoint, endpoint_id)
                positions = [i.queue_position for i in e.instances if i.queue_position is not None]
                e.queue_position = min(positions) if positions else None

    # ------------------------------------------------------------ hosts (the pool workflow's local activities)
    @activity.defn
    def hosts_last_seen(self, inp: HostsSeenInput) -> dict[str, float]:
        """Each host's last heartbeat (unix seconds); a host never seen is left out."""
        with self.db.session() as session:
            rows = session.execute(select(Host.name, Host.last_heartbeat_at).where(Host.name.in_(inp.names))).all()
        return {name: _as_utc(seen).timestamp() for name, seen in rows if seen is not None}

    @activity.defn
    def project_gpu_quotas(self, inp: ProjectGpuQuotasInput) -> dict[str, list]:
        """{project: [its GPU quota (None: no limit), GPUs its live instances hold in other pools]}
        for the pool's placement (workflows/placement.py `grantable`)."""
        with self.db.session() as session:
            projects = {p.id: p for p in session.scalars(select(Project).where(Project.name.in_(inp.projects)))}
            elsewhere = {p.name: 0 for p in projects.values()}
            rows = session.execute(
                select(Endpoint.project_id, Instance.gpus).join(Endpoint, Endpoint.id == Instance.endpoint_id)
                .join(Host, Host.name == Instance.host)
                .where(Endpoint.project_id.in_(projects), Instance.status.in_(INSTANCE_LIVE_STATES),
                       Host.pool != inp.pool)).all()
            for project_id, gpus in rows:
                elsewhere[projects[project_id].name] += len(gpus or [])
            return {p.name: [p.max_gpus, elsewhere[p.name]] for p in projects.values()}

    @activity.defn
    def record_host_state(self, rec: HostStateRecord) -> None:
        with self.db.session() as session:
            host = session.get(Host, rec.host)
            if host is not None:
                host.state, host.state_reason = rec.state, rec.reason

    # ------------------------------------------------------------ warm windows
    @activity.defn
    def warm_windows_now(self, inp: WarmWindowsInput) -> WarmWindowsResult:
        """workflows/warm_windows.py `evaluate`, outside the workflow: its answer (which depends on
        the tz database) is recorded in the workflow's history."""
        from workflows.warm_windows import evaluate

        instances, open_windows, next_change = evaluate(inp.text, inp.now, inp.max_instances)
        return WarmWindowsResult(instances, open_windows, next_change)

    # ------------------------------------------------------------ purge
    @activity.defn
    def purge_endpoint(self, inp: PurgeInput) -> None:
        from workers.workdir import remove_instance_files

        with self.db.session() as session:
            e = self._endpoint(session, inp.endpoint)
            ids = [i.id for i in e.instances]
            for iid in ids:
                remove_instance_files(self.settings, iid)
            session.execute(delete(Instance).where(Instance.endpoint_id == e.id))
            session.execute(delete(Event).where(Event.endpoint_id == e.id))
            session.execute(delete(MetricPoint).where(MetricPoint.endpoint_id == e.id))
            # Revisions hold the environment (secrets) and pinned sources: they go too.
            from common.models import Revision
            from workers.revision_source import remove_snapshots

            revision_ids = list(session.scalars(select(Revision.id).where(Revision.endpoint_id == e.id)))
            session.execute(delete(Revision).where(Revision.endpoint_id == e.id))
            remove_snapshots(self.settings, revision_ids)
            # Keep a tombstone so the UI can say what happened; secrets go with the rest.
            e.env = [{"key": item["key"], "value": "", "secret": bool(item.get("secret"))} for item in (e.env or [])]
            e.status = TERMINATED
            e.status_reason = inp.reason
            e.queue_position = None
            e.status_updated_at = datetime.now(timezone.utc)
            session.add(Event(endpoint_id=e.id, kind="terminated", message=f"purged: {inp.reason}"))


_START_SECONDS = None


def _observe_start(endpoint: str, seconds: float) -> None:
    """The worker's Prometheus histogram of cold starts: launch until ready (workers/worker.py)."""
    global _START_SECONDS
    from prometheus_client import Histogram

    if _START_SECONDS is None:
        _START_SECONDS = Histogram("standby_instance_cold_start_seconds", "Instance starts: launch until ready",
                                   ["endpoint"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
    _START_SECONDS.labels(endpoint).observe(max(0.0, seconds))


@contextmanager
def heartbeating(every_seconds: float = 2.0) -> Iterator[None]:
    """Heartbeat from a side thread while a step that cannot (copying a source tree, pulling an
    image, a clone between its own beats) runs, so the activity's short heartbeat timeout (how
    soon a retry follows a worker crash, workflows/instance.py) never cuts a slow but live step."""
    import contextvars
    import threading

    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_seconds):
            try:
                activity.heartbeat("provisioning")
            except Exception:  # the activity is finishing or was cancelled: its own thread knows
                return

    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True,
                              name="provision-heartbeat")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1.0)


class _ProbeProgress:
    """Writes what the readiness probe last saw onto the starting instance's row (its reason),
    so the detail page says what it waits for ("GET / -> HTTP 404, waiting for HTTP 200 from
    /health"). At most one write per second: a probe runs every 10 ms at first."""

    def __init__(self, acts: "StandbyActivities", endpoint: str, instance_id: str, every_seconds: float = 1.0):
        self.acts, self.endpoint, self.instance_id = acts, endpoint, instance_id
        self.every, self.last_write, self.written = every_seconds, 0.0, ""

    def __call__(self, answer: str) -> None:
        now = time.monotonic()
        if answer != self.written and now - self.last_write >= self.every:
            self.last_write, self.written = now, answer
            self.acts.record_instance(InstanceRecord(self.endpoint, self.instance_id, "starting", reason=answer))


def last_log_lines(path: str, count: int) -> list[str]:
    """The instance's own last lines (Standby's bracketed lines left out), for failure reasons."""
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 16384))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    own = [line.strip() for line in lines if line.strip() and not line.startswith("[standby")]
    return [line[:300] for line in own[-count:]]


def _routes_source(session, run: dict) -> dict:
    """Snapshot of a routes endpoint's source (its revision's, with the commit pinned), copied out
    while the session is open (issue 4)."""
    from common.models import ModelVersion
    from workers.sources import source_snapshot

    commit = run.get("source_commit") or ""
    if run.get("model_version_id") is not None:
        version = session.get(ModelVersion, run["model_version_id"])
        if version is None:
            raise ApplicationError(f"model version {run['model_version_id']} no longer exists",
                                   type="SourceError", non_retryable=True)
        snap = source_snapshot(version)
        snap["version_id"] = version.id
    else:
        snap = {"kind": "git", "git_url": run.get("git_url") or "", "git_ref": run.get("git_ref") or ""}
    if commit and snap["kind"] == "git":
        snap["git_ref"] = snap["pinned_commit"] = commit  # the commit pinned when the revision was made
    snap["routes"] = list(run.get("routes") or [])
    return snap


def _needs_netns(source_kind: str, image: str, start_command: str) -> bool:
    """A fixed-port command on the process backend: only hosts with network namespaces take it."""
    from workers.ports import uses_port_placeholder

    return source_kind == "server" and not image and not uses_port_placeholder(start_command or "")


def _revision_info(source_kind: str, revision) -> RevisionInfo:
    spec = revision.spec or {}
    return RevisionInfo(number=revision.number, traffic=revision.traffic, state=revision.state,
                        pinned=revision.pinned_at is not None, gpu_type=spec.get("gpu_type") or "",
                        gpu_count=int(spec.get("gpu_count") or 0), cpu_cores=float(spec.get("cpu_cores") or 1.0),
                        memory_gb=float(spec.get("memory_gb") or 1.0), pools=list(spec.get("pools") or []),
                        needs_netns=_needs_netns(source_kind, spec.get("image") or "", spec.get("start_command") or ""))


def _serving_revision(session, endpoint: Endpoint) -> int:
    from common.models import Revision

    rows = session.execute(select(Revision.number, Revision.traffic).where(Revision.endpoint_id == endpoint.id)).all()
    split = {number: traffic for number, traffic in rows if traffic > 0}
    if split:
        return max(split, key=lambda n: (split[n], n))
    return max((number for number, _ in rows), default=0)


def _prepare_routes(settings: Settings, source: dict, workdir, log_path: str) -> tuple[str, str]:
    """Populate a routes endpoint's workdir; return the built-in runtime's start command and the
    resolved git commit (empty for archives)."""
    import sys

    from runtime.launch import build_start
    from workers.sources import populate_routes_source

    info = populate_routes_source(settings, source, workdir, heartbeat=lambda detail: activity.heartbeat(detail))
    if info.resolved_commit:
        append_log(log_path, f"cloned {info.git_url} at {info.git_ref} = commit {info.resolved_commit}")
    return build_start(source["routes"], workdir, python=sys.executable), info.resolved_commit
