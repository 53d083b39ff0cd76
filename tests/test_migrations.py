"""Schema migrations (common/schema.py, common/migrations): new databases, databases made by the
last release before migrations, later migrations over existing rows, and the guard that fails
when common/models.py changes without a migration. On SQLite and on PostgreSQL.

The previous release's schema is made here as that release made it, with `create_all` of its
models: a verbatim copy of them is checked in (tests/releases/models_da31137.py) so these tests
run from a tarball without git history too; when history is there, a test checks the copy.
"""
from __future__ import annotations

import functools
import importlib.util
import multiprocessing
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from common.db import Database
from common.models import ApiKey, Base, Endpoint, Model
from common.schema import (
    BASELINE,
    MIGRATIONS_DIR,
    SchemaError,
    current_revision,
    describe_current,
    head_revision,
    new_revision,
    schema_diff,
    upgrade,
    wait_until_current,
)
from tests.pg_cluster import MISSING, fresh_database, pg_bin, postgres_cluster

ROOT = Path(__file__).resolve().parent.parent
RELEASE = "da31137"
RELEASE_MODELS = Path(__file__).resolve().parent / "releases" / f"models_{RELEASE}.py"
pytestmark = pytest.mark.timeout(120)


@functools.cache
def release_models():
    """The models module of the last release before migrations, under a name of its own."""
    name = f"standby_release_{RELEASE}_models"
    spec = importlib.util.spec_from_file_location(name, RELEASE_MODELS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # SQLAlchemy resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pg_cluster():
    if pg_bin() is None:
        pytest.skip(MISSING)
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty database: a SQLite file in a data dir, or a new database in a throwaway cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'standby.db'}"
    return fresh_database(request.getfixturevalue("pg_cluster"))


def engine_for(database_url: str) -> sa.Engine:
    return Database(database_url).engine


# ---------------------------------------------------------------- the previous release's database


def make_release_database(database_url: str) -> None:
    """What the last release did on start: `create_all`, then users and the worker added rows."""
    old = release_models()
    engine = engine_for(database_url)
    old.Base.metadata.create_all(engine)
    t0 = datetime(2026, 11, 20, 9, 30, tzinfo=timezone.utc)
    with Session(engine) as s:
        model = old.Model(name="embedder", description="sentence embeddings", created_at=t0)
        model.versions = [
            old.ModelVersion(number=1, kind="archive", archive_path="models/embedder/1.tar.gz",
                             archive_size=123456, archive_sha256="ab" * 32, created_at=t0),
            old.ModelVersion(number=2, kind="git", git_url="https://example.invalid/embedder.git", git_ref="main",
                             resolved_commit="c0ffee" * 6, created_at=t0 + timedelta(hours=1)),
        ]
        s.add(model)
        s.flush()
        server = old.Endpoint(
            name="tts", description="text to speech", start_command="python serve.py --port $PORT", port=9000,
            env=[{"key": "HF_TOKEN", "value": "hf_secret_value", "secret": True},
                 {"key": "MODE", "value": "fast", "secret": False}],
            gpu_type="T4", gpu_count=1, cpu_cores=2.5, memory_gb=7.5, min_instances=0, max_instances=3,
            idle_retention_seconds=900, health_path="/healthz", max_concurrency=4, balancing="least_connections",
            sticky_sessions=True, status="running", status_reason="", created_at=t0, spec_updated_at=t0,
            status_updated_at=t0 + timedelta(minutes=5))
        routes = old.Endpoint(
            name="embed", source_kind="routes", model_version_id=model.versions[0].id,
            routes=[{"verb": "POST", "path": "/embed", "file": "model.py", "function": "embed",
                     "params": [{"name": "texts", "type": "list[str]", "kind": "keyword"}]}],
            status="stopped", stopped_at=t0 + timedelta(days=1), purge_at=t0 + timedelta(days=15),
            created_at=t0, spec_updated_at=t0)
        s.add_all([server, routes])
        s.flush()
        s.add_all([
            old.Instance(id="xykemlvy", endpoint_id=server.id, generation=2, status="ready", host="gpu-1",
                         address="127.0.0.1:43121", port=43121, gpu_type="T4", gpus=[0], pid=4242,
                         workdir="/data/instances/xykemlvy", log_path="/data/logs/xykemlvy.log", created_at=t0,
                         started_at=t0 + timedelta(seconds=3), ready_at=t0 + timedelta(seconds=9)),
            old.Instance(id="qqstoppd", endpoint_id=routes.id, status="stopped", reason="idle", host="gpu-1",
                         gpus=[], created_at=t0, ready_at=t0, stopped_at=t0 + timedelta(hours=2),
                         gpu_seconds=7200.0),
            old.Event(endpoint_id=server.id, instance_id="xykemlvy", kind="ready", message="instance ready", at=t0),
            old.Event(endpoint_id=routes.id, kind="stopped", message="stopped by user", at=t0),
            old.ApiKey(endpoint_id=server.id, name="ci", prefix="sk-abcd", key_hash="f" * 64, created_at=t0),
            old.ApiKey(endpoint_id=server.id, name="old", prefix="sk-zzzz", key_hash="e" * 64, created_at=t0,
                       revoked_at=t0 + timedelta(days=2)),
        ])
        s.commit()
    engine.dispose()


def every_row(database_url: str) -> dict[str, list[tuple]]:
    """Every row of every table of the release, read through that release's table definitions."""
    old = release_models()
    engine = engine_for(database_url)
    try:
        with engine.connect() as connection:
            return {name: [tuple(row) for row in connection.execute(
                        select(table).order_by(*table.primary_key.columns))]
                    for name, table in old.Base.metadata.tables.items()}
    finally:
        engine.dispose()


def test_the_checked_in_release_models_are_that_commit_s():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git history here (a tarball): the checked-in copy is used as it is")
    shown = subprocess.run(["git", "show", f"{RELEASE}:common/models.py"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"commit {RELEASE} is not in this clone's history ({shown.stderr.strip()})")
    assert RELEASE_MODELS.read_text() == shown.stdout


def test_previous_release_database_is_adopted_with_every_row_intact(database_url):
    make_release_database(database_url)
    before = every_row(database_url)
    assert {name: len(rows) for name, rows in before.items()} == {
        "models": 1, "model_versions": 2, "endpoints": 2, "instances": 2, "events": 2, "api_keys": 2}
    assert "adopts them" in describe_current(database_url)

    done = upgrade(database_url)

    assert (done.before, done.after, done.adopted) == (None, head_revision(), True)
    assert current_revision(database_url) == head_revision()
    assert every_row(database_url) == before
    # And through this release's models, as the web app, worker and proxy read them.
    db = Database(database_url)
    try:
        with db.session() as s:
            tts = s.scalar(select(Endpoint).where(Endpoint.name == "tts"))
            assert {"key": "HF_TOKEN", "value": "hf_secret_value", "secret": True} in tts.env
            assert [i.id for i in tts.instances] == ["xykemlvy"] and tts.instances[0].gpus == [0]
            assert sorted(k.prefix for k in tts.api_keys) == ["sk-abcd", "sk-zzzz"]
            updated = tts.status_updated_at  # SQLite gives it back without its zone (UTC), PostgreSQL with
            assert updated.replace(tzinfo=updated.tzinfo or timezone.utc) == datetime(2026, 11, 20, 9, 35,
                                                                                      tzinfo=timezone.utc)
            embed = s.scalar(select(Endpoint).where(Endpoint.name == "embed"))
            assert embed.routes[0]["params"][0]["type"] == "list[str]"
            model = s.scalar(select(Model).where(Model.name == "embedder"))
            assert [v.number for v in model.versions] == [1, 2]
            assert embed.model_version_id == model.versions[0].id
            # Made before projects existed: in the project `default` (issue 12's migration).
            from common.account_models import Project

            assert s.get(Project, 1).name == "default" and s.get(Project, 1).max_endpoints == 20
            assert tts.project_id == embed.project_id == model.project_id == 1
            new = Project(name="made-after")  # the id sequence goes on after the default's id
            s.add(new)
            s.flush()
            assert new.id == 2
    finally:
        db.engine.dispose()
    assert upgrade(database_url).before == head_revision()  # the next start finds nothing to do


def test_pre_migration_database_missing_a_column_is_refused_untouched(tmp_path):
    url = f"sqlite:///{tmp_path / 'standby.db'}"
    make_release_database(url)
    engine = engine_for(url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE instances DROP COLUMN gpu_seconds"))
    engine.dispose()
    with pytest.raises(SchemaError, match=r"lacks instances\.gpu_seconds.*da31137"):
        upgrade(url)
    engine = engine_for(url)
    assert "alembic_version" not in inspect(engine).get_table_names()
    engine.dispose()


# ---------------------------------------------------------------- new databases, the baseline


def test_new_database_is_created_by_the_migrations(database_url):
    assert describe_current(database_url).startswith("none (empty database)")
    done = upgrade(database_url)
    assert (done.before, done.after, done.adopted) == (None, head_revision(), False)
    assert describe_current(database_url) == f"{head_revision()} (head)"
    engine = engine_for(database_url)
    try:
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


def reflected(database_url: str) -> dict:
    """Everything about the tables that the database itself reports."""
    engine = engine_for(database_url)
    try:
        insp = inspect(engine)
        return {table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)],
            "primary_key": insp.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted((fk["name"], tuple(fk["constrained_columns"]), fk["referred_table"],
                                    tuple(fk["referred_columns"]), fk["options"].get("ondelete"))
                                   for fk in insp.get_foreign_keys(table)),
            "indexes": sorted((ix["name"], tuple(ix["column_names"]), ix["unique"]) for ix in insp.get_indexes(table)),
            "unique": sorted((uc["name"], tuple(uc["column_names"])) for uc in insp.get_unique_constraints(table)),
        } for table in insp.get_table_names() if table != "alembic_version"}
    finally:
        engine.dispose()


def test_baseline_creates_exactly_what_the_release_created(database_url):
    made_by_release = database_url
    made_by_migrations = (database_url.replace("standby.db", "migrated.db") if database_url.startswith("sqlite")
                          else fresh_database(database_url))
    engine = engine_for(made_by_release)
    release_models().Base.metadata.create_all(engine)
    engine.dispose()
    from alembic import command

    from common.schema import alembic_config

    engine = engine_for(made_by_migrations)
    with engine.begin() as connection:  # the baseline alone: later revisions add to it
        command.upgrade(alembic_config(connection), BASELINE)
    engine.dispose()
    assert reflected(made_by_migrations) == reflected(made_by_release)


def test_baseline_downgrades_to_an_empty_database(tmp_path):
    from alembic import command

    from common.schema import alembic_config

    url = f"sqlite:///{tmp_path / 'standby.db'}"
    upgrade(url)
    engine = engine_for(url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert inspect(engine).get_table_names() == ["alembic_version"]
    engine.dispose()
    assert current_revision(url) is None


# ---------------------------------------------------------------- the models/migrations guard


def test_models_match_the_newest_migration(database_url):
    """Fails when common/models.py changes without a migration: run
    `python app.py db revision -m "..." --autogenerate`, review the file, commit it (README.md "Upgrading")."""
    upgrade(database_url)
    engine = engine_for(database_url)
    try:
        with engine.connect() as connection:
            diff = schema_diff(connection)
    finally:
        engine.dispose()
    assert diff == [], f"common/models.py differs from the newest migration: {diff}"


def models_with_a_new_column() -> sa.MetaData:
    """The models plus one column a developer might add (never shipped: tests only)."""
    metadata = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    metadata.tables["endpoints"].append_column(sa.Column("owner", sa.String(64), nullable=False, server_default=""))
    return metadata


def test_a_model_change_without_a_migration_is_caught(tmp_path):
    url = f"sqlite:///{tmp_path / 'standby.db'}"
    upgrade(url)
    engine = engine_for(url)
    with engine.connect() as connection:
        diff = schema_diff(connection, models_with_a_new_column())
    engine.dispose()
    assert [(op[0], op[2], op[3].name) for op in diff] == [("add_column", "endpoints", "owner")]


def versions_copy(tmp_path: Path) -> Path:
    versions = tmp_path / "versions"
    shutil.copytree(MIGRATIONS_DIR / "versions", versions, ignore=shutil.ignore_patterns("__pycache__"))
    return versions


def test_autogenerated_migration_adds_the_column_to_a_release_database(database_url, tmp_path):
    """The developer's path end to end: change a model, autogenerate, upgrade a user's database."""
    versions = versions_copy(tmp_path)
    path = new_revision("endpoint owner", autogenerate=True, versions_dir=versions,
                        metadata=models_with_a_new_column())
    assert path.parent == versions and path.name.endswith("_endpoint_owner.py")
    assert "add_column" in path.read_text() and "owner" in path.read_text()
    make_release_database(database_url)
    before = every_row(database_url)

    done = upgrade(database_url, versions_dir=versions)

    assert done.adopted and done.after == head_revision(versions) != BASELINE
    assert every_row(database_url) == before
    engine = engine_for(database_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT name, owner FROM endpoints ORDER BY id")).all() == [
                ("tts", ""), ("embed", "")]
            assert schema_diff(connection, models_with_a_new_column()) == []
    finally:
        engine.dispose()
    with pytest.raises(SchemaError, match="nothing to generate"):
        new_revision("again", autogenerate=True, versions_dir=versions, metadata=models_with_a_new_column())


def test_a_hand_written_migration_starts_from_the_template(tmp_path):
    versions = versions_copy(tmp_path)
    path = new_revision("backfill statuses", autogenerate=False, versions_dir=versions)
    assert f"down_revision = {head_revision()!r}" in path.read_text()
    url = f"sqlite:///{tmp_path / 'standby.db'}"
    assert upgrade(url, versions_dir=versions).after == head_revision(versions) == path.name.split("_")[1]


def write_revision(versions: Path, revision: str, body: str) -> None:
    (versions / f"{revision}.py").write_text(
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = {revision!r}\ndown_revision = {head_revision()!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade():\n{body}\n")


def test_copying_a_table_keeps_the_rows_that_reference_it(database_url, tmp_path):
    """SQLite alters a column by copying its table and dropping the old one: with foreign keys
    on, that drop would delete every instance, event and key of every endpoint (ON DELETE CASCADE)."""
    versions = versions_copy(tmp_path)
    # A new default: SQLite can only copy the table for it, PostgreSQL alters it in place.
    write_revision(versions, "copyendpoints", "    with op.batch_alter_table('endpoints') as batch:\n"
                                              "        batch.alter_column('description', existing_type=sa.Text(),"
                                              " server_default='')\n")
    make_release_database(database_url)
    before = every_row(database_url)
    upgrade(database_url, versions_dir=versions)
    assert current_revision(database_url) == "copyendpoints"
    assert every_row(database_url) == before


def test_a_failing_migration_changes_nothing(database_url, tmp_path):
    versions = versions_copy(tmp_path)
    write_revision(versions, "breaks", "    op.add_column('endpoints', sa.Column('half', sa.Integer()))\n"
                                       "    raise RuntimeError('migration bug')\n")
    with pytest.raises(RuntimeError, match="migration bug"):
        upgrade(database_url, versions_dir=versions)
    # One transaction: not even the baseline's tables are left behind.
    engine = engine_for(database_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert upgrade(database_url).after == head_revision()  # and the release's own migrations still run


def test_database_upgraded_by_a_newer_release_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'standby.db'}"
    upgrade(url)
    engine = engine_for(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="f00dfeedbeef, which this release does not know"):
        upgrade(url)
    with pytest.raises(SchemaError, match="does not know"):
        wait_until_current(url, timeout=5)


# ---------------------------------------------------------------- processes starting together


def _upgrade_in_child(url: str, results) -> None:
    try:
        results.put(str(upgrade(url)))
    except Exception as exc:  # reported to the test, not raised in the child
        results.put(repr(exc))


def test_processes_upgrading_a_release_database_together_adopt_it_once(database_url):
    make_release_database(database_url)
    before = every_row(database_url)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_upgrade_in_child, args=(database_url, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == sorted([f"adopted tables made before migrations at {BASELINE}, upgraded to {head_revision()}"]
                              + [f"schema current at {head_revision()}"] * 3), outcomes
    assert every_row(database_url) == before


def test_the_proxy_waits_until_a_writer_has_upgraded(tmp_path):
    url = f"sqlite:///{tmp_path / 'standby.db'}"
    with pytest.raises(SchemaError, match="app.py db upgrade"):
        wait_until_current(url, timeout=0.3, interval=0.1)
    upgrader = threading.Timer(0.5, upgrade, args=(url,))
    upgrader.start()
    started = time.monotonic()
    try:
        assert wait_until_current(url, timeout=30, interval=0.1) == head_revision()
    finally:
        upgrader.join()
    assert time.monotonic() - started >= 0.4


def test_web_app_creates_no_tables(tmp_path):
    from tests.conftest import free_port

    from common.config import load_settings
    from webapp import create_app
    from webapp.extensions import db

    settings = load_settings({"STANDBY_DATA_DIR": str(tmp_path / "data"),
                              "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
    app = create_app({"TESTING": True, "STANDBY_SETTINGS": settings, "SECRET_KEY": "test"})
    try:
        with app.app_context():
            assert inspect(db.engine).get_table_names() == []
    finally:
        app.extensions["temporal_bridge"].close()
        with app.app_context():
            db.engine.dispose()


def test_db_commands(tmp_path):
    env = {"STANDBY_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    url = f"sqlite:///{tmp_path / 'data' / 'standby.db'}"
    make_release_database(url)

    def db(*args: str) -> str:
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), "db", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert db("current").startswith("none: tables made before migrations existed")
    assert db("upgrade") == f"adopted tables made before migrations at {BASELINE}, upgraded to {head_revision()}"
    assert db("current") == f"{head_revision()} (head)"
    assert db("upgrade") == f"schema current at {head_revision()}"
    refused = subprocess.run([sys.executable, str(ROOT / "app.py"), "db", "revision", "-m", "nothing",
                              "--autogenerate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "nothing to generate" in refused.stderr
    assert not list((MIGRATIONS_DIR / "versions").glob("*_nothing.py"))
