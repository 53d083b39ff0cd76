"""Git sources: one validation of URLs and refs for the registry, the endpoint API and form, and
the worker; clones bounded in time, in their own process group, killed when cancelled or when
the worker exits."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from common.config import load_settings
from common.git_source import git_ref_error, git_url_error
from tests.conftest import web_app
from tests.test_sources import make_git_repo
from workers import sources
from workers.sources import SourceError, git_environment, populate_routes_source

ROOT = Path(__file__).resolve().parent.parent
ROUTES = [{"method": "POST", "path": "/add", "file": "arith.py", "function": "add"}]


# ---- the shared rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://github.com/org/m.git", "ssh://git@host:2222/m.git", "git@host:org/m.git",
                                 "https://[::1]:8443/m.git"])
def test_network_urls_are_allowed(url):
    assert git_url_error(url) is None and git_url_error(url, allow_file=True) is None


@pytest.mark.parametrize("url, fragment", [
    ("ext::sh -c touch% /tmp/pwned", "spaces"), ("ext::sh", "transport helpers"), ("fd::0", "transport helpers"),
    ("fd::3,4", "transport helpers"), ("--upload-pack=touch /tmp/x", "start with '-'"),
    ("http://example.com/m.git", "https://"), ("git://example.com/m.git", "https://"),
    ("ftp://example.com/m.git", "https://"), ("https://-oProxyCommand=x/m.git", "host name"),
    ("ssh://-oProxyCommand=x/m.git", "host name"), ("git@-oProxyCommand:m", "host name"),
    ("file:///srv/m.git", "STANDBY_ALLOW_FILE_GIT"), ("/srv/m.git", "STANDBY_ALLOW_FILE_GIT"),
    ("relative/repo", "https://"), ("https://h/\x00", "control"), ("https://h/" + "a" * 3000, "at most"),
])
def test_refused_urls_say_what_to_use(url, fragment):
    assert fragment in git_url_error(url)


def test_local_repositories_need_the_setting():
    assert git_url_error("file:///srv/m.git", allow_file=True) is None
    assert git_url_error("/srv/m", allow_file=True) is None
    assert "absolute path" in git_url_error("file://srv/m", allow_file=True)


@pytest.mark.parametrize("ref", ["-x", "--upload-pack=touch /tmp/x", "a..b", "has space", "a\x01", "/abs", "x.lock",
                                 "", "a" * 256])
def test_refused_refs(ref):
    assert git_ref_error(ref)


@pytest.mark.parametrize("body, field", [
    ({"git_url": "ext::sh -c touch% /tmp/pwned", "git_ref": "main"}, "git_url"),
    ({"git_url": "fd::0", "git_ref": "main"}, "git_url"),
    ({"git_url": "https://example.com/m.git", "git_ref": "--upload-pack=touch /tmp/pwned"}, "git_ref"),
    ({"git_url": "https://example.com/m.git", "git_ref": "a..b"}, "git_ref"),
    ({"git_url": "file:///srv/m.git", "git_ref": "main"}, "git_url"),
    ({"git_url": "http://example.com/m.git", "git_ref": "main"}, "git_url"),
])
def test_the_endpoint_api_refuses_what_the_registry_refuses(client, body, field):
    endpoint = client.post("/api/v1/endpoints", json={"name": "gitty", "source_kind": "routes", "routes": ROUTES,
                                                      **body})
    assert endpoint.status_code == 400 and field in endpoint.get_json()["errors"], endpoint.get_json()
    assert client.post("/api/v1/models", json={"name": "m"}).status_code in (201, 400)
    version = client.post("/api/v1/models/m/versions", json=body)
    assert version.status_code == 400 and field in version.get_json()["errors"], version.get_json()


def test_file_urls_allowed_by_the_setting(tmp_path):
    for app in web_app(tmp_path, STANDBY_ALLOW_FILE_GIT="1"):
        response = app.test_client().post("/api/v1/endpoints", json={
            "name": "local", "source_kind": "routes", "routes": ROUTES, "git_url": f"file://{tmp_path}/repo",
            "git_ref": "main"})
        assert response.status_code in (201, 503), response.get_json()  # 503: Temporal is a closed port here


def test_git_runs_without_prompts_helpers_or_other_protocols(tmp_path):
    env = git_environment(load_settings({"STANDBY_DATA_DIR": str(tmp_path)}))
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_ALLOW_PROTOCOL"] == "https:ssh"
    assert env["GIT_CONFIG_KEY_0"] == "credential.helper" and env["GIT_CONFIG_VALUE_0"] == ""
    assert "BatchMode=yes" in env["GIT_SSH_COMMAND"]
    env = git_environment(load_settings({"STANDBY_DATA_DIR": str(tmp_path), "STANDBY_ALLOW_FILE_GIT": "1"}))
    assert env["GIT_ALLOW_PROTOCOL"] == "https:ssh:file"


# ---- clones that do not finish ------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A TCP server that accepts and never answers: git's https transport waits on it forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.getsockname()[1]}/model.git"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def live_in_group(pgid: int) -> list[int]:
    """Processes of a group that are still running (zombies excluded)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


@pytest.fixture
def started_groups(monkeypatch):
    groups: list[int] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        groups.append(os.getpgid(process.pid))
        return process

    monkeypatch.setattr(sources.subprocess, "Popen", recording_popen)
    return groups


def settings_with(tmp_path, **env):
    return load_settings({"STANDBY_DATA_DIR": str(tmp_path / "data"), **env})


def test_fd_transport_is_refused_at_once(tmp_path):
    settings = settings_with(tmp_path, STANDBY_MODEL_GIT_TIMEOUT_SECONDS="5")
    started = time.monotonic()
    with pytest.raises(SourceError, match="transport helpers"):
        populate_routes_source(settings, {"kind": "git", "git_url": "fd::0", "git_ref": "main"}, tmp_path / "w")
    assert time.monotonic() - started < 1


@pytest.mark.timeout(60)
def test_a_clone_past_its_timeout_is_killed_with_its_helpers(tmp_path, silent_server, started_groups):
    settings = settings_with(tmp_path, STANDBY_MODEL_GIT_TIMEOUT_SECONDS="2")
    started = time.monotonic()
    with pytest.raises(SourceError, match="took longer than 2 s"):
        populate_routes_source(settings, {"kind": "git", "git_url": silent_server, "git_ref": "main"}, tmp_path / "w")
    assert time.monotonic() - started < 10
    assert started_groups and started_groups[0] != os.getpgid(0)  # git ran in a group of its own
    assert live_in_group(started_groups[0]) == []


class Cancelled(BaseException):
    """Stands for temporalio's CancelledError, which activity.heartbeat raises once cancelled."""


@pytest.mark.timeout(60)
def test_a_cancelled_clone_is_killed(tmp_path, silent_server, started_groups):
    settings = settings_with(tmp_path, STANDBY_MODEL_GIT_TIMEOUT_SECONDS="600")

    def heartbeat(_detail):
        raise Cancelled()

    started = time.monotonic()
    with pytest.raises(Cancelled):
        populate_routes_source(settings, {"kind": "git", "git_url": silent_server, "git_ref": "main"}, tmp_path / "w",
                               heartbeat=heartbeat)
    assert time.monotonic() - started < 10
    assert started_groups and live_in_group(started_groups[0]) == []
    assert not list((tmp_path).glob(".clone-*"))


@pytest.mark.timeout(60)
def test_clones_die_with_the_worker_process(tmp_path, silent_server):
    """A worker exiting (Ctrl-C of `up` sends it SIGTERM) takes its running clones with it."""
    script = textwrap.dedent(f"""
        import os, sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from common.config import load_settings
        from workers import sources

        settings = load_settings({{"STANDBY_DATA_DIR": {str(tmp_path / "data")!r}}})
        real_popen = sources.subprocess.Popen
        def popen(*args, **kwargs):
            process = real_popen(*args, **kwargs)
            print(os.getpgid(process.pid), flush=True)
            return process
        sources.subprocess.Popen = popen
        work = {str(tmp_path / "w")!r}
        threading.Thread(target=sources.populate_routes_source, daemon=True,
                         args=(settings, {{"kind": "git", "git_url": {silent_server!r}, "git_ref": "main"}}, work)).start()
        time.sleep(1.5)
        sys.exit(0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    pgid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 5
    while live_in_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_in_group(pgid) == []


def test_local_clone_still_works_with_the_setting(tmp_path):
    commits = make_git_repo(tmp_path / "repo")
    settings = settings_with(tmp_path, STANDBY_ALLOW_FILE_GIT="1")
    workdir = tmp_path / "w" / "work"
    workdir.mkdir(parents=True)
    info = populate_routes_source(settings, {"kind": "git", "git_url": f"file://{tmp_path / 'repo'}", "git_ref": "main"},
                                  workdir)
    assert info.resolved_commit == commits["second"]
    with pytest.raises(SourceError, match="STANDBY_ALLOW_FILE_GIT"):
        populate_routes_source(settings_with(tmp_path), {"kind": "git", "git_url": str(tmp_path / "repo"),
                                                         "git_ref": "main"}, tmp_path / "w2")
