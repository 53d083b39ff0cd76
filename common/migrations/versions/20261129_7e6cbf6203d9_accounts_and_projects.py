"""Accounts, projects, tokens and the audit log (issue 12).

Every endpoint and model made before projects existed joins the project `default` (id 1), made
here; its endpoint quota is at least the number of endpoints it already has, so an upgrade
refuses nothing that worked before. Users are made by `app.py up` (the first admin) or
`app.py create-user`.

Revision ID: 7e6cbf6203d9
Revises: 9d1c8994f1d2
Create Date: 2026-11-29 21:48:35.239411

Review before committing (README.md "Upgrading"): autogenerate misses renames (it drops and adds),
and a new column that existing rows cannot leave empty needs a server_default.
"""
from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op


revision = '7e6cbf6203d9'
down_revision = '9d1c8994f1d2'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('user_name', sa.String(length=63), nullable=False),
    sa.Column('via', sa.String(length=64), nullable=False),
    sa.Column('remote_addr', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=True),
    sa.Column('project_name', sa.String(length=63), nullable=False),
    sa.Column('endpoint_name', sa.String(length=63), nullable=False),
    sa.Column('target', sa.String(length=255), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_endpoint_name'), ['endpoint_name'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_project_id'), ['project_id'], unique=False)

    op.create_table('projects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('max_endpoints', sa.Integer(), nullable=False),
    sa.Column('max_gpus', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_projects_name'), ['name'], unique=True)
    existing = op.get_bind().execute(
        sa.text("SELECT count(*) FROM endpoints WHERE status != 'terminated'")).scalar() or 0
    projects = sa.table('projects', sa.column('id', sa.Integer), sa.column('name', sa.String),
                        sa.column('max_endpoints', sa.Integer), sa.column('created_at', sa.DateTime(timezone=True)))
    op.bulk_insert(projects, [{"id": 1, "name": "default", "max_endpoints": max(20, existing),
                               "created_at": datetime.now(timezone.utc)}])
    if op.get_bind().dialect.name == "postgresql":  # the id was given: the sequence must not hand out 1 again
        op.execute("SELECT setval(pg_get_serial_sequence('projects', 'id'), 1)")

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('is_admin', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_users_name'), ['name'], unique=True)

    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_tokens_user_id'), ['user_id'], unique=False)

    op.create_table('memberships',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('user_id', 'project_id')
    )
    with op.batch_alter_table('memberships', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_memberships_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_memberships_user_id'), ['user_id'], unique=False)

    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('project_id', sa.Integer(), server_default='1', nullable=False))
        batch_op.create_index(batch_op.f('ix_endpoints_project_id'), ['project_id'], unique=False)
        batch_op.create_foreign_key('fk_endpoints_project_id_projects', 'projects', ['project_id'], ['id'])

    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('project_id', sa.Integer(), server_default='1', nullable=False))
        batch_op.create_index(batch_op.f('ix_models_project_id'), ['project_id'], unique=False)
        batch_op.create_foreign_key('fk_models_project_id_projects', 'projects', ['project_id'], ['id'])



def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint('fk_models_project_id_projects', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_models_project_id'))
        batch_op.drop_column('project_id')

    with op.batch_alter_table('endpoints', schema=None) as batch_op:
        batch_op.drop_constraint('fk_endpoints_project_id_projects', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_endpoints_project_id'))
        batch_op.drop_column('project_id')

    with op.batch_alter_table('memberships', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_memberships_user_id'))
        batch_op.drop_index(batch_op.f('ix_memberships_project_id'))

    op.drop_table('memberships')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_tokens_user_id'))

    op.drop_table('api_tokens')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_users_name'))

    op.drop_table('users')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_projects_name'))

    op.drop_table('projects')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_project_id'))
        batch_op.drop_index(batch_op.f('ix_audit_log_endpoint_name'))
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))

    op.drop_table('audit_log')
