"""Autoscaling, metrics and cost (issue 14): the autoscaling spec fields, each instance's price.

Revision ID: bc7a5c30fbb9
Revises: 7e6cbf6203d9
Create Date: 2026-11-29 21:53:40.001965

Existing endpoints keep scaling as before (autoscaling off, the declared defaults); existing
instances have no recorded price: they are billed at today's price of their GPUs (common/cost.py).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = 'bc7a5c30fbb9'
down_revision = "7e6cbf6203d9"
branch_labels = None
depends_on = None

# (column, type, server default): the declared defaults (common/spec_fields.py).
AUTOSCALING = (
    ("autoscaling", sa.Boolean(), sa.false()),
    ("target_concurrency", sa.Integer(), sa.text("0")),
    ("target_cpu_percent", sa.Integer(), sa.text("0")),
    ("target_memory_percent", sa.Integer(), sa.text("0")),
    ("target_gpu_percent", sa.Integer(), sa.text("0")),
    ("autoscale_window_seconds", sa.Integer(), sa.text("60")),
    ("scale_down_delay_seconds", sa.Integer(), sa.text("30")),
    ("warm_windows", sa.Text(), sa.text("''")),
)


def upgrade() -> None:
    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        for name, kind, default in AUTOSCALING:
            batch_op.add_column(sa.Column(name, kind, nullable=False, server_default=default))

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('price_per_hour', sa.Float(), nullable=True))

    # The charts' store (common/metrics_store.py).
    op.create_table('metric_points',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('endpoint_id', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('at', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['endpoint_id'], ['endpoints.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('endpoint_id', 'instance_id', 'kind', 'step', 'at', 'source')
    )
    with op.batch_alter_table('metric_points', schema=None) as batch_op:
        batch_op.create_index('ix_metric_points_range', ['endpoint_id', 'kind', 'step', 'at'], unique=False)


def downgrade() -> None:
    op.drop_table('metric_points')

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('price_per_hour')

    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        for name, _, _ in reversed(AUTOSCALING):
            batch_op.drop_column(name)
