"""The proxy with the real lifecycle: Temporal dev server, worker, process backend, gunicorn proxy.

Cold starts shared by concurrent requests, hold-queue overflow, SSE keep-alives while held, a
stopped endpoint that must not wake, scale-out / 1007 through the workflow, and an idle
instance released only once its last in-flight request has ended (traffic reports).
"""
from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import wait_until
from tests.proxy_fixtures import ROOT

pytestmark = pytest.mark.timeout(180)

INSTANCE = f"{sys.executable} {ROOT / 'tests' / 'proxy_instance.py'} $PORT lifecycle"


def slow_instance(seconds: float) -> str:
    return f"sh -c 'sleep {seconds}; exec {sys.executable} {ROOT / 'tests' / 'proxy_instance.py'} $PORT slow'"


def url(stack, name: str, path: str) -> str:
    return f"{stack.proxy.url}/e/{name}{path}"


def live_instances(stack, name: str):
    return [i for i in stack.instances(name) if i.status not in ("stopped", "failed")]


def test_twenty_concurrent_requests_at_zero_start_one_instance(proxied):
    stack = proxied
    stack.create_endpoint("cold", start_command=INSTANCE, health_path="/ping", max_instances=3,
                          idle_retention_seconds=3600)
    stack.wait_status("cold", "standby")
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: requests.get(url(stack, "cold", "/echo"), timeout=60), range(20)))
    assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers if a.status_code != 200]
    assert len({a.headers["Deploy-Route-Target"] for a in answers}) == 1
    assert all(a.headers["Deploy-Cold-Start"] == "true" for a in answers)
    assert len(stack.instances("cold")) == 1
    # Once ready, the next request is served warm, straight from the routing view.
    warm = requests.get(url(stack, "cold", "/echo"), timeout=10)
    assert warm.status_code == 200 and warm.headers["Deploy-Cold-Start"] == "false"


def test_hold_queue_overflow_is_503_with_retry_after(proxied):
    stack = proxied
    stack.create_endpoint("small", start_command=slow_instance(3), health_path="/ping", hold_queue_size=2,
                          idle_retention_seconds=3600)
    stack.wait_status("small", "standby")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: requests.get(url(stack, "small", "/echo"), timeout=60), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 503, 503, 503, 503], [a.text for a in answers]
    for a in answers:
        if a.status_code == 503:
            assert int(a.headers["Retry-After"]) > 0 and "hold queue full" in a.json()["msg"]
    assert len(stack.instances("small")) == 1


def test_held_event_stream_client_gets_keepalive_comments(proxied):
    stack = proxied
    stack.create_endpoint("ssewake", start_command=slow_instance(2), health_path="/ping",
                          idle_retention_seconds=3600)
    stack.wait_status("ssewake", "standby")
    with requests.get(url(stack, "ssewake", "/sse?n=2&interval=0.1"), headers={"Accept": "text/event-stream"},
                      stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == b": waking"
    assert any(line.startswith(b": deploy-route-target ") for line in lines)
    assert sum(line.startswith(b"data:") for line in lines) == 3  # two events and "done"


def test_stopped_endpoint_answers_503_and_does_not_wake(proxied):
    stack = proxied
    stack.create_endpoint("halted", start_command=INSTANCE, health_path="/ping")
    stack.wait_status("halted", "standby")
    stack.signal("halted", "stop")
    stack.wait_status("halted", "stopped")
    time.sleep(0.5)  # routing view refresh
    r = requests.get(url(stack, "halted", "/echo"), timeout=30)
    assert r.status_code == 503 and "stopped" in r.json()["msg"]
    time.sleep(1)
    assert stack.instances("halted") == [] and stack.endpoint("halted").status == "stopped"


def test_scale_out_rule_starts_a_new_instance_then_1007(proxied):
    stack = proxied
    stack.create_endpoint("grow", start_command=INSTANCE, health_path="/ping", max_instances=2,
                          idle_retention_seconds=3600)
    stack.wait_status("grow", "standby")
    first = requests.get(url(stack, "grow", "/echo"), timeout=60)
    assert first.status_code == 200
    second = requests.get(url(stack, "grow", "/echo"), headers={"Deploy-Route-Rule": "scale-out"}, timeout=60)
    assert second.status_code == 200 and second.headers["Deploy-Cold-Start"] == "true"
    assert second.headers["Deploy-Route-Target"] != first.headers["Deploy-Route-Target"]
    assert len(live_instances(stack, "grow")) == 2
    third = requests.get(url(stack, "grow", "/echo"), headers={"Deploy-Route-Rule": "scale-out"}, timeout=60)
    assert third.status_code == 429 and third.json() == {"code": 1007, "msg": "deployment replica quota exceeded"}


def test_idle_instance_is_released_only_after_its_last_request_ends(proxied):
    stack = proxied
    stack.create_endpoint("busy-release", start_command=INSTANCE, health_path="/ping", idle_retention_seconds=2)
    stack.wait_status("busy-release", "standby")
    done = {}

    def long_request():
        r = requests.get(url(stack, "busy-release", "/sleep?s=8"), timeout=60)
        done["status"], done["at"] = r.status_code, time.time()

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_until(lambda: len(live_instances(stack, "busy-release")) == 1 and stack.endpoint("busy-release").status == "running",
               60, message="busy to be running")
    # Well past the idle retention, with the request still in flight: the instance stays ready.
    time.sleep(5)
    [inst] = live_instances(stack, "busy-release")
    assert inst.status == "ready" and "status" not in done
    thread.join(30)
    assert done["status"] == 200
    stack.wait_status("busy-release", "standby", 40)
    [inst] = stack.instances("busy-release")
    assert inst.status == "stopped" and inst.stopped_at.timestamp() >= done["at"] - 1
