"""Pure logic of the proxy: balancing policies, traffic report debouncing, auth, HTTP framing."""
from __future__ import annotations

import random
import socket
import threading

import pytest

from proxy.auth import bearer_token, check_key, hash_key
from proxy.balancer import Balancer, normalize_policy
from proxy.routing_view import EndpointView, InstanceView
from proxy.traffic import TrafficTracker
from proxy.upstream import ConnectFailed, Unanswered, UpstreamFailed, UpstreamPool

A, B, C = InstanceView("aaaa", "127.0.0.1:1"), InstanceView("bbbb", "127.0.0.1:2"), InstanceView("cccc", "127.0.0.1:3")


def view(**kw) -> EndpointView:
    kw.setdefault("instances", (A, B, C))
    return EndpointView(name="ep", status="running", **kw)


@pytest.mark.parametrize("raw, policy", [
    ("round-robin", "round_robin"), ("Least_Connections", "least_connections"), ("ip-hash", "ip_hash"),
    ("random", "random"), ("", "round_robin"), ("bogus", "round_robin"), (None, "round_robin"),
])
def test_policy_names(raw, policy):
    assert normalize_policy(raw) == policy


def test_round_robin_cycles():
    b = Balancer(lambda _: 0)
    v = view()
    assert [b.pick(v, v.instances).id for _ in range(6)] == ["aaaa", "bbbb", "cccc"] * 2


def test_least_connections_prefers_fewest_in_flight():
    load = {"aaaa": 3, "bbbb": 0, "cccc": 1}
    b = Balancer(load.get)
    v = view(balancing="least_connections")
    assert {b.pick(v, v.instances).id for _ in range(5)} == {"bbbb"}
    load["bbbb"] = 1  # a tie between bbbb and cccc is shared
    assert {b.pick(v, v.instances).id for _ in range(6)} == {"bbbb", "cccc"}


def test_ip_hash_is_stable_and_only_moves_clients_of_a_removed_instance():
    b = Balancer(lambda _: 0)
    v = view(balancing="ip_hash")
    clients = [f"10.0.0.{i}" for i in range(200)]
    before = {ip: b.pick(v, v.instances, ip).id for ip in clients}
    assert before == {ip: b.pick(v, v.instances, ip).id for ip in clients}
    assert len(set(before.values())) == 3
    after = {ip: b.pick(v, (A, C), ip).id for ip in clients}
    assert all(after[ip] == before[ip] for ip in clients if before[ip] != "bbbb")


def test_random_picks_among_candidates():
    b = Balancer(lambda _: 0, rng=random.Random(7))
    v = view(balancing="random")
    assert {b.pick(v, (A, C)).id for _ in range(50)} == {"aaaa", "cccc"}


def test_capacity_filter():
    load = {"aaaa": 2, "bbbb": 1}
    b = Balancer(lambda i: load.get(i, 0))
    assert [i.id for i in b.available(view(max_concurrency=2))] == ["bbbb", "cccc"]
    assert len(b.available(view(max_concurrency=0))) == 3


def test_traffic_reports_are_debounced_and_follow_in_flight():
    sent = []
    t = TrafficTracker(lambda ep, r: sent.append((ep, r)), debounce_seconds=1.0, periodic_seconds=10.0,
                       reporter="h:1")
    assert t.due_reports(now=100.0) == []
    t.begin("ep", "aaaa")
    t.begin("ep", "aaaa")
    [(name, report)] = t.due_reports(now=100.0)
    assert name == "ep" and report.reporter == "h:1"
    assert [(i.instance_id, i.in_flight, i.requests) for i in report.instances] == [("aaaa", 2, 2)]
    t.end("ep", "aaaa")
    assert t.due_reports(now=100.5) == []  # changed, but within the debounce interval
    [(_, second)] = t.due_reports(now=101.0)
    assert second.seq > report.seq and second.instances[0].in_flight == 1
    assert t.due_reports(now=105.0) == []  # unchanged and busy: only the periodic report
    [(_, periodic)] = t.due_reports(now=111.0)
    assert periodic.instances[0].in_flight == 1
    t.end("ep", "aaaa")
    [(_, last)] = t.due_reports(now=112.0)  # the drop to zero is always reported
    assert last.instances[0].in_flight == 0 and last.instances[0].last_request_at > 0
    assert t.due_reports(now=130.0) == []  # idle and unchanged: silence
    assert t.in_flight("aaaa") == 0


def test_a_request_after_a_quiet_spell_is_reported_at_once(monkeypatch):
    """The lifecycle starts draining shortly before the idle retention ends: a request that begins
    then must be known at once, not a debounce interval later (workflows/lifecycle.py)."""
    import proxy.traffic as traffic

    clock = [1000.0]
    monkeypatch.setattr(traffic.time, "time", lambda: clock[0])
    t = TrafficTracker(lambda ep, r: None, debounce_seconds=1.0, periodic_seconds=10.0)
    t.begin("ep", "aaaa")
    assert len(t.due_reports(now=100.0)) == 1
    t.end("ep", "aaaa")
    clock[0] += 5.0  # a quiet spell
    t.begin("ep", "aaaa")
    assert len(t.due_reports(now=100.1)) == 1  # within the debounce interval, yet sent
    # Steady traffic is debounced as before: no instance is ever quiet.
    t.end("ep", "aaaa")
    clock[0] += 0.01
    t.begin("ep", "aaaa")
    assert t.due_reports(now=100.2) == []


def test_a_claim_is_released_exactly_once():
    t = TrafficTracker(lambda ep, r: None)
    released = []
    t.on_release = released.append
    claim = t.claim("ep", "aaaa")
    other = t.claim("ep", "aaaa")
    assert t.in_flight("aaaa") == 2 and claim.held
    claim.release()
    claim.release()
    assert t.in_flight("aaaa") == 1 and not claim.held and released == ["ep"]
    other.release()
    assert t.in_flight("aaaa") == 0


def test_a_dead_reporters_in_flight_requests_are_reported_ended_by_its_successor(tmp_path):
    """A proxy process killed with requests in flight: the process that takes its slot reports
    them ended at once, instead of the lifecycle counting them for a minute (proxy/traffic.py)."""
    import os

    from proxy.traffic import ReporterSlot

    sent = []
    first_slot = ReporterSlot(tmp_path, 8000)
    first = TrafficTracker(lambda ep, r: sent.append((ep, r)), debounce_seconds=0.0, slot=first_slot)
    first.begin("ep", "aaaa")
    first.begin("ep", "aaaa")
    first.begin("quiet", "bbbb")
    first.end("quiet", "bbbb")
    first.flush()
    assert {ep: r.instances[0].in_flight for ep, r in sent} == {"ep": 2, "quiet": 0}
    # While it lives, its slot is taken: another process gets the next one.
    assert ReporterSlot(tmp_path, 8000).reporter.endswith(":8000:1")
    os.close(first_slot._fd)  # the process dies: the kernel drops its lock
    sent.clear()
    successor = TrafficTracker(lambda ep, r: sent.append((ep, r)), slot=ReporterSlot(tmp_path, 8000))
    assert successor.reporter == first.reporter
    healed = successor.heal()
    assert [ep for ep, _ in healed] == ["ep"] == [ep for ep, _ in sent]
    report = healed[0][1]
    assert report.seq > max(r.seq for r in first._last_reports.values())
    assert [(i.instance_id, i.in_flight) for i in report.instances] == [("aaaa", 0)]
    # Healed once: a later successor finds nothing left in flight.
    assert TrafficTracker(lambda ep, r: None, slot=successor.slot).heal() == []


def test_held_requests_are_reported():
    t = TrafficTracker(lambda ep, r: None, debounce_seconds=0.1)
    t.hold("ep", +1)
    [(_, report)] = t.due_reports(now=50.0)
    assert report.held == 1


def test_auth():
    assert bearer_token("Bearer abc ") == "abc" and bearer_token("bearer x") == "x"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    keyed = view(key_hashes=frozenset({hash_key("sk-1")}))
    assert check_key(keyed, "Bearer sk-1") == (True, True)
    assert check_key(keyed, "Bearer sk-2") == (False, False)
    assert check_key(keyed, None) == (False, False)
    assert check_key(view(), "Bearer anything") == (True, False)


def serve_once(raw_response: bytes, pieces: int = 7):
    """A one-shot server writing `raw_response` in small pieces; returns its address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run():
        conn, _ = listener.accept()
        conn.recv(65536)
        step = max(1, len(raw_response) // pieces)
        for start in range(0, len(raw_response), step):
            conn.sendall(raw_response[start:start + step])
        listener.close()  # first: a client seeing the end finds nothing listening any more
        conn.close()

    threading.Thread(target=run, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def exchange(raw_response: bytes, method: str = "GET"):
    pool = UpstreamPool()
    resp = pool.exchange(serve_once(raw_response), method, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None, False)
    body = b"".join(resp.iter_body())
    resp.finish()
    return resp, body


def test_upstream_chunked_with_interim_response_and_trailers():
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    resp, body = exchange(raw)
    assert resp.status == 200 and body == b"hello world"
    assert [v for k, v in resp.headers if k == "Set-Cookie"] == ["a=1", "b=2"]


def test_upstream_content_length_close_delimited_and_head():
    resp, body = exchange(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nabcd")
    assert (resp.status, resp.reason, body) == (201, "Created", b"abcd")
    resp, body = exchange(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    assert body == b"until close"
    resp, body = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", method="HEAD")
    assert body == b""


def test_upstream_malformed_and_truncated_answers_fail_clearly():
    with pytest.raises(UpstreamFailed, match="malformed status line"):
        exchange(b"SPDY/9 what\r\n\r\n")
    with pytest.raises(UpstreamFailed, match="bytes of body unsent"):
        exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(UpstreamFailed, match="malformed status line"):
        exchange(b"HTTP/1.1 \xb3\xb3\xb3 OK\r\n\r\n")  # latin-1 digits int() would take


def test_an_instance_closing_before_answering_lets_an_idempotent_request_go_elsewhere():
    # A SIGKILLed instance's listener still accepts for a moment, then the connection drops with
    # no answer: a GET may go to another instance (Unanswered is a ConnectFailed, which the
    # handler substitutes), a POST may have been acted on, so it fails (docs/architecture.md).
    with pytest.raises(Unanswered, match="before answering"):
        exchange(b"", method="GET")  # serve_once's listener is gone after its one connection
    with pytest.raises(UpstreamFailed, match="before answering") as failed:
        exchange(b"", method="POST")
    assert not isinstance(failed.value, ConnectFailed)
    # An instance that drops a request but still takes connections is alive: 502, it stays.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def drop_first():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=drop_first, daemon=True).start()
    try:
        with pytest.raises(UpstreamFailed, match="before answering") as failed:
            UpstreamPool().exchange(f"127.0.0.1:{listener.getsockname()[1]}", "GET", b"GET / HTTP/1.1\r\n\r\n",
                                    None, False)
        assert not isinstance(failed.value, ConnectFailed)
    finally:
        listener.close()


# ---------------------------------------------------------------- WebSocket frames (proxy/websocket.py)
def _frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    import struct

    n = len(payload)
    length = bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n) if n < 65536 else \
        bytes([127]) + struct.pack("!Q", n)
    if mask is None:
        return bytes([0x80 | opcode]) + length + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, length[0] | 0x80]) + length[1:] + mask + masked


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("mask", [None, b"\x01\x02\x03\x04"])
def test_frames_pass_through_unchanged_whatever_the_pieces_they_arrive_in(size, mask):
    from proxy.websocket import Direction

    stream = _frame(0x2, bytes(range(256)) * (size // 256) + bytes(size % 256), mask) + _frame(0x9, b"ping", mask)
    for piece in (1, 3, 7, 1000, len(stream)):
        way = Direction(masked=mask is not None)
        out = b"".join(way.feed(stream[i:i + piece]) for i in range(0, len(stream), piece))
        assert out == stream and not way.in_frame and not way.close_received


def test_a_close_frame_is_seen_and_nothing_after_it_passes():
    from proxy.websocket import Direction

    way = Direction(masked=False)
    out = way.feed(_frame(0x1, b"hi") + _frame(0x8, b"\x03\xe8bye") + _frame(0x1, b"after"))
    assert out == _frame(0x1, b"hi") + _frame(0x8, b"\x03\xe8bye")
    assert way.close_sent and way.close_received


def test_after_the_proxys_own_close_the_answering_close_is_taken_not_passed():
    from proxy.websocket import Direction, close_frame

    way = Direction(masked=True)
    way.close_sent = True  # the proxy said 1001 this way
    assert way.feed(_frame(0x8, b"\x03\xe9", b"abcd")) == b""
    assert way.close_received
    frame = close_frame(1001, "going away", masked=True)
    assert frame[0] == 0x88 and frame[1] == 0x80 | 12
    unmasked = bytes(b ^ frame[2:6][i % 4] for i, b in enumerate(frame[6:]))
    assert unmasked == b"\x03\xe9going away"


# ---------------------------------------------------------------- the HTTP/1.1 server (proxy/http1.py)
def _parse(head: str, body: bytes = b""):
    from proxy import http1

    conn = http1.Connection(None)
    conn.buf = body
    return http1.parse_head(head, conn, http1.base_environ("127.0.0.1", 8000, False), 1 << 20)


def test_a_request_head_becomes_a_wsgi_environ():
    environ = _parse("POST /e/ep/a%20b?x=1&y=%2F HTTP/1.1\r\nHost: h:1\r\nX-Custom: one\r\nx-custom: two\r\n"
                     "Content-Type: application/json\r\nContent-Length: 5", b"hello")
    assert environ["REQUEST_METHOD"] == "POST" and environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["RAW_URI"] == "/e/ep/a%20b?x=1&y=%2F" and environ["PATH_INFO"] == "/e/ep/a b"
    assert environ["QUERY_STRING"] == "x=1&y=%2F"
    assert environ["HTTP_HOST"] == "h:1" and environ["HTTP_X_CUSTOM"] == "one,two"
    assert environ["CONTENT_TYPE"] == "application/json" and environ["CONTENT_LENGTH"] == "5"
    assert environ["wsgi.input"].read() == b"hello" and environ["wsgi.input"].read() == b""
    # The client's headers, in its order and spelling, for forwarding.
    assert environ["standby.headers"][1:3] == [("X-Custom", "one"), ("x-custom", "two")]


def test_an_absolute_form_target_is_served_by_its_path():
    environ = _parse("GET http://example.com/e/ep/x?q=1 HTTP/1.1\r\nHost: example.com")
    assert environ["PATH_INFO"] == "/e/ep/x" and environ["QUERY_STRING"] == "q=1"


@pytest.mark.parametrize("head, status, words", [
    ("GET /x HTTP/2.0", 505, "HTTP/1.1"),
    ("GET /x", 400, "malformed request line"),
    ("GET  /x HTTP/1.1", 400, "malformed request line"),
    ("GET  HTTP/1.1", 400, "invalid request target"),
    ("G@T /x HTTP/1.1", 400, "invalid method"),
    ("GET /\x7f HTTP/1.1", 400, "invalid request target"),
    ("GET /é HTTP/1.1", 400, "invalid request target"),
    ("GET /" + "a" * 5000 + " HTTP/1.1", 414, "4094"),
    ("GET /x HTTP/1.1\r\nHost : x", 400, "invalid header line"),
    ("GET /x HTTP/1.1\r\nX-A: a\r\n b", 400, "obsolete line folding"),
    ("GET /x HTTP/1.1\r\nX-A: a\x00b", 400, "control character"),
    ("GET /x HTTP/1.1\r\nX-A: a\nb", 400, "control character"),
    ("GET /x HTTP/1.1\r\nX-A: a\rb", 400, "control character"),
    ("GET /x HTTP/1.1\r\n" + "".join(f"X-{i}: 1\r\n" for i in range(101)).rstrip(), 431, "100 header fields"),
    ("GET /x HTTP/1.1\r\nX-A: " + "a" * 9000, 431, "8190"),
    ("POST /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2", 400, "given twice"),
    ("POST /x HTTP/1.1\r\nContent-Length: +2", 400, "number of bytes"),
    ("POST /x HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked", 400, "together"),
    ("POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", 501, "chunked"),
])
def test_a_request_head_the_proxy_refuses_says_why(head, status, words):
    from proxy.http1 import BadRequest

    with pytest.raises(BadRequest) as refused:
        _parse(head)
    assert refused.value.status == status and words in str(refused.value)


def test_header_names_with_underscores_are_dropped():
    environ = _parse("GET /x HTTP/1.1\r\nX_Forwarded_For: spoofed\r\nX-Forwarded-For: 10.0.0.1")
    assert environ["HTTP_X_FORWARDED_FOR"] == "10.0.0.1"
    assert [name for name, _ in environ["standby.headers"]] == ["X-Forwarded-For"]


@pytest.mark.parametrize("wire, decoded", [
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n", b"hello world"),
])
def test_a_chunked_body_is_decoded(wire, decoded):
    environ = _parse("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked", wire)
    body, got = environ["wsgi.input"], b""
    while True:
        piece = body.read(3)
        if not piece:
            break
        got += piece
    assert got == decoded and body.finished


@pytest.mark.parametrize("wire, words", [
    (b"ZZ\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
    (b"FFFFFFFFFFFF\r\nabc", "over the proxy's body limit"),
    (b"3\r\nhello\r\n0\r\n\r\n", "longer than its size"),
])
def test_a_bad_chunked_body_is_refused_at_once(wire, words):
    environ = _parse("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked", wire)
    with pytest.raises(ValueError, match=words):
        while environ["wsgi.input"].read():
            pass


class _Sink:
    def __init__(self):
        self.sent = b""

    def send(self, data):
        self.sent += bytes(data)
        return len(data)

    def sendall(self, data):
        self.sent += bytes(data)


@pytest.mark.parametrize("version, headers, pieces, framed, keep_alive", [
    ("HTTP/1.1", [("Content-Length", "5")], [b"he", b"llo"], b"hello", True),
    ("HTTP/1.1", [], [b"he", b"llo"], b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n", True),
    ("HTTP/1.0", [], [b"hello"], b"hello", False),
    ("HTTP/1.1", [("Content-Length", "9")], [b"hello"], b"hello", False),  # cut short: no reuse
])
def test_answers_are_framed_by_length_chunks_or_close(version, headers, pieces, framed, keep_alive):
    from proxy.http1 import Response

    sink = _Sink()
    response = Response(sink, "GET", version, True)
    response.start_response("200 OK", [("Content-Type", "text/plain"), *headers])
    for piece in pieces:
        response.write(piece)
    response.finish()
    head, _, body = sink.sent.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n") and b"\r\nDate: " in head
    assert body == framed and response.keep_alive is keep_alive
    assert (b"Transfer-Encoding: chunked" in head) == (b"2\r\nhe" in framed)


def test_the_head_goes_out_with_the_first_piece_of_body_in_one_write():
    from proxy.http1 import Response

    writes = []

    class Recorder(_Sink):
        def send(self, data):
            writes.append(bytes(data))
            return len(data)

    response = Response(Recorder(), "GET", "HTTP/1.1", True)
    response.start_response("200 OK", [("Content-Length", "1024")])
    response.write(b"x" * 1024)
    response.finish()
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n" + b"x" * 1024)


def test_the_sweep_closes_connections_waiting_past_the_keepalive_timeout():
    from proxy.http1 import Connection, sweep

    pairs = [socket.socketpair() for _ in range(3)]
    try:
        waiting_long, waiting_short, serving = (Connection(a) for a, _ in pairs)
        waiting_long.waiting_since, waiting_short.waiting_since = 100.0, 170.0
        assert sweep([waiting_long, waiting_short, serving], now=180.0, keepalive=75.0) == 1
        assert pairs[0][1].recv(1) == b""  # the client sees the connection end
        pairs[1][1].setblocking(False)
        with pytest.raises(BlockingIOError):
            pairs[1][1].recv(1)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


# ---- the connection loop (`http1.serve`) over a real socket pair: keep-alive, pipelining, HEAD,
# bodies, slow clients, and the refusals a client sees on the wire.
def _echo_app(environ, start_response):
    """Answers with what it got: method, path and the whole body; `/unread` leaves the body
    unread, `/stream` answers without a length, `/fail` fails before answering."""
    path = environ["PATH_INFO"]
    if path == "/fail":
        raise RuntimeError("boom")
    body = b"" if path == "/unread" else environ["wsgi.input"].read()
    while path != "/unread":
        more = environ["wsgi.input"].read()
        if not more:
            break
        body += more
    answer = f"{environ['REQUEST_METHOD']} {path} {len(body)}:".encode() + body
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [answer[:3], answer[3:]]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(answer)))])
    return [answer]


class _Served:
    """`http1.serve` on one end of a socket pair, in a thread; the test is the client."""

    def __init__(self, app=_echo_app, body_limit: int = 1 << 20):
        from proxy import http1

        self.server_sock, self.client = socket.socketpair()
        self.client.settimeout(5)
        self.conn = http1.Connection(self.server_sock)
        self.error: BaseException | None = None
        self.head_only = False  # the answers read are to HEAD requests: no body follows
        self._pending = b""  # read past the last answer
        environ = http1.base_environ("127.0.0.1", 8000, False)

        def run():
            try:
                http1.serve(self.conn, app, environ, lambda: True, body_limit)
            except BaseException as exc:  # noqa: BLE001 - kept for the test to look at
                self.error = exc
            finally:
                self.server_sock.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def answer(self) -> tuple[bytes, bytes]:
        """The next whole answer (head, body), framed by Content-Length or chunks."""
        data = self._pending
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, rest = data.partition(b"\r\n\r\n")
        fields = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip()
                  for line in head.split(b"\r\n")[1:]}
        if b"content-length" in fields and not head.startswith(b"HTTP/1.1 100"):
            size = 0 if self.head_only else int(fields[b"content-length"])
            while len(rest) < size:
                rest += self._recv()
            body, self._pending = rest[:size], rest[size:]
        elif fields.get(b"transfer-encoding") == b"chunked":
            while not rest.endswith(b"0\r\n\r\n"):
                rest += self._recv()
            body, self._pending = rest, b""
        else:
            body, self._pending = rest, b""
        return head, body

    def _recv(self) -> bytes:
        data = self.client.recv(65536)
        assert data, "the server closed the connection"
        return data

    def closed(self) -> bool:
        """Whether the server ended the connection (and its loop)."""
        self.thread.join(5)
        rest = b""
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                rest += data
        except OSError:
            pass
        return not self.thread.is_alive() and not rest

    def close(self):
        self.client.close()
        self.thread.join(5)


@pytest.fixture
def served():
    made = []

    def make(**kw) -> _Served:
        made.append(_Served(**kw))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_a_keep_alive_connection_serves_one_request_after_another(served):
    s = served()
    for n in range(3):
        s.client.sendall(f"GET /r{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, body = s.answer()
        assert head.startswith(b"HTTP/1.1 200 OK") and body == f"GET /r{n} 0:".encode()
        assert b"Connection: close" not in head
    s.client.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = s.answer()
    assert b"Connection: close" in head and body == b"GET /last 0:"
    assert s.closed() and s.error is None


@pytest.mark.parametrize("connection, kept", [("", False), ("Connection: keep-alive\r\n", True)])
def test_http_1_0_keeps_the_connection_only_when_asked(served, connection, kept):
    s = served()
    s.client.sendall(f"GET /a HTTP/1.0\r\n{connection}\r\n".encode())
    head, body = s.answer()
    assert body == b"GET /a 0:"
    assert (b"Connection: keep-alive" in head) is kept and (b"Connection: close" in head) is not kept
    if kept:
        s.client.sendall(b"GET /b HTTP/1.0\r\n\r\n")
        assert s.answer()[1] == b"GET /b 0:"
    assert s.closed()


def test_pipelined_requests_are_answered_in_order(served):
    s = served()
    s.client.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                     b"POST /three HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                     b"GET /four HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [s.answer()[1] for _ in range(4)] == [b"GET /one 0:", b"POST /two 5:hello", b"POST /three 3:abc",
                                                 b"GET /four 0:"]
    assert s.error is None


def test_a_head_answer_has_no_body_and_the_connection_carries_the_next_request(served):
    s = served()
    s.head_only = True
    s.client.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = s.answer()
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 10" in head and body == b""
    s.head_only = False
    # A streamed answer to HEAD is not chunked either: nothing follows its head.
    s.client.sendall(b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    head, rest = s.answer()
    assert b"Transfer-Encoding" not in head
    data = rest
    while b"GET /after 0:" not in data:
        data += s._recv()
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"GET /after 0:")


def test_an_answer_without_a_length_is_chunked_and_the_connection_kept(served):
    s = served()
    s.client.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = s.answer()
    assert b"Transfer-Encoding: chunked" in head and body == b"3\r\nGET\r\nb\r\n /stream 0:\r\n0\r\n\r\n"
    s.client.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.answer()[1] == b"GET /next 0:"


def test_a_slow_client_sending_a_byte_at_a_time_is_served(served):
    s = served()
    for byte in b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc":
        s.client.sendall(bytes([byte]))
    head, body = s.answer()
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b"POST /slow 3:abc"


@pytest.mark.parametrize("pieces, status", [
    ([b"GET /x HTTP/1.1\r\nHost: x\n", b"\n"], 400),  # a bare LF split across reads
    ([b"\r\n", b"\r\n", b"GET /x HTTP/1.1\r\nHost: x\r", b"\n\r", b"\nGET /y HTTP/1.1\r\n\r\n"], 200),
])
def test_a_head_split_across_reads_is_read_as_one(served, pieces, status):
    s = served()
    for piece in pieces:
        s.client.sendall(piece)
        threading.Event().wait(0.05)  # each piece its own read
    head, body = s.answer()
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    if status == 200:
        assert body == b"GET /x 0:" and s.answer()[1] == b"GET /y 0:"
    else:
        assert b"bare LF" in body


def test_a_connection_waiting_for_its_head_is_seen_by_the_sweep(served):
    from proxy.http1 import sweep

    s = served()
    s.client.sendall(b"GET /slow HTTP/1.1\r\nHo")  # and nothing more
    threading.Event().wait(0.2)
    assert s.conn.waiting_since > 0 and not s.conn.idle
    assert sweep([s.conn], now=s.conn.waiting_since + 76, keepalive=75) == 1
    assert s.closed()


def test_an_idle_keep_alive_connection_is_marked_idle(served):
    s = served()
    s.client.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    s.answer()
    threading.Event().wait(0.2)
    assert s.conn.idle and s.conn.waiting_since > 0


def test_expect_100_continue_is_answered_when_the_body_is_read(served):
    s = served()
    s.client.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    head, _ = s.answer()
    assert head == b"HTTP/1.1 100 Continue"
    s.client.sendall(b"ok")
    assert s.answer()[1] == b"POST /e 2:ok"


def test_a_small_unread_body_is_read_away_and_a_large_one_closes_the_connection(served):
    s = served()
    s.client.sendall(b"POST /unread HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
                     b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.answer()[1] == b"POST /unread 0:"
    assert s.answer()[1] == b"GET /next 0:"
    big = served()
    big.client.sendall(b"POST /unread HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    assert big.answer()[1] == b"POST /unread 0:"
    big.client.shutdown(socket.SHUT_WR)
    assert big.closed()


@pytest.mark.parametrize("wire, status, words", [
    (b"HELLO\r\n\r\n", 400, "malformed request line"),
    (b"GET /x HTTP/3\r\n\r\n", 505, "send HTTP/1.1"),
    (b"GET /x HTTP/1.1\nHost: x\n\n", 400, "bare LF"),
    (b"GET /" + b"a" * 5000, 414, "4094"),
    (b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * 900_000, 431, "too large"),
    (b"GET /x HTTP/1.1\r\nHost: x\r\nX-Smuggle : 1\r\n\r\n", 400, "invalid header line"),
])
def test_a_refused_request_gets_a_json_answer_and_the_connection_closes(served, wire, status, words):
    import json

    s = served()
    s.client.sendall(wire)
    head, body = s.answer()
    assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in head
    answer = json.loads(body)
    assert answer["code"] == status and words in answer["msg"]
    s.client.shutdown(socket.SHUT_WR)
    assert s.closed()


def test_a_connection_ending_inside_a_head_is_answered_400(served):
    s = served()
    s.client.sendall(b"GET /x HTTP/1.1\r\nHost")
    s.client.shutdown(socket.SHUT_WR)
    head, body = s.answer()
    assert head.startswith(b"HTTP/1.1 400 ") and b"ended inside the request's head" in body


def test_an_app_failing_before_its_answer_is_a_json_500(served):
    s = served()
    s.client.sendall(b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = s.answer()
    assert head.startswith(b"HTTP/1.1 500 ") and b"RuntimeError: boom" in body
    assert s.closed() and isinstance(s.error, RuntimeError)
