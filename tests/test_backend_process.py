"""The process backend and workdir population, against real processes."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from common.config import Settings
from workers.backends import make_backend
from workers.backends.base import LaunchSpec
from workers.backends.process import ProcessBackend, substitute_port
from workers.health import probe, wait_until_ready
from workers.workdir import log_path_for, prepare_workdir, remove_instance_files, state_path_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", stop_grace_seconds=2.0, host="test-host")


@pytest.fixture
def backend(settings):
    backend = ProcessBackend(settings)
    try:
        yield backend
    finally:
        backend.stop_all(0.5)


def make_spec(settings, instance_id, command, source_dir=None, **kwargs) -> LaunchSpec:
    workdir = prepare_workdir(settings, instance_id, source_dir)
    return LaunchSpec(instance_id=instance_id, endpoint_name="ep", start_command=command, image="",
                      port=8080, workdir=str(workdir), log_path=str(log_path_for(settings, instance_id)),
                      **kwargs)


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pid_running(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return raw[raw.rindex(")") + 2] not in "ZX"


def processes_with_marker(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and pid_running(int(name)):
            try:
                environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"STANDBY_INSTANCE_STATE={marker}".encode() in environ:
                found.append(int(name))
    return found


HTTP_SERVER = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1"
SLEEPER = "sleep 300"


def test_http_server_launches_and_answers(settings, backend):
    spec = make_spec(settings, "web1", HTTP_SERVER)
    launched = backend.launch(spec)
    assert launched.host == "test-host"
    assert launched.address == f"127.0.0.1:{launched.port}"
    result = wait_until_ready(launched.address, "/", 15, lambda: backend.liveness("web1"), lambda: None)
    assert result.ready, result.reason
    assert probe(launched.address, "/", 2.0) == (True, "GET / -> HTTP 200")
    assert backend.liveness("web1").alive
    assert backend.running_instance_ids() == ["web1"]
    state = json.loads(state_path_for(settings, "web1").read_text())
    assert state["pid"] == launched.pid and state["port"] == launched.port
    # The state file lives outside the workdir, which is wiped on every restart.
    assert not str(state_path_for(settings, "web1")).startswith(spec.workdir)


def test_port_is_substituted_and_exported(settings, backend):
    command = ("printf '%s %s %s' {port} $PORT ${PORT} > ports.txt; "
               f"{sys.executable} -c \"import os; open('env.txt','w').write(os.environ['PORT'])\"")
    spec = make_spec(settings, "ports1", command)
    launched = backend.launch(spec)
    env_file = Path(spec.workdir) / "env.txt"
    wait_for(lambda: not backend.liveness("ports1").alive, what="command to finish")
    expected = str(launched.port)
    assert (Path(spec.workdir) / "ports.txt").read_text() == f"{expected} {expected} {expected}"
    assert env_file.read_text() == expected


def test_substitute_port_leaves_other_text_alone():
    assert substitute_port("run --port {port} $PORT ${PORT} $PORTS {ports} {}", 81) == \
        "run --port 81 81 81 $PORTS {ports} {}"


DUMP_ENV = f"{sys.executable} -c \"import json, os; json.dump(dict(os.environ), open('env.json', 'w'))\""


@pytest.mark.parametrize("gpus,expected", [([2, 3], "2,3"), ([], "")])
def test_environment_gpus_user_env_and_no_internal_leaks(settings, backend, monkeypatch, gpus, expected):
    monkeypatch.setenv("STANDBY_SECRET_KEY", "do-not-leak")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///secret.db")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    spec = make_spec(settings, "env1", DUMP_ENV, gpus=gpus, env={"MODEL": "tiny", "PORT": "1"})
    launched = backend.launch(spec)
    wait_for(lambda: not backend.liveness("env1").alive, what="command to finish")
    env = json.loads((Path(spec.workdir) / "env.json").read_text())
    assert env["CUDA_VISIBLE_DEVICES"] == expected
    assert env["MODEL"] == "tiny"
    # A user's env cannot take another port: the declared port, in the instance's own namespace.
    assert env["PORT"] == "8080" and launched.port != 8080
    assert env["STANDBY_INSTANCE_ID"] == "env1"
    assert "STANDBY_SECRET_KEY" not in env and "DATABASE_URL" not in env
    assert "PATH" in env


def test_output_goes_to_log_file(settings, backend):
    spec = make_spec(settings, "log1", "echo to-stdout; echo to-stderr >&2; exit 3")
    backend.launch(spec)
    wait_for(lambda: not backend.liveness("log1").alive, what="command to finish")
    liveness = backend.liveness("log1")
    assert liveness.exit_code == 3 and "code 3" in liveness.detail
    backend.stop("log1", 1.0)
    log = Path(spec.log_path).read_text()
    assert "to-stdout" in log and "to-stderr" in log
    assert "starting instance log1" in log and "stopped" in log


def test_stop_kills_the_whole_process_group(settings, backend):
    spec = make_spec(settings, "group1", "sleep 300 & echo $! > child.pid; wait")
    launched = backend.launch(spec)
    child_file = Path(spec.workdir) / "child.pid"
    wait_for(lambda: child_file.exists() and child_file.read_text().strip(), what="child pid")
    child = int(child_file.read_text())
    assert pid_running(child) and pid_running(launched.pid)
    backend.stop("group1", 2.0)
    wait_for(lambda: not pid_running(child), timeout=5, what="child to die")
    assert not pid_running(launched.pid)
    assert not backend.liveness("group1").alive
    assert backend.running_instance_ids() == []
    backend.stop("group1", 2.0)  # idempotent
    backend.stop("never-launched", 2.0)


def test_sigkill_after_grace_for_a_process_ignoring_sigterm(settings, backend):
    spec = make_spec(settings, "stubborn", "trap '' TERM; touch ready; sleep 300")
    launched = backend.launch(spec)
    wait_for(lambda: (Path(spec.workdir) / "ready").exists(), what="trap to be installed")
    started = time.monotonic()
    backend.stop("stubborn", 0.5)
    assert not pid_running(launched.pid)
    liveness = backend.liveness("stubborn")
    assert not liveness.alive
    assert liveness.exit_code == -signal.SIGKILL
    assert time.monotonic() - started < 8  # bounded: it did not wait for sleep 300


def test_relaunch_of_same_id_leaves_exactly_one_process(settings, backend):
    first = backend.launch(make_spec(settings, "dup1", SLEEPER))
    second = backend.launch(make_spec(settings, "dup1", SLEEPER))
    assert not pid_running(first.pid)
    assert pid_running(second.pid)
    marker = str(state_path_for(settings, "dup1"))
    # The shell may or may not exec `sleep`: whatever runs must all be the second launch's group.
    survivors = processes_with_marker(marker)
    assert second.pid in survivors
    assert {os.getpgid(pid) for pid in survivors} == {second.pid}
    assert backend.running_instance_ids() == ["dup1"]


def test_restarted_worker_finds_checks_and_replaces_instances(settings, backend):
    first = backend.launch(make_spec(settings, "crash1", SLEEPER))
    # A second backend object is a worker that restarted: it is not the parent.
    restarted = ProcessBackend(settings)
    try:
        assert restarted.running_instance_ids() == ["crash1"]
        assert restarted.liveness("crash1").alive
        second = restarted.launch(make_spec(settings, "crash1", SLEEPER))
        assert not pid_running(first.pid) and pid_running(second.pid)
    finally:
        restarted.stop_all(0.5)
    assert not restarted.liveness("crash1").alive


def test_process_without_state_file_is_found_by_its_marker(settings, backend):
    first = backend.launch(make_spec(settings, "orphan1", SLEEPER))
    # The worker crashed after spawning but before recording the process.
    state_path_for(settings, "orphan1").unlink()
    second = backend.launch(make_spec(settings, "orphan1", SLEEPER))
    assert not pid_running(first.pid) and pid_running(second.pid)


def test_liveness_after_exit_without_being_the_parent(settings, backend):
    backend.launch(make_spec(settings, "exit1", "exit 0"))
    wait_for(lambda: not backend.liveness("exit1").alive, what="exit")
    stranger = ProcessBackend(settings)
    liveness = stranger.liveness("exit1")
    assert not liveness.alive and liveness.exit_code is None and "no longer running" in liveness.detail
    assert not stranger.liveness("unknown").alive


def test_stop_all_stops_everything(settings, backend):
    pids = [backend.launch(make_spec(settings, f"all{i}", SLEEPER)).pid for i in range(3)]
    assert backend.running_instance_ids() == ["all0", "all1", "all2"]
    backend.stop_all(1.0)
    assert backend.running_instance_ids() == []
    assert not any(pid_running(pid) for pid in pids)


def test_launch_rejects_missing_workdir_and_empty_command(settings, backend, tmp_path):
    spec = make_spec(settings, "bad1", SLEEPER)
    spec.workdir = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        backend.launch(spec)
    with pytest.raises(ValueError, match="start_command is empty"):
        backend.launch(make_spec(settings, "bad1", "  "))
    with pytest.raises(ValueError, match="instance id"):
        backend.launch(LaunchSpec(instance_id="../x", endpoint_name="e", start_command="true",
                                  image="", port=0, workdir=str(tmp_path),
                                  log_path=str(tmp_path / "l")))


def test_make_backend_by_name(settings):
    assert make_backend(settings).name == "process"
    with pytest.raises(ValueError, match="use one of: process, docker"):
        make_backend(Settings(data_dir=settings.data_dir, backend="k8s"))


# -- workdir -----------------------------------------------------------------------------

def test_prepare_workdir_is_fresh_and_copies_links_as_links(settings, tmp_path):
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "app.py").write_text("print('hi')")
    (source / "link").symlink_to("/etc/hostname")
    workdir = prepare_workdir(settings, "wd1", source)
    assert workdir == settings.instances_dir / "wd1" / "work"
    assert (workdir / "pkg" / "app.py").read_text() == "print('hi')"
    assert (workdir / "link").is_symlink() and os.readlink(workdir / "link") == "/etc/hostname"
    (workdir / "leftover.txt").write_text("from the last run")
    again = prepare_workdir(settings, "wd1", None)
    assert again == workdir and list(again.iterdir()) == []


def test_prepare_workdir_rejects_bad_sources(settings, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_workdir(settings, "wd2", tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        prepare_workdir(settings, "wd2", tmp_path / "file")


def test_remove_instance_files(settings, backend):
    spec = make_spec(settings, "purge1", "echo hello")
    backend.launch(spec)
    wait_for(lambda: not backend.liveness("purge1").alive, what="exit")
    backend.stop("purge1", 1.0)
    remove_instance_files(settings, "purge1")
    assert not Path(spec.workdir).exists()
    assert not Path(spec.log_path).exists()
    assert not state_path_for(settings, "purge1").exists()
    remove_instance_files(settings, "purge1")  # idempotent


def test_concurrent_launches_from_threads_get_distinct_ports(settings, backend):
    from concurrent.futures import ThreadPoolExecutor

    specs = [make_spec(settings, f"thr{i}", SLEEPER) for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        launched = list(pool.map(backend.launch, specs))
    assert len({item.port for item in launched}) == 4
    assert backend.running_instance_ids() == ["thr0", "thr1", "thr2", "thr3"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda spec: backend.stop(spec.instance_id, 1.0), specs))
    assert backend.running_instance_ids() == []


FIXED_PORT_SERVER = f"{sys.executable} -m http.server 8080"


def test_fixed_port_commands_run_side_by_side_in_their_own_namespaces(settings, backend):
    """The tutorial's command, twice, on one host: each instance listens on 8080 in its own
    network namespace and is reached through its own host port."""
    launched = []
    for iid in ("fixed1", "fixed2"):
        spec = make_spec(settings, iid, FIXED_PORT_SERVER)
        (Path(spec.workdir) / "who.txt").write_text(iid)
        launched.append(backend.launch(spec))
    for iid, instance in zip(("fixed1", "fixed2"), launched):
        assert instance.port != 8080
        assert wait_until_ready(instance.address, "", 15, lambda i=iid: backend.liveness(i)).ready
        import urllib.request

        assert urllib.request.urlopen(f"http://{instance.address}/who.txt", timeout=5).read() == iid.encode()
    state = json.loads(state_path_for(settings, "fixed1").read_text())
    assert state["inner_port"] == 8080 and state["netns"] in ("net", "user+net")
    # Stopping the instance stops its relay and its server (one process group).
    marker = str(state_path_for(settings, "fixed1"))
    assert len(processes_with_marker(marker)) >= 2
    backend.stop("fixed1", 2.0)
    assert processes_with_marker(marker) == []
    assert backend.liveness("fixed2").alive


def test_fixed_port_refused_until_the_server_listens_inside(settings, backend):
    """Until the server listens, the host port refuses connections (as a plain server would), so
    the readiness probe's answer says what is going on."""
    spec = make_spec(settings, "late1", f"sleep 1; exec {FIXED_PORT_SERVER}")
    launched = backend.launch(spec)
    assert probe(launched.address, "", 1.0) == (False, "GET / -> connection refused")
    assert wait_until_ready(launched.address, "", 15, lambda: backend.liveness("late1")).ready


def test_fixed_port_exit_code_and_signal_are_the_servers(settings, backend):
    backend.launch(make_spec(settings, "code1", "echo bye; exit 7"))
    wait_for(lambda: not backend.liveness("code1").alive, what="exit")
    assert backend.liveness("code1").exit_code == 7
    launched = backend.launch(make_spec(settings, "kill1", "kill -9 $$"))
    wait_for(lambda: not backend.liveness("kill1").alive, what="exit")
    assert backend.liveness("kill1").exit_code == -9
    assert launched.pid


def test_fixed_port_refused_where_no_namespace_can_be_made(settings, backend, monkeypatch):
    from workers.backends.base import LaunchRefused
    import workers.backends.process as process_backend

    monkeypatch.setattr(process_backend, "namespace_mode", lambda: None)
    with pytest.raises(LaunchRefused, match=r"\$PORT"):
        backend.launch(make_spec(settings, "nons1", FIXED_PORT_SERVER))
    # $PORT commands need no namespace.
    launched = backend.launch(make_spec(settings, "nons2", HTTP_SERVER))
    assert wait_until_ready(launched.address, "", 15, lambda: backend.liveness("nons2")).ready


# ---- resources are enforced (README.md "Resources are enforced") --------------------------------

def _cgroups_or_skip(backend):
    if backend.cgroups is None or backend.cgroups.mode is None:
        pytest.skip("this host offers no usable cgroups (v2 with cpu/memory/pids, or v1): limits cannot be shown")
    return backend.cgroups


def test_an_instance_over_its_memory_is_killed_and_says_out_of_memory(backend, settings):
    _cgroups_or_skip(backend)
    hog = f"{sys.executable} -c \"b = bytearray(400 * 2**20); import time; time.sleep(30)\""
    spec = make_spec(settings, "oomtest1", f"{hog} # $PORT", memory_gb=0.25)
    backend.launch(spec)
    wait_for(lambda: not backend.liveness("oomtest1").alive, what="the kernel to kill the memory hog")
    liveness = backend.liveness("oomtest1")
    assert "out of memory (OOM: 0.25 GB limit); raise memory_gb" in liveness.detail, liveness.detail
    backend.stop("oomtest1", 1.0)
    assert not any(d.exists() for d in backend.cgroups._dirs("oomtest1")), "the cgroup is removed at stop"


def test_an_instance_within_its_memory_runs(backend, settings):
    _cgroups_or_skip(backend)
    fits = f"{sys.executable} -c \"b = bytearray(50 * 2**20); import time; time.sleep(30)\""
    backend.launch(make_spec(settings, "oomtest2", f"{fits} # $PORT", memory_gb=0.25))
    time.sleep(1.0)
    assert backend.liveness("oomtest2").alive


def test_cpu_is_limited_to_cpu_cores_and_everything_the_command_starts_is_inside(backend, settings):
    cgroups = _cgroups_or_skip(backend)
    # The shell starts a busy child: the child is limited too (it joined the cgroup with its parent).
    busy = f"{sys.executable} -c \"while True: pass\" & wait # $PORT"
    launched = backend.launch(make_spec(settings, "cputest1", busy, cpu_cores=0.2))
    time.sleep(0.3)
    directory = cgroups._dirs("cputest1")[0]
    members = set((directory / "cgroup.procs").read_text().split())
    assert str(launched.pid) in members and len(members) >= 2, members
    if cgroups.mode == "v2":
        assert (directory / "cpu.max").read_text().split() == ["20000", "100000"]
        assert (directory / "pids.max").read_text().strip() == "4096"
    else:
        assert (directory / "cpu.cfs_quota_us").read_text().strip() == "20000"
        assert (cgroups._dirs("cputest1")[2] / "pids.max").read_text().strip() == "4096"
    # Throttled by the kernel: over two seconds it gets about 0.4 s of CPU, whatever the host has.
    time.sleep(2.0)
    stat = dict(line.split() for line in (directory / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0, stat


def test_an_instance_that_outgrows_its_disk_is_stopped_and_says_why(settings, tmp_path):
    backend = ProcessBackend(Settings(data_dir=settings.data_dir, stop_grace_seconds=2.0, host="test-host",
                                      disk_check_seconds=0.0))
    try:
        grow = "fallocate -l 1100M big.bin && sleep 30 # $PORT"
        backend.launch(make_spec(settings, "disktest1", grow, disk_gb=1))
        wait_for(lambda: Path(backend._read_state("disktest1")["workdir"], "big.bin").exists(), what="the file")
        wait_for(lambda: backend.enforce_disk() == ["disktest1"] or not backend.liveness("disktest1").alive,
                 what="the watchdog")
        liveness = backend.liveness("disktest1")
        assert not liveness.alive and "out of disk" in liveness.detail and "past its 1 GB disk_gb" in liveness.detail
        assert backend.exited_instances() == {"disktest1": "ep"}  # so the exit watcher tells its workflow
        log = Path(log_path_for(settings, "disktest1")).read_text()
        assert "stopping instance disktest1: out of disk" in log
    finally:
        backend.stop_all(0.5)


def test_cgroups_off_runs_unlimited(settings):
    backend = ProcessBackend(Settings(data_dir=settings.data_dir, host="test-host", cgroups="off"))
    try:
        backend.launch(make_spec(settings, "nocg1", "sleep 30 # $PORT"))
        assert backend.cgroups is None and backend._read_state("nocg1")["cgroup"] is False
    finally:
        backend.stop_all(0.5)
