"""The proxy's data plane against real processes: gunicorn + gevent proxy, real instance servers.

No lifecycle here: rows are written as the worker would (instances `ready` with an address) and
TEMPORAL_ADDRESS points at a port nothing listens on, so any attempt to wake shows up as a 503.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import requests

from tests.conftest import free_port
from tests.proxy_fixtures import ProxyWorld

pytestmark = pytest.mark.timeout(120)

ROUTES = [
    {"method": "POST", "path": "/predict", "file": "p.py", "function": "predict",
     "params": [{"name": "text", "type": "str", "min_length": 1}]},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = ProxyWorld(tmp_path_factory.mktemp("proxy"), extra_env={"STANDBY_PROXY_MAX_BODY_BYTES": str(1024 * 1024)})
    try:
        w.add_endpoint("rr", max_instances=3)
        for inst in ("rr000001", "rr000002", "rr000003"):
            w.add_instance("rr", inst)
        w.add_endpoint("iph", balancing="ip_hash", max_instances=3)
        for inst in ("ip000001", "ip000002", "ip000003"):
            w.add_instance("iph", inst)
        w.add_endpoint("lc", balancing="least_connections", max_instances=2)
        for inst in ("lc000001", "lc000002"):
            w.add_instance("lc", inst)
        w.add_endpoint("sticky", sticky_sessions=True, max_instances=3)
        for inst in ("st000001", "st000002", "st000003"):
            w.add_instance("sticky", inst)
        w.add_endpoint("keyed")
        w.add_instance("keyed", "key00001")
        w.add_key("keyed", "sk-live-good-key")
        w.add_endpoint("open")
        w.add_instance("open", "open0001")
        w.add_endpoint("asleep", status="standby", max_instances=1)
        w.add_endpoint("stopped", status="stopped")
        w.add_endpoint("failed", status="failed")
        w.add_endpoint("routes", source_kind="routes", routes=ROUTES, status="standby")
        w.add_endpoint("noqueue", status="standby", hold_queue_size=0)
        w.add_endpoint("flaky", max_instances=2)
        w.add_instance("flaky", "dead0001", start=False, address=f"127.0.0.1:{free_port()}")
        w.add_instance("flaky", "live0001")
        w.add_endpoint("deadonly")
        w.add_instance("deadonly", "dead0002", start=False, address=f"127.0.0.1:{free_port()}")
        w.add_endpoint("drain", max_instances=2)
        w.add_instance("drain", "dr000001")
        w.add_instance("drain", "dr000002")
        w.start_proxy()
        yield w
    finally:
        w.stop()


def targets(world, endpoint, n, path="/echo", **kw):
    out = []
    for _ in range(n):
        r = requests.get(world.url(endpoint, path), timeout=10, **kw)
        assert r.status_code == 200, r.text
        assert r.headers["Deploy-Route-Target"] == r.headers["X-Instance"]
        out.append(r.headers["Deploy-Route-Target"])
    return out


def get_from(world, endpoint, source_ip, path="/echo"):
    conn = http.client.HTTPConnection("127.0.0.1", world.proxy.port, timeout=10, source_address=(source_ip, 0))
    try:
        conn.request("GET", f"/e/{endpoint}{path}")
        resp = conn.getresponse()
        resp.read()
        return resp.getheader("Deploy-Route-Target")
    finally:
        conn.close()


# ---------------------------------------------------------------- balancing

def test_round_robin_cycles_through_every_instance(world):
    seen = targets(world, "rr", 9)
    assert set(seen) == {"rr000001", "rr000002", "rr000003"}
    assert seen[0:3] == seen[3:6] == seen[6:9]


def test_ip_hash_is_stable_per_client_and_spreads_clients(world):
    by_ip = {}
    for last in range(2, 22):
        ip = f"127.0.0.{last}"
        first = get_from(world, "iph", ip)
        assert all(get_from(world, "iph", ip) == first for _ in range(3))
        by_ip[ip] = first
    assert len(set(by_ip.values())) >= 2


def test_least_connections_prefers_the_idle_instance(world):
    slow = {}

    def hold_one():
        r = requests.get(world.url("lc", "/sleep?s=3"), timeout=10)
        slow["target"] = r.headers["Deploy-Route-Target"]

    thread = threading.Thread(target=hold_one)
    thread.start()
    time.sleep(0.5)  # the slow request is in flight on one instance
    fast = targets(world, "lc", 4)
    thread.join()
    assert len(set(fast)) == 1 and fast[0] != slow["target"]


def test_sticky_cookie_pins_a_client(world):
    session = requests.Session()
    first = session.get(world.url("sticky", "/echo"), timeout=10)
    assert "standby_route_sticky" in first.headers.get("Set-Cookie", "")
    pinned = first.headers["Deploy-Route-Target"]
    for _ in range(5):
        r = session.get(world.url("sticky", "/echo"), timeout=10)
        assert r.headers["Deploy-Route-Target"] == pinned
        assert "Set-Cookie" not in r.headers
    # Without the cookie the default round robin moves on.
    assert len(set(targets(world, "sticky", 3))) == 3


def test_draining_instance_gets_no_new_requests(world):
    world.set_instance_status("dr000001", "draining")
    world.refreshed()
    assert set(targets(world, "drain", 6)) == {"dr000002"}
    r = requests.get(world.url("drain", "/echo"), headers={"Deploy-Route-Rule": "dr000001"}, timeout=10)
    assert r.status_code == 404 and r.json()["code"] == 1006


# ---------------------------------------------------------------- route rules

def test_route_rule_instance_id_pins_the_instance(world):
    for inst in ("rr000002", "rr000003"):
        r = requests.get(world.url("rr", "/echo"), headers={"Deploy-Route-Rule": inst}, timeout=10)
        assert r.status_code == 200 and r.headers["Deploy-Route-Target"] == inst == r.json()["instance"]
        assert "Deploy-Route-Rule" not in r.json()["headers"]


@pytest.mark.parametrize("rule", ["nosuchid", "ip000001"])  # unknown, and another endpoint's instance
def test_route_rule_unknown_instance_is_1006(world, rule):
    r = requests.get(world.url("rr", "/echo"), headers={"Deploy-Route-Rule": rule}, timeout=10)
    assert r.status_code == 404
    assert r.json()["code"] == 1006 and r.json()["msg"] == "route target not found"
    assert r.headers["Deploy-Route-Target"] == ""


@pytest.mark.parametrize("rule", ["random", "round-robin"])
def test_route_rule_random_and_round_robin(world, rule):
    seen = []
    for _ in range(12):
        r = requests.get(world.url("rr", "/echo"), headers={"Deploy-Route-Rule": rule}, timeout=10)
        assert r.status_code == 200
        seen.append(r.headers["Deploy-Route-Target"])
    assert set(seen) <= {"rr000001", "rr000002", "rr000003"} and len(set(seen)) >= 2
    # With nothing running there is no target, and nothing is woken.
    r = requests.get(world.url("asleep", "/echo"), headers={"Deploy-Route-Rule": rule}, timeout=10)
    assert r.status_code == 404 and r.json() == {"code": 1006, "msg": "route target not found",
                                                  "detail": "endpoint 'asleep' has no running instance"}


def test_route_rule_scale_out_at_max_instances_is_1007(world):
    r = requests.get(world.url("rr", "/echo"), headers={"Deploy-Route-Rule": "scale-out"}, timeout=10)
    assert r.status_code == 429
    assert r.json() == {"code": 1007, "msg": "deployment replica quota exceeded"}


# ---------------------------------------------------------------- errors

def test_endpoint_created_after_the_last_refresh_answers_its_first_request(tmp_path):
    """No waiting for the next routing-view refresh: an unknown name is looked up at once."""
    w = ProxyWorld(tmp_path, extra_env={"STANDBY_PROXY_REFRESH_SECONDS": "60"})
    try:
        w.start_proxy()
        assert requests.get(w.url("brand-new", "/echo"), timeout=10).status_code == 404
        w.add_endpoint("brand-new", status="running")
        w.add_instance("brand-new", "bn000001")
        time.sleep(0.2)  # past the miss-reload rate limit
        r = requests.get(w.url("brand-new", "/echo"), timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["Deploy-Route-Target"] == "bn000001"
    finally:
        w.stop()


def test_unknown_endpoint_is_404_json(world):
    r = requests.get(world.url("nope", "/x"), timeout=10)
    assert r.status_code == 404 and "not found" in r.json()["msg"]
    assert "Deploy-Route-Target" in r.headers and r.headers["X-Request-Id"]
    r = requests.get(world.proxy.url + "/elsewhere", timeout=10)
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("name", ["stopped", "failed"])
def test_stopped_or_failed_endpoint_is_503_without_waking(world, name):
    r = requests.get(world.url(name, "/echo"), timeout=10)
    assert r.status_code == 503
    assert r.json()["status"] == name and "does not wake" in r.json()["msg"]


def test_connect_refused_retries_on_another_instance(world):
    seen = targets(world, "flaky", 6)
    assert set(seen) == {"live0001"}


def test_connect_refused_with_no_other_instance_is_502(world):
    r = requests.get(world.url("deadonly", "/echo"), timeout=10)
    assert r.status_code == 502
    assert "dead0002" in r.json()["msg"] and r.headers["Deploy-Route-Target"] == "dead0002"


def test_hold_queue_of_zero_answers_503_with_retry_after(world):
    r = requests.get(world.url("noqueue", "/echo"), timeout=10)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
    assert "overloaded" in r.json()["msg"]


def test_wake_without_a_reachable_lifecycle_is_503_with_retry_after(world):
    r = requests.get(world.url("asleep", "/echo"), timeout=30)
    assert r.status_code == 503 and r.headers.get("Retry-After")
    assert "asleep" in r.json()["msg"]


def test_routes_endpoint_rejects_bad_requests_before_waking(world):
    ok_shape = {"text": "hi"}
    r = requests.post(world.url("routes", "/predict"), json={"text": 5}, timeout=10)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "text"
    r = requests.post(world.url("routes", "/nowhere"), json=ok_shape, timeout=10)
    assert r.status_code == 404
    r = requests.get(world.url("routes", "/predict"), timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    # A good body gets as far as waking (which fails here: no lifecycle).
    r = requests.post(world.url("routes", "/predict"), json=ok_shape, timeout=30)
    assert r.status_code == 503


# ---------------------------------------------------------------- headers and auth

def test_every_proxied_response_has_target_cold_start_and_request_id(world):
    r = requests.get(world.url("open", "/echo"), headers={"X-Request-Id": "client-chosen-id"}, timeout=10)
    assert r.headers["Deploy-Route-Target"] == "open0001"
    assert r.headers["Deploy-Cold-Start"] == "false"
    assert r.headers["X-Request-Id"] == "client-chosen-id" == r.json()["headers"]["X-Request-Id"]
    assert r.headers["X-Accel-Buffering"] == "no"
    generated = requests.get(world.url("open", "/echo"), timeout=10).headers["X-Request-Id"]
    assert len(generated) >= 16


def test_hop_by_hop_headers_are_stripped_and_forwarded_headers_added(world):
    r = requests.get(
        world.url("open", "/echo?a=1&b=%2F"),
        headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
                 "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-Kept": "yes",
                 "Authorization": "Bearer not-a-standby-key"},
        timeout=10,
    )
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    for gone in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert gone not in seen
    assert seen["x-kept"] == "yes"
    # No keys on this endpoint: the Authorization header belongs to the instance.
    assert seen["authorization"] == "Bearer not-a-standby-key"
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{world.proxy.port}"
    assert r.json()["raw_path"] == "/echo?a=1&b=%2F"
    hop = requests.get(world.url("open", "/hop"), timeout=10)
    assert "X-Private-Hop" not in hop.headers and "Keep-Alive" not in hop.headers
    assert hop.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]


def test_auth_requires_an_active_key_and_strips_it(world):
    assert requests.get(world.url("keyed", "/echo"), timeout=10).status_code == 401
    wrong = requests.get(world.url("keyed", "/echo"), headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["msg"]
    good = requests.get(world.url("keyed", "/echo"), headers={"Authorization": "Bearer sk-live-good-key"}, timeout=10)
    assert good.status_code == 200
    assert "authorization" not in {k.lower() for k in good.json()["headers"]}
    # Revoking the key takes effect with the next routing refresh.
    from datetime import datetime, timezone

    from common.models import ApiKey

    with world.db.session() as s:
        for key in s.query(ApiKey).all():
            key.revoked_at = datetime.now(timezone.utc)
    world.refreshed()
    # No active key left: the endpoint is open again, and the header passes through.
    r = requests.get(world.url("keyed", "/echo"), headers={"Authorization": "Bearer sk-live-good-key"}, timeout=10)
    assert r.status_code == 200 and r.json()["headers"]["Authorization"] == "Bearer sk-live-good-key"


# ---------------------------------------------------------------- bodies and streaming

def test_body_over_the_limit_is_413(world):
    r = requests.post(world.url("open", "/upload"), data=b"x" * (1024 * 1024 + 1), timeout=10)
    assert r.status_code == 413 and "STANDBY_PROXY_MAX_BODY_BYTES" in r.json()["msg"]

    def chunks():
        for _ in range(20):
            yield b"y" * 65536

    r = requests.post(world.url("open", "/upload"), data=chunks(), timeout=10)
    assert r.status_code == 413
    ok = requests.post(world.url("open", "/upload"), data=b"z" * 1000, timeout=10)
    assert ok.status_code == 200 and ok.json()["bytes"] == 1000


def test_sse_event_reaches_the_client_before_the_instance_finishes(world):
    with requests.get(world.url("open", "/sse?n=3&interval=1"), stream=True, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Accel-Buffering"] == "no"
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith(b"data:"))
        received_at = time.time()
        rest = [line for line in lines if line.startswith(b"data:")]
    events = [json.loads(first[5:])] + [json.loads(line[5:]) for line in rest]
    # The first event was in the client's hands before the instance wrote the last one.
    assert received_at < events[2]["sent_at"]


def test_metrics_are_exposed(world):
    requests.get(world.url("open", "/echo"), timeout=10)
    text = requests.get(world.proxy.url + "/metrics", timeout=10).text
    assert 'standby_proxy_requests_total{code_class="2xx",endpoint="open"}' in text
    assert "standby_proxy_response_seconds_bucket" in text


def test_raw_chunked_upload_and_keepalive_on_one_connection(world):
    """A hand-written chunked request, then a second request on the same client connection."""
    sock = socket.create_connection(("127.0.0.1", world.proxy.port), timeout=10)
    try:
        body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        sock.sendall(b"POST /e/open/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        sock.sendall(b"GET /e/open/1k HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"x" * 16):
            assert time.monotonic() < deadline, data
            data += sock.recv(65536)
        assert b'"bytes": 11' in data
    finally:
        sock.close()


def test_head_then_get_on_one_connection_through_an_instance_that_writes_a_body_after_head(world):
    """The test instance writes its body after a HEAD answer too (a naive handler): the client gets
    a head without a body, and the next request on the same connection gets its own answer."""
    sock = socket.create_connection(("127.0.0.1", world.proxy.port), timeout=10)
    try:
        for _ in range(2):
            sock.sendall(b"HEAD /e/open/1k HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and rest == b"", data[:300]
            sock.sendall(b"GET /e/open/echo?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            deadline = time.monotonic() + 10
            while not (b"\r\n\r\n" in data and data.rstrip().endswith(b"}")):
                assert time.monotonic() < deadline, data
                data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200") and b'"query": "n=2"' in data, data[:600]
    finally:
        sock.close()
