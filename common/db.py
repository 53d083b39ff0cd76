"""Database engine and sessions for processes without a Flask app (worker, proxy, scripts)."""
from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import URL, create_engine, event, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


def engine_options(database_url: str) -> dict:
    """Options shared with Flask-SQLAlchemy so every process opens the database the same way."""
    if database_url.startswith("sqlite"):
        # Web, proxy and worker share one SQLite file: wait for locks instead of failing.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    return {"pool_pre_ping": True}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the proxy and the web app read while the worker writes. The mode is kept in the
    # file, so only the first connection to a new database switches it; switching takes an
    # exclusive lock that SQLite's busy timeout does not wait for, so processes starting together
    # on a fresh database retry it for a while instead of failing with "database is locked".
    if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        deadline = time.monotonic() + 30.0
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def install_sqlite_pragmas(engine: Engine) -> None:
    if engine.url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)


def sqlite_file(database_url: str | URL) -> Path | None:
    """The file of a SQLite database URL; None for other databases and in-memory SQLite."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def make_engine(database_url: str) -> Engine:
    path = sqlite_file(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url, **engine_options(database_url))
    install_sqlite_pragmas(engine)
    return engine


class Database:
    """A session factory; `with db.session() as s:` commits on success, rolls back on error.

    Opening one never creates or changes tables: the schema is brought up to date on command
    (`python app.py db upgrade`, or each command's start), by common/schema.py.
    """

    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
