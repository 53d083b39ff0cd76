"""Alembic environment of Standby's database (README.md "Upgrading").

Run only from code (common/schema.py, behind `python app.py db ...` and every command's start):
the caller opens the database and hands over a connection already inside a transaction, which
it commits, so an upgrade, or the stamp of a database made before migrations existed followed by
its upgrade, is one transaction. The caller also holds the schema lock, so this file connects
to nothing and reads no configuration of its own.
"""
from __future__ import annotations

from alembic import context

from common.models import Base

config = context.config
connection = config.attributes.get("connection")
if context.is_offline_mode() or connection is None:
    raise RuntimeError("Standby's migrations run through `python app.py db upgrade` (common/schema.py), "
                       "which opens the database named by DATABASE_URL / STANDBY_DATA_DIR")

context.configure(
    connection=connection,
    # Models by default; a test compares against other metadata to show a missing migration fails.
    target_metadata=config.attributes.get("target_metadata", Base.metadata),
    compare_type=True,
    # SQLite alters most columns only by copying the table: batch operations do that there and
    # plain ALTERs on PostgreSQL, so one migration serves both.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
