"""End-to-end lifecycle: real Temporal dev server, real worker subprocess, real instance processes."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import requests

from tests.conftest import wait_until
from workflows.contracts import (
    ERR_REPLICA_QUOTA,
    ScaleOutRequest,
    WakeRequest,
)
from temporalio.client import WorkflowUpdateFailedError

pytestmark = pytest.mark.timeout(180)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_create_wake_serve_and_idle_release(stack):
    stack.create_endpoint("web1", idle_retention_seconds=2)
    stack.wait_status("web1", "standby")
    assert stack.instances("web1") == []

    result = stack.update("web1", "wake_until_ready", WakeRequest(), timeout=60)
    assert isinstance(result, dict) or result  # the raw client returns a dict without a type hint
    stack.wait_status("web1", "running", 20)
    [inst] = stack.instances("web1")
    assert inst.status == "ready" and inst.address.startswith("127.0.0.1:")
    assert len(inst.id) == 8 and inst.id.isalpha()
    # The instance is a real python -m http.server answering on its own port.
    assert requests.get(f"http://{inst.address}/", timeout=5).status_code == 200
    assert pid_alive(inst.pid)

    # No traffic: released after the 2 s idle retention (+ drain grace), back to standby.
    stack.wait_status("web1", "standby", 30)
    [inst] = stack.instances("web1")
    assert inst.status == "stopped"
    wait_until(lambda: not pid_alive(inst.pid), 10, message="instance process to exit")
    kinds = [ev.kind for ev in stack.events("web1")]
    assert "instance_ready" in kinds and "instance_draining" in kinds and "instance_stopped" in kinds
    # CPU endpoint: nothing billed.
    assert inst.gpu_seconds == 0.0


def test_min_instances_kept_warm_and_replaced_when_dead(stack):
    stack.create_endpoint("warm", min_instances=1, idle_retention_seconds=1)
    stack.wait_status("warm", "running", 40)
    [first] = [i for i in stack.instances("warm") if i.status == "ready"]
    time.sleep(3)  # well past the idle retention: min instances are never released
    assert stack.endpoint("warm").status == "running"
    assert [i.id for i in stack.instances("warm") if i.status == "ready"] == [first.id]

    # Kill the instance's process behind the platform's back: recorded and replaced.
    os.killpg(first.pid, signal.SIGKILL)
    wait_until(lambda: any(i.status == "ready" and i.id != first.id for i in stack.instances("warm")), 40,
               message="a replacement instance")
    dead = [i for i in stack.instances("warm") if i.id == first.id][0]
    assert dead.status == "failed" and "died" in dead.reason
    assert any(ev.kind == "instance_died" for ev in stack.events("warm"))


def test_gpu_queue_fifo(stack):
    """Two endpoints want the only GPU: the second waits queued at position 1."""
    stack.create_endpoint("gpu-a", gpu_type="T4", gpu_count=1, idle_retention_seconds=3600)
    stack.create_endpoint("gpu-b", gpu_type="T4", gpu_count=1, idle_retention_seconds=3600)
    stack.wait_status("gpu-a", "standby")
    stack.wait_status("gpu-b", "standby")
    stack.signal("gpu-a", "wake")
    stack.wait_status("gpu-a", "running", 40)
    [a] = stack.instances("gpu-a")
    assert a.gpus == [0]
    log = open(a.log_path).read()
    assert "GPUs [0]" in log or "granted" in log or a.gpus == [0]

    stack.signal("gpu-b", "wake")
    stack.wait_status("gpu-b", "queued", 30)
    wait_until(lambda: stack.endpoint("gpu-b").queue_position == 1, 10, message="queue position 1")
    [b] = stack.instances("gpu-b")
    assert b.status == "queued" and b.queue_position == 1

    stack.signal("gpu-a", "stop")
    stack.wait_status("gpu-a", "stopped", 30)
    stack.wait_status("gpu-b", "running", 40)
    [b] = stack.instances("gpu-b")
    assert b.gpus == [0] and b.queue_position is None
    [a] = stack.instances("gpu-a")
    # Billed from ready to stopped, one GPU.
    assert a.gpu_seconds > 0
    assert abs(a.gpu_seconds - (a.stopped_at - a.ready_at).total_seconds()) < 0.01


def test_readiness_timeout_fails_endpoint_only_terminate_allowed(stack):
    # Listens, but never on the health path's answer: /ping returns 404 from http.server.
    stack.create_endpoint("broken", health_path="/ping", startup_timeout_seconds=3)
    stack.wait_status("broken", "standby")
    with pytest.raises(WorkflowUpdateFailedError):
        stack.update("broken", "wake_until_ready", WakeRequest(), timeout=60)
    e = stack.wait_status("broken", "failed", 30)
    assert "/ping" in e.status_reason
    [inst] = stack.instances("broken")
    assert inst.status == "failed"
    assert "/ping" in open(inst.log_path).read()
    wait_until(lambda: not pid_alive(inst.pid), 10, message="failed instance process gone")

    # stop and restart are refused; wake is rejected; terminate purges.
    stack.signal("broken", "restart")
    stack.signal("broken", "stop")
    time.sleep(1)
    assert stack.endpoint("broken").status == "failed"
    with pytest.raises(WorkflowUpdateFailedError):
        stack.update("broken", "wake_until_ready", WakeRequest(), timeout=30)
    stack.signal("broken", "terminate")
    stack.wait_status("broken", "terminated", 30)
    assert stack.instances("broken") == []


def test_early_exit_fails_fast(stack):
    stack.create_endpoint("crashy", start_command=f"{sys.executable} -c 'import sys; sys.exit(3)'",
                          startup_timeout_seconds=60)
    stack.wait_status("crashy", "standby")
    t0 = time.monotonic()
    stack.signal("crashy", "wake")
    e = stack.wait_status("crashy", "failed", 30)
    assert time.monotonic() - t0 < 30  # did not wait for the 60 s timeout
    assert "exit" in e.status_reason


def test_stop_restart_terminate(stack):
    src = stack.tmp_path / "src"
    src.mkdir(parents=True)
    (src / "hello.txt").write_text("hello")
    stack.create_endpoint("cycle", min_instances=1, source_dir=str(src))
    stack.wait_status("cycle", "running", 40)
    [first] = stack.instances("cycle")
    # The instance runs in a fresh copy of the source; write into it to prove restart wipes it.
    assert requests.get(f"http://{first.address}/hello.txt", timeout=5).text == "hello"
    open(os.path.join(first.workdir, "leftover.txt"), "w").write("from the last run")

    # A restart while an instance runs is a rolling restart (README.md "Revisions and updates"): the
    # fresh instance is ready before the old one leaves.
    stack.signal("cycle", "restart")
    wait_until(lambda: [i.status for i in stack.instances("cycle") if i.id == first.id] == ["stopped"], 40,
               message="the old instance replaced after restart")
    [second] = [i for i in stack.instances("cycle") if i.status == "ready"]
    [first] = [i for i in stack.instances("cycle") if i.id == first.id]
    assert second.ready_at < first.stopped_at
    assert not os.path.exists(os.path.join(second.workdir, "leftover.txt"))
    assert requests.get(f"http://{second.address}/leftover.txt", timeout=5).status_code == 404

    stack.signal("cycle", "stop")
    e = stack.wait_status("cycle", "stopped", 30)
    assert e.purge_at is not None and e.stopped_at is not None
    assert (e.purge_at - e.stopped_at).total_seconds() == pytest.approx(14 * 24 * 3600, abs=1)
    assert all(i.status == "stopped" for i in stack.instances("cycle"))
    # A stopped endpoint does not wake.
    with pytest.raises(WorkflowUpdateFailedError):
        stack.update("cycle", "wake_until_ready", WakeRequest(), timeout=30)
    stack.signal("cycle", "wake")
    time.sleep(1)
    assert stack.endpoint("cycle").status == "stopped"

    stack.signal("cycle", "restart")
    stack.wait_status("cycle", "running", 40)
    stack.signal("cycle", "terminate")
    stack.wait_status("cycle", "terminated", 30)
    assert stack.instances("cycle") == []
    assert stack.events("cycle")[-1].kind == "terminated"
    assert not os.path.exists(second.workdir)


def test_scale_out_and_quota(stack):
    stack.create_endpoint("scaly", max_instances=2, idle_retention_seconds=3600)
    stack.wait_status("scaly", "standby")
    first = stack.update("scaly", "wake_until_ready", WakeRequest(), timeout=60)
    second = stack.update("scaly", "scale_out", ScaleOutRequest(request_id="r1"), timeout=60)
    assert second["instance_id"] != first["instance_id"]
    ready = [i for i in stack.instances("scaly") if i.status == "ready"]
    assert {i.id for i in ready} == {first["instance_id"], second["instance_id"]}
    with pytest.raises(WorkflowUpdateFailedError) as info:
        stack.update("scaly", "scale_out", ScaleOutRequest(request_id="r2"), timeout=30)
    assert info.value.cause.type == ERR_REPLICA_QUOTA
    # Same request id again: idempotent, answers the same instance.
    again = stack.update("scaly", "scale_out", ScaleOutRequest(request_id="r1"), timeout=30)
    assert again["instance_id"] == second["instance_id"]


def test_worker_killed_while_provisioning(stack):
    """SIGKILL the worker while the instance starts; a new worker ends with exactly one instance."""
    marker = stack.tmp_path / "starts.txt"
    # The server takes 3 s to come up, so the kill lands while it is being started.
    cmd = (f"echo started >> {marker}; sleep 3; exec {sys.executable} -m http.server $PORT --bind 127.0.0.1")
    stack.create_endpoint("crashy-worker", start_command=cmd, min_instances=1, startup_timeout_seconds=90)
    wait_until(lambda: marker.exists(), 30, message="the instance command to start")
    stack.kill_worker(signal.SIGKILL)
    stack.start_worker()
    stack.wait_status("crashy-worker", "running", 90)
    time.sleep(2)
    live = [i for i in stack.instances("crashy-worker") if i.status not in ("stopped", "failed")]
    assert len(live) == 1
    # Exactly one instance process of this endpoint on the host.
    out = os.popen(f"pgrep -f 'echo started >> {marker}'").read().split()
    servers = [p for p in out if pid_alive(int(p))]
    assert len(servers) <= 1
    from workers.backends import make_backend

    running = make_backend(stack.settings).running_instance_ids()
    assert running == [live[0].id]
    # Adopted, not started again: the command ran once.
    assert marker.read_text().count("started") == 1, marker.read_text()
    assert any(ev.kind == "instance_adopted" for ev in stack.events("crashy-worker"))


def test_wake_during_drain_keeps_instance_then_idle_release(stack_factory):
    """Demand returning during a drain keeps the instance once; it is still released when idle."""
    # A long drain grace (refresh 6 s -> 8 s) so the wake lands while the instance drains.
    stack = stack_factory(extra_env={"STANDBY_PROXY_REFRESH_SECONDS": "6"})
    stack.create_endpoint("und", max_instances=1, idle_retention_seconds=1)
    stack.wait_status("und", "standby")
    first = stack.update("und", "wake_until_ready", WakeRequest(), timeout=60)
    wait_until(lambda: [i.status for i in stack.instances("und")] == ["draining"], 30, message="draining")
    again = stack.update("und", "wake_until_ready", WakeRequest(), timeout=60)
    assert again["instance_id"] == first["instance_id"]  # kept, not a cold start of another
    stack.wait_status("und", "standby", 40)
    [inst] = stack.instances("und")
    assert inst.status == "stopped"
    kinds = [ev.kind for ev in stack.events("und")]
    assert kinds.count("instance_undrained") == 1
    assert not stack.query("und")["wake_pending"]


def test_crash_loop_fails_the_endpoint(stack):
    """Instances that become ready and die again and again are not replaced forever."""
    cmd = f"exec timeout 2 {sys.executable} -m http.server $PORT --bind 127.0.0.1"
    stack.create_endpoint("crashloop", start_command=cmd, min_instances=1)
    e = stack.wait_status("crashloop", "failed", 90)
    assert "crash loop" in e.status_reason
    died = [i for i in stack.instances("crashloop") if i.status == "failed"]
    assert len(died) >= 3 and all(i.ready_at is not None for i in died)
    wait_until(lambda: not [i for i in stack.instances("crashloop") if i.status not in ("stopped", "failed")], 30,
               message="no live instance left")


def test_an_instance_killed_for_its_memory_says_so_in_its_events(stack):
    """README.md "Resources are enforced": memory_gb is a limit, and its breach is named."""
    from workers.cgroups import Cgroups

    if Cgroups().mode is None:
        pytest.skip("this host offers no usable cgroups: memory limits cannot be shown")
    # A server that becomes ready, then grows past its 0.25 GB.
    grows = (f"{sys.executable} -c \"import threading, http.server as h; "
             "threading.Timer(2, lambda: globals().__setitem__('b', bytearray(600 * 2**20))).start(); "
             "h.ThreadingHTTPServer(('127.0.0.1', $PORT), h.SimpleHTTPRequestHandler).serve_forever()\"")
    stack.create_endpoint("oom1", start_command=grows, memory_gb=0.25, min_instances=1, idle_retention_seconds=1)
    wait_until(lambda: any(ev.kind == "instance_died" for ev in stack.events("oom1")), 60,
               message="the instance to be killed for its memory")
    [died] = [ev for ev in stack.events("oom1") if ev.kind == "instance_died"][:1]
    assert "out of memory (OOM: 0.25 GB limit); raise memory_gb" in died.message, died.message
    stack.signal("oom1", "stop")  # no crash loop left behind for the next tests
