"""Hosts and pools (issue 11): the hosts workers register, and the pools an endpoint runs in.

Revision ID: 9d1c8994f1d2
Revises: baseline
Create Date: 2026-11-29 20:37:01.304135

Review before committing (README.md "Upgrading"): autogenerate misses renames (it drops and adds),
and a new column that existing rows cannot leave empty needs a server_default.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '9d1c8994f1d2'
down_revision = 'baseline'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hosts',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('pool', sa.String(length=63), nullable=False),
    sa.Column('task_queue', sa.String(length=255), nullable=False),
    sa.Column('advertise_address', sa.String(length=255), nullable=False),
    sa.Column('backend', sa.String(length=16), nullable=False),
    sa.Column('netns', sa.String(length=16), nullable=False),
    sa.Column('gpus', sa.JSON(), nullable=False),
    sa.Column('cpu_cores', sa.Float(), nullable=False),
    sa.Column('memory_gb', sa.Float(), nullable=False),
    sa.Column('disk_gb', sa.Float(), nullable=False),
    sa.Column('cpu_overcommit', sa.Float(), nullable=False),
    sa.Column('memory_overcommit', sa.Float(), nullable=False),
    sa.Column('disk_overcommit', sa.Float(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('state_reason', sa.Text(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hosts_pool'), ['pool'], unique=False)

    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        # Endpoints made before pools existed run in the default pool, as they did on their one host.
        batch_op.add_column(sa.Column('pools', sa.JSON(), nullable=False, server_default=sa.text("'[\"default\"]'")))



def downgrade() -> None:
    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        batch_op.drop_column('pools')

    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hosts_pool'))

    op.drop_table('hosts')
