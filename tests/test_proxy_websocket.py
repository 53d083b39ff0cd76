"""WebSocket endpoints through the real proxy (README "WebSocket endpoints"), with a real client
library (`websockets`) and a real echo server instance (tests/ws_echo_instance.py).

Two worlds, one each per module: the data plane alone (rows written as the worker would, no
lifecycle: keys, route rules, the socket cap, drain, a client or an instance going away), and the
whole stack (Temporal, the worker, the process backend: a cold start through a WebSocket, frames
both ways, idle release waiting for the close, stop sending 1001).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import Stack, wait_until
from tests.proxy_fixtures import ROOT, WS_ECHO_SCRIPT, ProxyProcess, ProxyWorld, wait_for

pytestmark = pytest.mark.timeout(180)

GRACE = 0.6  # STANDBY_PROXY_WEBSOCKET_GRACE_SECONDS in both worlds


def ws_url(base: str, endpoint: str, path: str = "/") -> str:
    return base.replace("http://", "ws://") + f"/e/{endpoint}{path}"


def instance_state(address: str) -> dict:
    return requests.get(f"http://{address}/open", timeout=5).json()


def closed_with(ws, timeout: float = 10.0):
    """Read until the socket closes; the close frame the client received (code, reason)."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as closed:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    rcvd = closed.value.rcvd
    assert rcvd is not None, f"closed without a close frame: {closed.value!r}"
    return rcvd.code, rcvd.reason


# ---------------------------------------------------------------- the data plane alone
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = ProxyWorld(tmp_path_factory.mktemp("wsproxy"),
                   extra_env={"STANDBY_PROXY_WEBSOCKET_GRACE_SECONDS": str(GRACE)})
    try:
        w.add_endpoint("ws", websocket=True, max_instances=2)
        for inst in ("ws000001", "ws000002"):
            w.add_instance("ws", inst, script=WS_ECHO_SCRIPT)
        w.add_endpoint("wskeyed", websocket=True)
        w.add_instance("wskeyed", "wskey001", script=WS_ECHO_SCRIPT)
        w.add_key("wskeyed", "sk-ws-good-key")
        w.add_endpoint("plain")
        w.add_instance("plain", "plain001", script=WS_ECHO_SCRIPT)
        w.add_endpoint("wscap", websocket=True, max_websockets=1, max_instances=1)
        w.add_instance("wscap", "wscap001", script=WS_ECHO_SCRIPT)
        w.add_endpoint("wsdrain", websocket=True)
        w.add_instance("wsdrain", "wsdrn001", script=WS_ECHO_SCRIPT)
        w.add_endpoint("wsdies", websocket=True)
        w.add_instance("wsdies", "wsdie001", script=WS_ECHO_SCRIPT)
        w.start_proxy()
        yield w
    finally:
        w.stop()


def test_frames_flow_both_ways_unbuffered_and_in_order(world):
    with connect(ws_url(world.proxy.url, "ws", "/hello"), max_size=None) as ws:
        target = ws.response.headers["Deploy-Route-Target"]
        assert ws.response.headers["Deploy-Cold-Start"] == "false" and ws.response.headers["X-Request-Id"]
        assert ws.recv(timeout=5) == f"hello from {target}"
        # 1,000 text frames out while their echoes come back, both at once.
        sender = threading.Thread(target=lambda: [ws.send(f"frame {i}") for i in range(1000)])
        sender.start()
        echoed = [ws.recv(timeout=10) for _ in range(1000)]
        sender.join()
        assert echoed == [f"frame {i}" for i in range(1000)]
        # Binary frames of every length encoding (7-bit, 16-bit, 64-bit), and an empty one.
        for size in (0, 1, 125, 126, 65535, 65536, 3 * 1024 * 1024 + 7):
            payload = os.urandom(size)
            ws.send(payload)
            assert ws.recv(timeout=10) == payload, size
        # A ping goes to the instance, whose pong comes back.
        assert ws.ping(b"are you there").wait(5)
        ws.close()
    assert ws.close_code == 1000


def test_a_plain_request_to_a_websocket_service_is_forwarded_as_http(world):
    r = requests.get(world.url("ws", "/ping"), timeout=10)
    assert r.status_code == 200 and r.text == "ok\n" and r.headers["Deploy-Route-Target"] == r.headers["X-Instance"]


def test_route_rules_and_deploy_route_target_apply_to_the_handshake(world):
    for target in ("ws000002", "ws000001"):
        with connect(ws_url(world.proxy.url, "ws", "/hello"), additional_headers={"Deploy-Route-Rule": target}) as ws:
            assert ws.response.headers["Deploy-Route-Target"] == target
            assert ws.recv(timeout=5) == f"hello from {target}"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(world.proxy.url, "ws"), additional_headers={"Deploy-Route-Rule": "nosuch01"})
    assert refused.value.response.status_code == 404
    assert json.loads(refused.value.response.body)["code"] == 1006


def test_bearer_keys_apply_to_the_handshake(world):
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(world.proxy.url, "wskeyed"))
    assert refused.value.response.status_code == 401
    with connect(ws_url(world.proxy.url, "wskeyed"),
                 additional_headers={"Authorization": "Bearer sk-ws-good-key"}) as ws:
        ws.send("with a key")
        assert ws.recv(timeout=5) == "with a key"


def test_an_upgrade_to_an_endpoint_that_is_no_websocket_service_is_a_400_saying_so(world):
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(world.proxy.url, "plain"))
    assert refused.value.response.status_code == 400
    assert '\\"websocket\\": true' in json.loads(refused.value.response.body.decode())["msg"] or \
        '"websocket": true' in json.loads(refused.value.response.body.decode())["msg"]


def test_the_instance_refusing_the_upgrade_is_passed_on(world):
    # The echo server answers a handshake without a key with 400: its answer, not the proxy's.
    r = requests.get(world.url("ws", "/"), headers={"Upgrade": "websocket", "Connection": "Upgrade"}, timeout=10)
    assert r.status_code == 400 and r.headers.get("X-Instance", "").startswith("ws0000")


def test_past_max_websockets_a_socket_is_refused_with_503(world):
    first = connect(ws_url(world.proxy.url, "wscap"))
    try:
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(world.proxy.url, "wscap"))
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"]
        assert "max_websockets (1)" in json.loads(refused.value.response.body)["msg"]
    finally:
        first.close()
    # The slot is free again once the first one closed.
    wait_for(lambda: _echoes(world.proxy.url, "wscap"), 10, what="a socket after the first closed")


def _echoes(base: str, endpoint: str) -> bool:
    with connect(ws_url(base, endpoint)) as ws:
        ws.send("again")
        return ws.recv(timeout=5) == "again"


def test_when_the_client_goes_away_the_instance_socket_closes_at_once(world):
    address = world.instances["ws000001"].address
    ws = connect(ws_url(world.proxy.url, "ws"), additional_headers={"Deploy-Route-Rule": "ws000001"})
    ws.send("there")
    assert ws.recv(timeout=5) == "there"
    assert instance_state(address)["open"] >= 1
    # The client vanishes: no close frame, just the TCP connection cut.
    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.socket.close()
    state = wait_for(lambda: (s := instance_state(address))["open"] == 0 and s, 5, interval=0.02,
                     what="the instance's socket to close")
    assert state["last_close_code"] == 1001 and "client went away" in state["last_close_reason"]


def test_the_instance_closing_with_its_own_code_reaches_the_client(world):
    with connect(ws_url(world.proxy.url, "ws", "/close?code=4000")) as ws:
        ws.send("last words")
        assert ws.recv(timeout=5) == "last words"
        assert closed_with(ws) == (4000, "closing as asked")


def test_a_drained_instance_sockets_get_1001_after_the_grace(world):
    ws = connect(ws_url(world.proxy.url, "wsdrain"))
    ws.send("before")
    assert ws.recv(timeout=5) == "before"
    drained_at = time.monotonic()
    world.set_instance_status("wsdrn001", "draining")
    code, reason = closed_with(ws, 10)
    assert code == 1001 and "wsdrn001 is stopping" in reason
    assert time.monotonic() - drained_at >= GRACE
    state = instance_state(world.instances["wsdrn001"].address)
    assert state["open"] == 0 and state["last_close_code"] == 1001


def test_an_instance_that_dies_leaves_its_clients_a_1001_not_a_reset(world):
    ws = connect(ws_url(world.proxy.url, "wsdies"))
    ws.send("alive")
    assert ws.recv(timeout=5) == "alive"
    proc = world.instances["wsdie001"].proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)
    code, reason = closed_with(ws, 5)
    assert code == 1001 and "wsdie001 went away" in reason


# ---------------------------------------------------------------- the whole stack
@pytest.fixture(scope="module")
def stack(tmp_path_factory, temporal_server, runner):
    tmp = tmp_path_factory.mktemp("wsstack")
    st = Stack(tmp, temporal_server, runner, extra_env={"STANDBY_PROXY_WEBSOCKET_GRACE_SECONDS": str(GRACE),
                                                        "STANDBY_PROXY_LOG_LEVEL": "warning"})
    st.start_worker()
    proxy = ProxyProcess(st.env, tmp / "proxy.log")
    try:
        proxy.start()
        st.proxy = proxy
        yield st
    finally:
        proxy.stop()
        st.stop()


ECHO = f"{sys.executable} {ROOT / 'tests' / 'ws_echo_instance.py'} $PORT"


def test_a_websocket_wakes_its_endpoint_and_is_held_through_the_cold_start(stack):
    # As a user writes it: no health path (the port answering HTTP is ready), WebSocket service.
    stack.create_endpoint("wscold", start_command=ECHO, health_path="", websocket=True,
                          idle_retention_seconds=3600)
    stack.wait_status("wscold", "standby")
    with connect(ws_url(stack.proxy.url, "wscold", "/hello"), open_timeout=60) as ws:
        assert ws.response.headers["Deploy-Cold-Start"] == "true"
        [instance] = stack.instances("wscold")
        assert ws.response.headers["Deploy-Route-Target"] == instance.id
        assert ws.recv(timeout=5) == f"hello from ws"
        sender = threading.Thread(target=lambda: [ws.send(f"{i}".encode()) for i in range(1000)])
        sender.start()
        assert [ws.recv(timeout=10) for _ in range(1000)] == [f"{i}".encode() for i in range(1000)]
        sender.join()


def test_idle_release_waits_for_the_socket_to_close(stack):
    stack.create_endpoint("wsidle", start_command=ECHO, health_path="", websocket=True, idle_retention_seconds=2)
    stack.wait_status("wsidle", "standby")
    ws = connect(ws_url(stack.proxy.url, "wsidle"), open_timeout=60)
    try:
        ws.send("hold on")
        assert ws.recv(timeout=5) == "hold on"
        # Well past the idle retention with the socket open and silent: the instance stays.
        time.sleep(6)
        [instance] = stack.instances("wsidle")
        assert instance.status == "ready" and stack.endpoint("wsidle").status == "running"
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"
    finally:
        ws.close()
    closed_at = time.time()
    stack.wait_status("wsidle", "standby", 40)
    [instance] = stack.instances("wsidle")
    assert instance.status == "stopped" and instance.stopped_at.timestamp() >= closed_at + 1


def test_stopping_the_endpoint_sends_1001_to_its_sockets(stack):
    stack.create_endpoint("wsstop", start_command=ECHO, health_path="", websocket=True, idle_retention_seconds=3600)
    stack.wait_status("wsstop", "standby")
    ws = connect(ws_url(stack.proxy.url, "wsstop"), open_timeout=60)
    ws.send("up")
    assert ws.recv(timeout=5) == "up"
    stack.signal("wsstop", "stop")
    code, reason = closed_with(ws, 30)
    assert code == 1001, reason
    stack.wait_status("wsstop", "stopped", 30)
    wait_until(lambda: all(i.status == "stopped" for i in stack.instances("wsstop")), 30,
               message="its instance to stop")
