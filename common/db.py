"""Database engine and sessions for processes without a Flask app (worker, proxy, scripts)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import time

from sqlalchemy import create_engine, event
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from common.models import Base


def engine_options(database_url: str) -> dict:
    """Options shared with Flask-SQLAlchemy so every process opens the database the same way."""
    if database_url.startswith("sqlite"):
        # Web, proxy and worker share one SQLite file: wait for locks instead of failing.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    return {"pool_pre_ping": True}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the proxy and the web app read while the worker writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def install_sqlite_pragmas(engine: Engine) -> None:
    if engine.url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)


def make_engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite:///"):
        from pathlib import Path

        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url, **engine_options(database_url))
    install_sqlite_pragmas(engine)
    return engine


def create_schema(engine: Engine, attempts: int = 10) -> None:
    """Create missing tables. Web app, proxy workers and worker start together on a fresh
    database and race to create the same tables: the loser sees "already exists" and looks again."""
    for attempt in range(attempts):
        try:
            Base.metadata.create_all(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            if "already exists" not in str(exc) and "duplicate key" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


class Database:
    """A session factory; `with db.session() as s:` commits on success, rolls back on error."""

    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        create_schema(self.engine)
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
