"""The shared database: several processes bring a fresh one up to date at once (`app.py up`, compose)."""
from __future__ import annotations

import multiprocessing

from sqlalchemy import inspect

from common.db import Database
from common.schema import current_revision, head_revision, upgrade


def _upgrade(url: str, results) -> None:
    try:
        upgrade(url)
        Database(url).engine.dispose()
        results.put("ok")
    except Exception as exc:  # reported to the test, not raised in the child, with where it came from
        import traceback

        frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)]
        results.put(f"{exc!r} at {' < '.join(reversed(frames[-4:]))}")


def race_to_upgrade(url: str, processes: int = 6) -> list[str]:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_upgrade, args=(url, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [results.get(timeout=5) for _ in procs]


def test_processes_racing_to_create_the_schema_all_succeed(tmp_path):
    for round_ in range(5):
        url = f"sqlite:///{tmp_path / f'race{round_}.db'}"
        assert race_to_upgrade(url) == ["ok"] * 6
        assert current_revision(url) == head_revision()


def test_opening_a_database_creates_no_tables(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'standby.db'}")
    try:
        assert inspect(db.engine).get_table_names() == []
    finally:
        db.engine.dispose()
