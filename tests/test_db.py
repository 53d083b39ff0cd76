"""The shared database: several processes open a fresh one at once (`app.py up`, compose)."""
from __future__ import annotations

import multiprocessing

from common.db import Database


def _open(url: str, results) -> None:
    try:
        Database(url).engine.dispose()
        results.put("ok")
    except Exception as exc:  # reported to the test, not raised in the child
        results.put(repr(exc))


def test_processes_racing_to_create_the_schema_all_succeed(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        url = f"sqlite:///{tmp_path / f'race{round_}.db'}"
        results = ctx.Queue()
        procs = [ctx.Process(target=_open, args=(url, results)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = [results.get(timeout=5) for _ in procs]
        assert outcomes == ["ok"] * 6, outcomes
