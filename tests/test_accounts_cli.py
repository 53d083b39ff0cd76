"""The operator's account commands (README.md "Accounts and projects"): `app.py create-user`,
`reset-password`, and the first admin `up` makes on a fresh install; run as an operator runs them,
then signed in with through the web app."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from common import accounts
from common.config import load_settings
from common.db import Database
from common.schema import upgrade
from tests.conftest import ROOT, anonymous_client, free_port
from webapp import create_app
from webapp.extensions import db


def run(data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STANDBY_DATA_DIR": str(data), "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def signs_in(data: Path, name: str, password: str) -> bool:
    settings = load_settings({"STANDBY_DATA_DIR": str(data), "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
    app = create_app({"TESTING": True, "STANDBY_SETTINGS": settings, "SECRET_KEY": "test", "WTF_CSRF_ENABLED": False})
    try:
        answer = anonymous_client(app).post("/login", data={"name": name, "password": password})
        return answer.status_code == 302
    finally:
        app.extensions["temporal_bridge"].close()
        with app.app_context():
            db.engine.dispose()


def test_create_user_prints_a_password_that_signs_in_and_reset_password_replaces_it(tmp_path):
    data = tmp_path / "data"
    made = run(data, "create-user", "ana", "--project", "ml", "--role", "viewer")
    assert made.returncode == 0, made.stderr
    password = re.search(r"password: (\S+)", made.stdout).group(1)
    assert "user ana, viewer of project ml" in made.stdout
    assert signs_in(data, "ana", password) and not signs_in(data, "ana", "wrong password")
    again = run(data, "create-user", "ana")
    assert again.returncode == 1 and "exists" in again.stderr and "reset-password" in again.stderr
    bad = run(data, "create-user", "Ana Smith")
    assert bad.returncode == 1 and "lowercase" in bad.stderr
    reset = run(data, "reset-password", "ana")
    assert reset.returncode == 0, reset.stderr
    new = re.search(r"password: (\S+)", reset.stdout).group(1)
    assert new != password and signs_in(data, "ana", new) and not signs_in(data, "ana", password)
    assert run(data, "reset-password", "nobody").returncode == 1
    admin = run(data, "create-user", "root-ops", "--admin")
    assert admin.returncode == 0 and "site admin root-ops" in admin.stdout


def test_the_first_admin_is_made_once_with_a_token_only_its_user_reads(tmp_path):
    settings = load_settings({"STANDBY_DATA_DIR": str(tmp_path / "data")})
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.database_url)
    database = Database(settings.database_url)
    try:
        with database.session() as session:
            first = accounts.bootstrap_first_admin(session, settings.data_dir)
        with database.session() as session:
            assert accounts.bootstrap_first_admin(session, settings.data_dir) is None  # never twice
            admin = accounts.get_user(session, "admin")
            assert admin.is_admin and accounts.password_matches(admin, first.password)
            token = first.token_file.read_text().strip()
            assert accounts.find_token(session, token).user_id == admin.id
    finally:
        database.engine.dispose()
    assert oct(first.token_file.stat().st_mode & 0o777) == "0o600"
