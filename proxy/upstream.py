"""A minimal HTTP/1.1 client over pooled keep-alive sockets (cooperative under gevent).

Only what a reverse proxy needs: write a request head (+ body: bytes, a block reader, or
chunked), parse the response head, and iterate the body in the pieces it arrives in, framed by
Content-Length, chunked encoding or connection close. Interim 1xx answers are skipped. A
connection goes back to the pool only when its response was read to the end.
"""
from __future__ import annotations

import socket
from typing import Iterator

from proxy.http1 import send_all

BLOCK = 64 * 1024
MAX_HEAD = 64 * 1024
# As a plain int: OR-ing the socket module's flag enums costs an enum call per request.
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# RFC 9110 7.6.1 plus what only concerns this hop: never passed on, either way. The proxy streams
# a request body itself, so an `Expect: 100-continue` is answered here (proxy/http1.py).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


class ConnectFailed(Exception):
    """The instance refused or did not accept the connection; nothing of the request was sent."""


class UpstreamFailed(Exception):
    """The instance failed after the request began (reset, bad answer)."""


class Unanswered(ConnectFailed):
    """The instance closed (or reset) the connection before a byte of its answer, for a request
    that may be sent again (an idempotent method, its body at hand): as nginx's default
    `proxy_next_upstream error`, the proxy may try another instance. A SIGKILLed instance's
    listening socket accepts for a moment after the kill, so this is how its first requests fail.
    """


# Methods a client may send twice (RFC 9110 section 9.2.2): safe to try on another instance.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class _Conn:
    __slots__ = ("sock", "buf", "address")

    def __init__(self, sock: socket.socket, address: str):
        self.sock = sock
        self.buf = bytearray()
        self.address = address

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _dropped(conn: _Conn) -> bool:
    """An idle pooled socket that is readable has been closed (or sent junk): do not reuse it.

    A non-blocking peek on the native socket: one syscall, where gevent's select would set up
    and tear down watchers on every request."""
    raw = getattr(conn.sock, "_sock", conn.sock)
    try:
        raw.recv(1, _PEEK_NOW)
    except BlockingIOError:
        return False  # nothing to read: the connection is idle and open
    except OSError:
        return True
    return True  # EOF (b"") or unexpected bytes


class UpstreamPool:
    def __init__(self, connect_timeout: float = 5.0, max_idle: int = 64):
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[str, list[_Conn]] = {}

    def _connect(self, address: str) -> _Conn:
        host, _, port = address.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=self.connect_timeout)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {address}: {exc}") from exc
        sock.settimeout(None)  # inference can take minutes; SSE streams idle between events
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock, address)

    def _checkout(self, address: str) -> tuple[_Conn, bool]:
        # Every reuse is checked, however fresh: a server that wrote more than it announced (a
        # body on a HEAD answer) left bytes that would pass for the next answer.
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not _dropped(conn):
                return conn, True
            conn.close()
        return self._connect(address), False

    def release(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.address)
        if idle is None:
            idle = self._idle[conn.address] = []
        if len(idle) < self.max_idle and not conn.buf:
            idle.append(conn)
        else:
            conn.close()

    def exchange(self, address: str, method: str, head: bytes, body, chunked: bool) -> "UpstreamResponse":
        conn, reused = self._checkout(address)
        replayable = body is None or isinstance(body, (bytes, bytearray))
        try:
            _write_request(conn, head, body, chunked)
            resp = UpstreamResponse.read_head(conn, self, method)
        except _StaleConnection as exc:
            conn.close()
            # The instance closed a kept-alive socket as we reused it: the request never
            # started there. Retry once on a fresh connection when the body can be resent.
            if not (reused and replayable):
                raise _unanswered(address, method, replayable, exc) from exc
            conn = self._connect(address)
            try:
                _write_request(conn, head, body, chunked)
                resp = UpstreamResponse.read_head(conn, self, method)
            except _StaleConnection as again:
                conn.close()
                raise _unanswered(address, method, replayable, again) from again
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        return resp


class _StaleConnection(Exception):
    pass


def _unanswered(address: str, method: str, replayable: bool, exc: Exception) -> Exception:
    """No byte of an answer came: another instance may take an idempotent request (Unanswered);
    any other one fails here, since the instance may have acted on it before it died."""
    message = f"instance {address} closed the connection before answering: {exc}"
    if not (replayable and method in IDEMPOTENT) or _accepts(address):
        return UpstreamFailed(message)  # a live instance that dropped this request: its answer is a 502
    return Unanswered(message)


def _accepts(address: str) -> bool:
    """Whether the instance still takes connections: a live one that dropped a request keeps its
    place in the view; a dying one (its listener gone a moment later) is left out, and the
    request goes elsewhere."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return False
    return True


def _write_request(conn: _Conn, head: bytes, body, chunked: bool) -> None:
    sock = conn.sock
    if body is None or isinstance(body, (bytes, bytearray)):
        try:
            send_all(sock, head + bytes(body) if body else head)
        except OSError as exc:
            raise _StaleConnection(str(exc)) from exc
        return
    try:
        sock.sendall(head)
    except OSError as exc:
        raise _StaleConnection(str(exc)) from exc
    try:
        while True:
            block = body.read(BLOCK)
            if not block:
                break
            sock.sendall(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except OSError as exc:
        raise UpstreamFailed(f"sending the body to {conn.address} failed: {exc}") from exc


class UpstreamResponse:
    __slots__ = ("conn", "pool", "status", "reason", "headers", "end_to_end", "connection", "_length",
                 "_chunked", "_until_close", "_keep_alive", "_done", "_transfer_encoding", "_content_length")

    def __init__(self, conn: _Conn, pool: UpstreamPool):
        self.conn = conn
        self.pool = pool
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.end_to_end: list[tuple[str, str]] = []  # the headers minus hop-by-hop ones
        self.connection: str | None = None  # the Connection header, lowercased
        self._transfer_encoding: str | None = None
        self._content_length: str | None = None
        self._length: int | None = None
        self._chunked = False
        self._until_close = False
        self._keep_alive = True
        self._done = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @classmethod
    def read_head(cls, conn: _Conn, pool: UpstreamPool, method: str) -> "UpstreamResponse":
        while True:
            resp = cls(conn, pool)
            resp._parse_head(_read_head_bytes(conn))
            if resp.status >= 200 or resp.status == 101:
                break  # 1xx interim answers (100 Continue, 103 Early Hints) are skipped
        resp._frame(method)
        return resp

    def _parse_head(self, head: bytes) -> None:
        """Status and headers in one pass: hop-by-hop ones are set apart as they are read."""
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not (code.isascii() and code.isdigit()):
            raise UpstreamFailed(f"instance answered a malformed status line: {lines[0][:80]!r}")
        self.status, self.reason = int(code), reason
        end_to_end = []
        hop = []
        for line in lines[1:]:
            if not line.isprintable() and ("\r" in line or "\n" in line or "\x00" in line):
                # A CR or LF inside a line, or a NUL: passed on, it could split the client's answer.
                raise UpstreamFailed("instance sent a header holding a bare CR or LF (or a NUL)")
            name, sep, value = line.partition(":")
            if not sep:
                continue
            name, value = name.strip(), value.strip()
            lower = name.lower()
            if lower in HOP_BY_HOP:
                if lower == "transfer-encoding":
                    self._transfer_encoding = value.lower()
                elif lower == "connection":
                    self.connection = value.lower()
                hop.append((name, value))
                continue
            if lower == "content-length":
                self._content_length = value
            end_to_end.append((name, value))
        self.end_to_end = end_to_end
        self.headers = end_to_end + hop if hop else end_to_end
        self._keep_alive = version != "HTTP/1.0"

    def _frame(self, method: str) -> None:
        transfer_encoding, connection, length = self._transfer_encoding, self.connection, self._content_length
        if connection:
            if "close" in connection:
                self._keep_alive = False
            elif "keep-alive" in connection:
                self._keep_alive = True
        if self.status == 101:
            # Switching protocols: the connection is the relay's now (proxy/websocket.py), never
            # the pool's again.
            self._length = 0
            self._keep_alive = False
        elif method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            self._length = 0
            if method == "HEAD":
                # Servers that write a body after a HEAD answer anyway (a naive handler) would
                # leave it to pass for the next answer on this connection, arriving too late for
                # the reuse check: such a connection is not reused.
                self._keep_alive = False
        elif transfer_encoding and "chunked" in transfer_encoding:
            self._chunked = True
        elif length is not None:
            try:
                self._length = int(length)
            except ValueError as exc:
                raise UpstreamFailed(f"instance sent a bad Content-Length: {length!r}") from exc
        else:
            self._until_close = True
            self._keep_alive = False

    @property
    def content_length(self) -> int | None:
        return self._length

    def buffered_body(self) -> bytes | None:
        """The whole body when it arrived with the head (a small answer with a Content-Length),
        taken at once; None when it must be read as it comes (`iter_body`)."""
        conn = self.conn
        left = self._length
        if left is None or self._chunked or len(conn.buf) < left:
            return None
        if len(conn.buf) == left:
            data = bytes(conn.buf)
            conn.buf.clear()
        else:
            data = bytes(conn.buf[:left])
            del conn.buf[:left]
        self._done = True
        return data

    def iter_body(self) -> Iterator[bytes]:
        conn = self.conn
        if self._chunked:
            yield from self._iter_chunked(conn)
        elif self._length is not None:
            left = self._length
            if conn.buf and left:
                data = bytes(conn.buf[:left])
                del conn.buf[: len(data)]
                left -= len(data)
                yield data
            while left > 0:
                data = conn.sock.recv(min(BLOCK, left))
                if not data:
                    raise UpstreamFailed(f"instance closed the connection with {left} bytes of body unsent")
                left -= len(data)
                yield data
        else:
            if conn.buf:
                data = bytes(conn.buf)
                conn.buf.clear()
                yield data
            while True:
                data = conn.sock.recv(BLOCK)
                if not data:
                    break
                yield data
        self._done = True

    def _iter_chunked(self, conn: _Conn) -> Iterator[bytes]:
        while True:
            line = _read_line(conn)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as exc:
                raise UpstreamFailed(f"instance sent a bad chunk size: {size_text[:20]!r}") from exc
            if size == 0:
                while _read_line(conn):  # trailers, dropped (hop-by-hop by nature here)
                    pass
                return
            left = size
            while left > 0:
                if conn.buf:
                    data = bytes(conn.buf[:left])
                    del conn.buf[: len(data)]
                else:
                    data = conn.sock.recv(min(BLOCK, left))
                    if not data:
                        raise UpstreamFailed("instance closed the connection inside a chunk")
                left -= len(data)
                yield data
            if _read_line(conn):
                raise UpstreamFailed("instance sent a chunk longer than its size")

    def finish(self) -> None:
        """Return the connection to the pool if the body was read to its end, else close it."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self._done and self._keep_alive and not self._until_close:
            self.pool.release(conn)
        else:
            conn.close()


def _read_head_bytes(conn: _Conn) -> bytes:
    buf = conn.buf
    start = 0
    while True:
        end = buf.find(b"\r\n\r\n", start)
        if end >= 0:
            head = bytes(buf[:end])
            del buf[: end + 4]
            return head
        if len(buf) > MAX_HEAD:
            raise UpstreamFailed("instance sent response headers over 64 KB")
        start = max(0, len(buf) - 3)
        try:
            data = conn.sock.recv(BLOCK)
        except OSError as exc:
            raise _StaleConnection(str(exc)) if not buf else UpstreamFailed(str(exc)) from exc
        if not data:
            if not buf:
                raise _StaleConnection("closed before answering")
            raise UpstreamFailed("instance closed the connection inside the response headers")
        buf += data


def _read_line(conn: _Conn) -> bytes:
    buf = conn.buf
    start = 0
    while True:
        end = buf.find(b"\r\n", start)
        if end >= 0:
            line = bytes(buf[:end])
            del buf[: end + 2]
            return line
        if len(buf) > MAX_HEAD:
            raise UpstreamFailed("instance sent a line over 64 KB")
        start = max(0, len(buf) - 1)
        data = conn.sock.recv(BLOCK)
        if not data:
            raise UpstreamFailed("instance closed the connection inside a chunked body")
        buf += data
