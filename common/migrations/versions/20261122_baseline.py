"""Baseline: the schema of the last release before migrations (commit da31137, models unchanged since).

Databases that release made with `create_all` have exactly these tables; common/schema.py checks
that they are there and stamps such a database at this revision instead of running it.
Constraint names are left to the database, as `create_all` left them.

Revision ID: baseline
Revises:
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "baseline"
down_revision = None
branch_labels = None
depends_on = None

# Every timestamp is stored with its time zone (common/models.py `Base.type_annotation_map`).
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_models_name", "models", ["name"], unique=True)

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("archive_path", sa.Text(), nullable=False),
        sa.Column("archive_size", sa.Integer(), nullable=False),
        sa.Column("archive_sha256", sa.String(length=64), nullable=False),
        sa.Column("git_url", sa.Text(), nullable=False),
        sa.Column("git_ref", sa.String(length=255), nullable=False),
        sa.Column("resolved_commit", sa.String(length=64), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "number"),
    )
    op.create_index("ix_model_versions_model_id", "model_versions", ["model_id"], unique=False)

    op.create_table(
        "endpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("environment", sa.String(length=32), nullable=False),
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("start_command", sa.Text(), nullable=False),
        sa.Column("image", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("source_dir", sa.Text(), nullable=False),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("git_url", sa.Text(), nullable=False),
        sa.Column("git_ref", sa.String(length=255), nullable=False),
        sa.Column("routes", sa.JSON(), nullable=False),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("cpu_cores", sa.Float(), nullable=False),
        sa.Column("memory_gb", sa.Float(), nullable=False),
        sa.Column("disk_gb", sa.Integer(), nullable=False),
        sa.Column("min_instances", sa.Integer(), nullable=False),
        sa.Column("max_instances", sa.Integer(), nullable=False),
        sa.Column("idle_retention_seconds", sa.Integer(), nullable=False),
        sa.Column("startup_timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("health_path", sa.String(length=255), nullable=False),
        sa.Column("health_interval_seconds", sa.Integer(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("balancing", sa.String(length=32), nullable=False),
        sa.Column("sticky_sessions", sa.Boolean(), nullable=False),
        sa.Column("hold_queue_size", sa.Integer(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("spec_updated_at", Timestamp, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=False),
        sa.Column("queue_position", sa.Integer(), nullable=True),
        sa.Column("stopped_at", Timestamp, nullable=True),
        sa.Column("purge_at", Timestamp, nullable=True),
        sa.Column("status_updated_at", Timestamp, nullable=True),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_endpoints_name", "endpoints", ["name"], unique=True)

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("endpoint_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=128), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("revoked_at", Timestamp, nullable=True),
        sa.ForeignKeyConstraint(["endpoint_id"], ["endpoints.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_index("ix_api_keys_endpoint_id", "api_keys", ["endpoint_id"], unique=False)

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("endpoint_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.String(length=16), nullable=True),
        sa.Column("at", Timestamp, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["endpoint_id"], ["endpoints.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_events_endpoint_id", "events", ["endpoint_id"], unique=False)

    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("endpoint_id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("queue_position", sa.Integer(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("container_id", sa.String(length=128), nullable=False),
        sa.Column("workdir", sa.Text(), nullable=False),
        sa.Column("log_path", sa.Text(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("started_at", Timestamp, nullable=True),
        sa.Column("ready_at", Timestamp, nullable=True),
        sa.Column("stopped_at", Timestamp, nullable=True),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["endpoint_id"], ["endpoints.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_instances_endpoint_id", "instances", ["endpoint_id"], unique=False)


def downgrade() -> None:
    for table in ("instances", "events", "api_keys", "endpoints", "model_versions", "models"):
        op.drop_table(table)  # its indexes go with it
