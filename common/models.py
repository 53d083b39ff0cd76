"""Database models shared by the web app (spec), the worker (observed state) and the proxy (reads).

Plain SQLAlchemy declarative models so that the worker and the proxy use them without a Flask
app; the web app hands `Base` to Flask-SQLAlchemy as its model class.

Single writer per column group (docs/architecture.md "Who owns what"):
- spec columns of `Endpoint`, `ApiKey`, `Model`, `ModelVersion`, and new `Revision` rows: the web app;
- `Endpoint.status*`, `Instance`, `Event`, a revision's pinned source, state and traffic share:
  worker activities;
- nothing on the hot path writes to the database.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from common.spec_fields import spec_columns


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# The project of endpoints and models made before projects existed (the migration that added
# projects makes it with this id; common/account_models.py).
DEFAULT_PROJECT_ID = 1

# The largest id of a row: ids are Integer columns, 32-bit on PostgreSQL. A URL naming a larger one
# names no row (and must not reach the database, whose driver would overflow).
MAX_ROW_ID = 2**31 - 1


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list: JSON}


# Endpoint states shown to users; `creating` until the endpoint's workflow first reports one.
CREATING, QUEUED, STARTING, RUNNING, STANDBY = "creating", "queued", "starting", "running", "standby"
STOPPING, STOPPED, FAILED, TERMINATED = "stopping", "stopped", "failed", "terminated"
ENDPOINT_STATES = (CREATING, QUEUED, STARTING, RUNNING, STANDBY, STOPPING, STOPPED, FAILED, TERMINATED)

# Instance states. `ready` instances are the only ones the proxy routes to.
I_QUEUED, I_PROVISIONING, I_STARTING, I_READY = "queued", "provisioning", "starting", "ready"
I_DRAINING, I_STOPPING, I_STOPPED, I_FAILED = "draining", "stopping", "stopped", "failed"
INSTANCE_LIVE_STATES = (I_QUEUED, I_PROVISIONING, I_STARTING, I_READY, I_DRAINING, I_STOPPING)
INSTANCE_STATES = INSTANCE_LIVE_STATES + (I_STOPPED, I_FAILED)


# The spec's columns, one per field declared in common/spec_fields.py (written by the web app only).
EndpointSpecColumns = type("EndpointSpecColumns", (), spec_columns())


class Endpoint(EndpointSpecColumns, Base):
    __tablename__ = "endpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The project it belongs to (common/account_models.py); others see a 404.
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True, default=DEFAULT_PROJECT_ID,
                                            server_default=str(DEFAULT_PROJECT_ID))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    spec_updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    # ---- observed state: written by worker activities only ----
    status: Mapped[str] = mapped_column(String(16), default=CREATING)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    queue_position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stopped_at: Mapped[datetime | None] = mapped_column(nullable=True)
    purge_at: Mapped[datetime | None] = mapped_column(nullable=True)
    status_updated_at: Mapped[datetime | None] = mapped_column(nullable=True)

    instances: Mapped[list["Instance"]] = relationship(
        back_populates="endpoint", cascade="all, delete-orphan", order_by="Instance.created_at.desc()"
    )
    api_keys: Mapped[list["ApiKey"]] = relationship(back_populates="endpoint", cascade="all, delete-orphan")
    revisions: Mapped[list["Revision"]] = relationship(
        back_populates="endpoint", cascade="all, delete-orphan", order_by="Revision.number.desc()"
    )

    @property
    def workflow_id(self) -> str:
        return f"endpoint-{self.name}"


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # short id, e.g. "xykemlvy"
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"), index=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    # The revision it runs (common/revisions.py); 0 for an endpoint without revisions.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default=I_QUEUED)
    reason: Mapped[str] = mapped_column(Text, default="")
    host: Mapped[str] = mapped_column(String(255), default="")
    address: Mapped[str] = mapped_column(String(255), default="")  # "127.0.0.1:43121"
    port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gpu_type: Mapped[str] = mapped_column(String(64), default="")
    gpus: Mapped[list] = mapped_column(JSON, default=list)  # granted GPU indices
    queue_position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    container_id: Mapped[str] = mapped_column(String(128), default="")
    workdir: Mapped[str] = mapped_column(Text, default="")
    log_path: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)  # provisioned
    ready_at: Mapped[datetime | None] = mapped_column(nullable=True)
    stopped_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Billed: GPU count x (stopped_at - ready_at). Queued time is never billed.
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # Its price per hour, fixed when it became ready (common/cost.py): cost = price x (stopped -
    # ready), growing while it runs. Null: it never became ready (nothing billed).
    price_per_hour: Mapped[float | None] = mapped_column(Float, nullable=True)

    endpoint: Mapped[Endpoint] = relationship(back_populates="instances")


class Revision(Base):
    """An immutable snapshot of what an endpoint runs (README.md "Revisions and updates").

    Made by the web app (number, spec, why); its source pinned once by a worker (`source_commit`,
    `source_snapshot`, `pinned_at`); its `state` and `traffic` share kept by the endpoint's
    workflow through worker activities."""

    __tablename__ = "revisions"
    __table_args__ = (UniqueConstraint("endpoint_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    # The revision fields (common/revisions.py REVISION_FIELDS) as they were when it was made.
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # ---- its pinned source: written once, by a worker ----
    source_commit: Mapped[str] = mapped_column(String(64), default="")
    source_snapshot: Mapped[str] = mapped_column(Text, default="")
    pinned_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # ---- kept by the endpoint's workflow (worker activities) ----
    state: Mapped[str] = mapped_column(String(16), default="pending")
    state_reason: Mapped[str] = mapped_column(Text, default="")
    traffic: Mapped[int] = mapped_column(Integer, default=0)  # percent of requests
    strategy: Mapped[str] = mapped_column(String(16), default="")

    endpoint: Mapped[Endpoint] = relationship(back_populates="revisions")


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")


class MetricPoint(Base):
    """One writer's figures of one step, for the endpoint page's charts (common/metrics_store.py):
    request counts and histograms (kind `traffic`, from the proxy) or resource use of an instance
    (kind `usage`, from its worker). Each row has one writer (`source`); readers add them up."""

    __tablename__ = "metric_points"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "instance_id", "kind", "step", "at", "source"),
        Index("ix_metric_points_range", "endpoint_id", "kind", "step", "at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"))
    instance_id: Mapped[str] = mapped_column(String(16), default="")  # "": the endpoint as a whole
    kind: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(Integer)  # seconds this row covers
    at: Mapped[int] = mapped_column(Integer)  # unix seconds, a multiple of step
    source: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ApiKey(Base):
    """Endpoint API keys (issue 3): stored hashed, shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)

    endpoint: Mapped[Endpoint] = relationship(back_populates="api_keys")


class Model(Base):
    """Model registry (issue 4): a name with immutable versions."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True, index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True, default=DEFAULT_PROJECT_ID,
                                            server_default=str(DEFAULT_PROJECT_ID))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list["ModelVersion"]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="ModelVersion.number"
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # "archive" | "git"
    # archive: stored under data_dir/models/...; git: url + ref, commit resolved at provision.
    archive_path: Mapped[str] = mapped_column(Text, default="")
    archive_size: Mapped[int] = mapped_column(Integer, default=0)
    archive_sha256: Mapped[str] = mapped_column(String(64), default="")
    git_url: Mapped[str] = mapped_column(Text, default="")
    git_ref: Mapped[str] = mapped_column(String(255), default="")
    resolved_commit: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")


# Host states (docs/architecture.md "Hosts and pools"): `up` takes new instances, `draining` keeps
# its instances but takes no new ones, `down` stopped heart-beating (its instances are lost).
HOST_UP, HOST_DRAINING, HOST_DOWN = "up", "draining", "down"


class Host(Base):
    """A machine running a Standby worker. Its facts (GPUs, CPU, memory, disk, heartbeat) are
    written by its own worker; its state by the pool workflow's activities.

    `to_info()` is what its pool's placement sees (workflows/placement.py)."""

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    pool: Mapped[str] = mapped_column(String(63), index=True, default="default")
    task_queue: Mapped[str] = mapped_column(String(255), default="")
    advertise_address: Mapped[str] = mapped_column(String(255), default="")
    backend: Mapped[str] = mapped_column(String(16), default="process")
    # Network namespaces for fixed-port commands: "net", "user+net" or "" (workers/ports.py).
    netns: Mapped[str] = mapped_column(String(16), default="")
    # [{"type": "T4", "index": 0, "memory_mb": 15360}, ...]
    gpus: Mapped[list] = mapped_column(JSON, default=list)
    cpu_cores: Mapped[float] = mapped_column(Float, default=0.0)
    memory_gb: Mapped[float] = mapped_column(Float, default=0.0)
    disk_gb: Mapped[float] = mapped_column(Float, default=0.0)
    # How much its pool may grant per unit of each (STANDBY_*_OVERCOMMIT on its worker).
    cpu_overcommit: Mapped[float] = mapped_column(Float, default=1.0)
    memory_overcommit: Mapped[float] = mapped_column(Float, default=1.0)
    disk_overcommit: Mapped[float] = mapped_column(Float, default=1.0)
    state: Mapped[str] = mapped_column(String(16), default=HOST_UP)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)

    def to_info(self):
        from workflows.placement import HostInfo

        gpus: dict[str, list[int]] = {}
        for gpu in self.gpus or []:
            gpus.setdefault(gpu["type"], []).append(gpu["index"])
        return HostInfo(name=self.name, pool=self.pool, task_queue=self.task_queue, address=self.advertise_address,
                        gpus=gpus, cpu_cores=self.cpu_cores, memory_gb=self.memory_gb, disk_gb=self.disk_gb,
                        cpu_overcommit=self.cpu_overcommit, memory_overcommit=self.memory_overcommit,
                        disk_overcommit=self.disk_overcommit, netns=self.netns, backend=self.backend)


# Users, projects, tokens and the audit log live in their own module; importing it here puts their
# tables in `Base.metadata` wherever the models are loaded (migrations, the schema check).
from common import account_models  # noqa: E402,F401
