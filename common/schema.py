"""The database schema: Alembic migrations (common/migrations), applied on command or on start.

`python app.py db upgrade`, and `up`, `web` and `worker` before they serve, call `upgrade()`;
the proxy, which only reads, calls `wait_until_current()`. Nothing else creates or changes
tables (README.md "Upgrading").

Several processes start together on one database (`app.py up`, docker compose), so an upgrade
runs under a lock that only processes bringing the schema up to date take: an fcntl lock on a
file beside a SQLite database, a PostgreSQL advisory lock otherwise. Under it the revision is
read again: the first process upgrades, the others find the work done.

Databases made by releases before migrations existed (`create_all`, no `alembic_version`
table) are stamped at the baseline once every table and column the baseline creates is found
in them, then upgraded like any other.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, create_engine, event, inspect, text

from common.db import engine_options, make_engine, sqlite_file
from common.models import Base

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BASELINE = "baseline"
# Held by whichever Standby process is upgrading a PostgreSQL database; any fixed number works
# as long as every process uses the same one.
POSTGRES_LOCK_KEY = 0x5354414E4442  # "STANDB"
LOCK_TIMEOUT_SECONDS = 600.0


class SchemaError(RuntimeError):
    """The database cannot be brought to this release's schema; the message says what to do."""


@dataclass(frozen=True)
class Upgrade:
    before: str | None  # None: no schema yet, or one made before migrations (then `adopted`)
    after: str
    adopted: bool = False  # stamped at the baseline: tables made by `create_all` before migrations

    def __str__(self) -> str:
        if self.adopted:
            return f"adopted tables made before migrations at {BASELINE}, upgraded to {self.after}"
        if self.before == self.after:
            return f"schema current at {self.after}"
        return f"upgraded the schema from {self.before or 'empty'} to {self.after}"


def alembic_config(connection: Connection | None = None, *, versions_dir: Path | None = None,
                   metadata: MetaData | None = None) -> Config:
    """Alembic's configuration, from code: migrations/env.py uses `connection` as it is."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if versions_dir is not None:
        config.set_main_option("version_locations", str(versions_dir))
    # Date first, so a directory listing reads in the order revisions were written.
    config.set_main_option("file_template", "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    if metadata is not None:
        config.attributes["target_metadata"] = metadata
    return config


def head_revision(versions_dir: Path | None = None) -> str:
    return ScriptDirectory.from_config(alembic_config(versions_dir=versions_dir)).get_current_head()


def current_revision(database_url: str) -> str | None:
    """The revision recorded in the database; None before the first upgrade."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def upgrade(database_url: str, *, lock_timeout: float = LOCK_TIMEOUT_SECONDS,
            versions_dir: Path | None = None) -> Upgrade:
    """Bring the database to the newest revision: create it, adopt a pre-migration one, or
    apply what is missing. Safe to call from processes starting together."""
    head = head_revision(versions_dir)
    found = current_revision(database_url)
    if found == head:  # the common case, without taking the lock
        return Upgrade(found, head)
    engine = _migration_engine(database_url)
    try:
        with schema_lock(engine, lock_timeout), engine.begin() as connection:
            config = alembic_config(connection, versions_dir=versions_dir)
            found = MigrationContext.configure(connection).get_current_revision()
            if found == head:  # another process did it while this one waited for the lock
                return Upgrade(found, head)
            _check_known(found, config, head)
            adopted = found is None and _adopt_pre_migration_tables(connection, config)
            command.upgrade(config, "head")
            _check_foreign_keys(connection)
            return Upgrade(found, head, adopted)
    finally:
        engine.dispose()


def wait_until_current(database_url: str, timeout: float = LOCK_TIMEOUT_SECONDS, interval: float = 0.5) -> str:
    """For processes that only read (the proxy): wait until a writer has upgraded the schema."""
    head = head_revision()
    deadline = time.monotonic() + timeout
    while True:
        found = current_revision(database_url)
        if found == head:
            return found
        _check_known(found, alembic_config(), head)
        if time.monotonic() >= deadline:
            raise SchemaError(
                f"the database schema is at {found or 'nothing'} after {timeout:.0f}s, this release needs {head}: "
                "start `python app.py web` or `python app.py worker` (they upgrade it), or run "
                "`python app.py db upgrade`")
        time.sleep(interval)


def describe_current(database_url: str) -> str:
    """`app.py db current`: the recorded revision and whether it is the newest."""
    head = head_revision()
    found = current_revision(database_url)
    if found == head:
        return f"{found} (head)"
    if found is None:
        engine = make_engine(database_url)
        try:
            with engine.connect() as connection:
                tables = set(inspect(connection).get_table_names()) & set(Base.metadata.tables)
        finally:
            engine.dispose()
        if tables:
            return ("none: tables made before migrations existed; `python app.py db upgrade` "
                    f"adopts them at {BASELINE} and upgrades to {head}")
        return f"none (empty database); `python app.py db upgrade` creates the schema at {head}"
    return f"{found}; newest is {head}: run `python app.py db upgrade`"


def schema_diff(connection: Connection, metadata: MetaData | None = None) -> list[Any]:
    """What autogenerate would write: the differences between `metadata` (the models) and the
    database behind `connection`. Empty when the migrations describe the models exactly."""
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, metadata if metadata is not None else Base.metadata)


def new_revision(message: str, *, autogenerate: bool, versions_dir: Path | None = None,
                 metadata: MetaData | None = None) -> Path:
    """`app.py db revision`: write a new migration file after the newest one.

    Autogenerate compares the models with a scratch database upgraded to the newest revision,
    not with whatever database this machine has: the result depends on the migrations in the
    repository only."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as connection:
            config = alembic_config(connection, versions_dir=versions_dir, metadata=metadata)
            command.upgrade(config, "head")
            if autogenerate and not schema_diff(connection, metadata):
                raise SchemaError("the models match the newest migration: nothing to generate "
                                  "(change common/models.py first, or leave out --autogenerate "
                                  "for a migration written by hand)")
            script = command.revision(config, message=message, autogenerate=autogenerate)
    finally:
        scratch.dispose()
    return Path(script.path)


# ---------------------------------------------------------------- locking


@contextmanager
def schema_lock(engine: Engine, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Held while one process checks and upgrades the schema. Both kinds are released by the
    system when their process dies, so a crashed upgrade never leaves the lock behind."""
    if engine.dialect.name == "postgresql":
        with _postgres_lock(engine, timeout):
            yield
        return
    if engine.dialect.name != "sqlite":
        raise SchemaError(f"DATABASE_URL names a {engine.dialect.name} database: Standby supports SQLite "
                          "and PostgreSQL (postgresql+psycopg://...)")
    path = sqlite_file(engine.url)
    with _file_lock(path.with_name(path.name + ".schema-lock"), timeout) if path else nullcontext():
        yield


@contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _wait_for(lambda: _try_flock(fd), timeout, f"the lock {path}")
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def _postgres_lock(engine: Engine, timeout: float) -> Iterator[None]:
    # A session lock on a connection of its own: the upgrade's transaction stays separate, and
    # the lock is committed out of any transaction so no snapshot is held while it is.
    with engine.connect() as connection:
        def try_lock() -> bool:
            taken = connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": POSTGRES_LOCK_KEY})
            connection.commit()
            return bool(taken)

        _wait_for(try_lock, timeout, f"PostgreSQL advisory lock {POSTGRES_LOCK_KEY}")
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": POSTGRES_LOCK_KEY})
            connection.commit()


def _wait_for(try_acquire, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not try_acquire():
        if time.monotonic() >= deadline:
            raise SchemaError(f"another Standby process has been upgrading the database for over {timeout:.0f}s "
                              f"({what} is taken); let it finish, or stop it and start again")
        time.sleep(0.1)


# ---------------------------------------------------------------- upgrading


def _migration_engine(database_url: str) -> Engine:
    path = sqlite_file(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url, **engine_options(database_url))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_for_migrations)
        # pysqlite commits before each DDL statement on its own; with its transaction handling
        # off (above) and this BEGIN, an upgrade is one transaction a crash rolls back whole,
        # and IMMEDIATE takes the write lock up front rather than failing to upgrade a read lock.
        event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    return engine


def _sqlite_for_migrations(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # as every other process opens it (common/db.py)
    # Off while migrating (SQLite's own default; the other processes turn it on): a batch
    # migration recreates a table by dropping the old copy, which with foreign keys on would
    # first delete every row that references it (ON DELETE CASCADE). Checked after instead.
    cursor.execute("PRAGMA foreign_keys=OFF")
    cursor.close()


def _check_foreign_keys(connection: Connection) -> None:
    if connection.dialect.name != "sqlite":
        return  # PostgreSQL checks them on every statement
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise SchemaError(f"the upgrade left rows whose foreign keys point nowhere: {broken[:5]}; "
                          "nothing was changed (the migration needs fixing)")


def _check_known(found: str | None, config: Config, head: str) -> None:
    if found is None:
        return
    try:
        ScriptDirectory.from_config(config).get_revision(found)
    except CommandError:
        raise SchemaError(f"the database is at revision {found}, which this release does not know (its newest is "
                          f"{head}): a newer Standby upgraded it. Run that release, or restore the backup taken "
                          "before upgrading") from None


def _adopt_pre_migration_tables(connection: Connection, config: Config) -> bool:
    """Stamp a database made by `create_all` (releases before migrations) at the baseline;
    False when it has none of Standby's tables (a new database)."""
    expected = baseline_schema()
    inspector = inspect(connection)
    present = set(inspector.get_table_names())
    if not present & set(expected):
        return False
    missing = [table for table in expected if table not in present]
    missing += [f"{table}.{column}" for table, columns in expected.items() if table in present
                for column in sorted(columns - {c["name"] for c in inspector.get_columns(table)})]
    if missing:
        raise SchemaError(
            f"the database has Standby tables but no migration record, and lacks {', '.join(missing)}: it was "
            "not made by the release before migrations (commit da31137). Upgrade it with that release "
            "first, or restore a backup it made, then start this one")
    command.stamp(config, BASELINE)
    return True


def baseline_schema() -> dict[str, set[str]]:
    """Tables and their columns as the baseline creates them, read back from a scratch
    database it has run on (so the migration stays the one place they are written)."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as connection:
            command.upgrade(alembic_config(connection), BASELINE)
            inspector = inspect(connection)
            return {table: {column["name"] for column in inspector.get_columns(table)}
                    for table in inspector.get_table_names() if table != "alembic_version"}
    finally:
        scratch.dispose()
