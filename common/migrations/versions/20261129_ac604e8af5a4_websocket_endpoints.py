"""WebSocket endpoints (issue 15): `websocket` (immutable) and `max_websockets` per instance.

Revision ID: ac604e8af5a4
Revises: bc7a5c30fbb9
Create Date: 2026-11-29 21:53:27.862393

Review before committing (README.md "Upgrading"): autogenerate misses renames (it drops and adds),
and a new column that existing rows cannot leave empty needs a server_default.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = 'ac604e8af5a4'
down_revision = "bc7a5c30fbb9"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        # Endpoints made before stay what they were: plain HTTP services.
        batch_op.add_column(sa.Column('websocket', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('max_websockets', sa.Integer(), nullable=False, server_default="1000"))


def downgrade() -> None:
    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        batch_op.drop_column('max_websockets')
        batch_op.drop_column('websocket')
