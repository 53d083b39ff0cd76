"""The HTTP/1.1 server under the proxy's WSGI app: one loop per client connection.

gunicorn stays the server process (arbiter, workers, signals, graceful shutdown, the gevent accept
loop); what it does per request is done here instead, because it was most of the proxy's cost:
`bench/proxy` measured 154 µs of CPU per proxied request where nginx spends 13 µs, and a profile
of one warm request put 80 of its 141 µs of user CPU in gunicorn's per-request machinery and
gevent's socket wrappers around it: its parser building a message object, a body reader stack
and a config lookup per setting, the environ, a Response object that validates and re-joins
every header, and two writes per answer (bench/README.md, "The proxy's hot path"). This loop
reads a request head with one `recv` into a buffer, checks it with a handful of C-level string
operations, builds the environ from one copied dict, and writes each answer's head together with
its first body piece in one `send` (docs/architecture.md, "The proxy's HTTP/1.1 server").

It keeps gunicorn's rules for what a request may be (hostile input, docs/architecture.md): a
request line of at most 4094 bytes (414), at most 100 header fields of at most 8190 bytes each
(431), CRLF line ends, no obsolete line folding, no control bytes, header names that are tokens
(a space before the colon is refused: request smuggling), header names with `_` dropped (they
would pass for `-` in the environ), Content-Length digits only and given once, no
Content-Length beside Transfer-Encoding, and `chunked` as the only transfer coding (501 for
another). Every refusal is JSON, and the connection closes after it.
"""
from __future__ import annotations

import json
import re
import socket
import sys
import time
from email.utils import formatdate
from urllib.parse import unquote_to_bytes

MAX_REQUEST_LINE = 4094
MAX_HEADER_FIELDS = 100
MAX_HEADER_FIELD = 8190
MAX_HEAD = MAX_REQUEST_LINE + 2 + MAX_HEADER_FIELDS * (MAX_HEADER_FIELD + 2) + 2
BLOCK = 64 * 1024
# A request body left unread by the answer (an early error) is read away, up to this much, so
# that the connection can serve the next request; a larger one closes the connection instead.
DRAIN_LIMIT = 64 * 1024
DRAIN_SECONDS = 1.0

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,19}")
# Control bytes other than tab (a header value holding one is refused).
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NO_BODY_STATUS = ("1", "204", "304")

STATUS_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long",
                  431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
                  505: "HTTP Version Not Supported"}


def send_all(sock, data) -> None:
    """`sock.sendall(data)` for the proxy's sockets. gevent's sendall asks the kernel for the
    socket's buffer size on every call (a syscall per write); one `send` writes a whole answer
    of the usual size, and only a rest goes through sendall."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Connection:
    """One client connection: its socket and the bytes read from it but not yet used."""

    __slots__ = ("sock", "buf", "taken", "idle", "waiting_since")

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.taken = False  # handed over for a protocol switch (proxy/server.py take_over)
        self.idle = False  # waiting for its next request (closed at once on shutdown)
        # Since when it waits for (the rest of) a request head; 0: it does not. The server's
        # sweeper closes a connection waiting longer than the keep-alive timeout: one timer for
        # all connections instead of a timeout armed and disarmed around every read.
        self.waiting_since = 0.0

    def read_head(self) -> str | None:
        """The next request head (latin-1 text, without its blank line), or None when the client
        closed before a request began."""
        buf = self.buf
        if buf[:1] == b"\r":
            buf = buf.lstrip(b"\r\n")  # empty lines before a request line are ignored (RFC 9112 2.2)
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            sock = self.sock
            if sock.timeout is not None:
                sock.settimeout(None)
            self.waiting_since = time.monotonic()
            self.idle = not buf
            # A head arriving in many small pieces is gathered in a bytearray and each piece is
            # searched once (from 3 bytes before it), so a client trickling a large head costs
            # linear time, not a copy and a scan of everything so far per piece.
            pending = bytearray(buf)
            try:
                while end < 0:
                    if len(pending) > MAX_HEAD:
                        raise BadRequest(431, "the request's header fields are too large")
                    data = sock.recv(BLOCK)
                    if not data:
                        if pending:
                            raise BadRequest(400, "the connection ended inside the request's head")
                        return None
                    start = max(0, len(pending) - 3)
                    pending += data
                    self.idle = False
                    if pending[:1] == b"\r":
                        pending = pending.lstrip(b"\r\n")
                        start = 0
                    end = pending.find(b"\r\n\r\n", start)
                    if end < 0:
                        if pending.find(b"\n\n", start) >= 0 or pending.find(b"\n\r\n", start) >= 0:
                            raise BadRequest(400, "the request's lines end in a bare LF; end them in CRLF")
                        if (len(pending) > MAX_REQUEST_LINE + 2
                                and pending.find(b"\r\n", 0, MAX_REQUEST_LINE + 2) < 0):
                            raise BadRequest(414, f"the request line is over {MAX_REQUEST_LINE} bytes")
            finally:
                self.waiting_since = 0.0
                self.idle = False
            buf = bytes(pending)
        self.buf = buf[end + 4:]
        return buf[:end].decode("latin-1")

    def recv(self, size: int) -> bytes:
        """Body bytes: what was read ahead first, then the socket."""
        buf = self.buf
        if buf:
            if len(buf) <= size:
                self.buf = b""
                return buf
            self.buf = buf[size:]
            return buf[:size]
        return self.sock.recv(size)

    def read_line(self, limit: int) -> bytes:
        """A CRLF-ended line (chunk sizes, trailers), without its CRLF."""
        buf = self.buf
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end >= 0:
                self.buf = buf[end + 2:]
                return buf[:end]
            if len(buf) > limit:
                raise ValueError(f"a chunk-size or trailer line over {limit} bytes")
            start = max(0, len(buf) - 1)
            data = self.sock.recv(BLOCK)
            if not data:
                raise ValueError("the connection ended inside a chunked body")
            buf += data
            self.buf = buf


class _Expect:
    """Sends `100 Continue` once, when the app first reads a body the client waits to send."""

    __slots__ = ("conn", "pending")

    def __init__(self, conn: Connection, pending: bool):
        self.conn, self.pending = conn, pending

    def go(self) -> None:
        if self.pending:
            self.pending = False
            send_all(self.conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")


class LengthInput:
    """`wsgi.input` of a body of known length; b"" at its end, or early if the client stops."""

    __slots__ = ("conn", "left", "expect")

    def __init__(self, conn: Connection, length: int, expect: _Expect):
        self.conn, self.left, self.expect = conn, length, expect

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        if self.expect.pending:
            self.expect.go()
        if size is None or size < 0 or size > self.left:
            size = self.left
        data = self.conn.recv(min(size, BLOCK))
        self.left -= len(data)
        if not data:
            self.left = 0  # the client stopped: what arrived is all there is
        return data

    @property
    def finished(self) -> bool:
        return self.left <= 0


class ChunkedInput:
    """`wsgi.input` of a chunked body, decoded; a chunk larger than `limit` (the proxy's body
    limit) is refused as soon as its size line arrives, not waited for."""

    __slots__ = ("conn", "limit", "expect", "left", "done")

    def __init__(self, conn: Connection, limit: int, expect: _Expect):
        self.conn, self.limit, self.expect = conn, limit, expect
        self.left = 0  # bytes of the current chunk still to read
        self.done = False

    def read(self, size: int = -1) -> bytes:
        if self.done:
            return b""
        if self.expect.pending:
            self.expect.go()
        conn = self.conn
        if not self.left:
            line = conn.read_line(1024)
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                raise ValueError(f"invalid chunk size {size_text[:20]!r}")
            chunk = int(size_text, 16)
            if chunk > self.limit:
                raise ValueError(f"a chunk of {chunk} bytes is over the proxy's body limit of {self.limit} bytes")
            if chunk == 0:
                for _ in range(MAX_HEADER_FIELDS + 1):  # trailers: read and dropped
                    if not conn.read_line(MAX_HEADER_FIELD):
                        self.done = True
                        return b""
                raise ValueError("too many trailer fields")
            self.left = chunk
        if size is None or size < 0:
            size = BLOCK
        data = conn.recv(min(size, self.left, BLOCK))
        if not data:
            raise ValueError("the connection ended inside a chunk")
        self.left -= len(data)
        if not self.left and conn.read_line(2) != b"":
            raise ValueError("a chunk longer than its size")
        return data

    @property
    def finished(self) -> bool:
        return self.done


class _NoBody:
    __slots__ = ()
    finished = True

    def read(self, size: int = -1) -> bytes:
        return b""


NO_BODY = _NoBody()

_date = [0, ""]


def date_header() -> str:
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, f"Date: {formatdate(now, usegmt=True)}\r\n"
    return _date[1]


# Header names seen before -> their environ key ("" for a name that is dropped). Clients send the
# same few names over and over: one lookup instead of a token check and three string operations.
_ENVIRON_KEYS: dict[str, str] = {}
_KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}


def _environ_key(name: str) -> str | None:
    """The environ key of a header name; "" to drop it; None when it is not a token."""
    key = _ENVIRON_KEYS.get(name)
    if key is not None:
        return key
    if not _TOKEN.fullmatch(name):
        return None
    if "_" in name:
        key = ""  # would pass for a '-' in the environ (gunicorn drops them too)
    else:
        key = name.upper().replace("-", "_")
        if key != "CONTENT_LENGTH" and key != "CONTENT_TYPE":
            key = "HTTP_" + key
    if len(_ENVIRON_KEYS) < 4096:
        _ENVIRON_KEYS[name] = key
    return key


def parse_head(text: str, conn: Connection, base: dict, body_limit: int) -> dict:
    """The environ of one request head; BadRequest says what is wrong with it."""
    line_end = text.find("\r\n")
    request_line = text if line_end < 0 else text[:line_end]
    if len(request_line) > MAX_REQUEST_LINE:
        raise BadRequest(414, f"the request line is over {MAX_REQUEST_LINE} bytes")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise BadRequest(400, f"malformed request line {request_line[:100]!r}; write METHOD /path HTTP/1.1")
    method, target, version = parts
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        if version.startswith("HTTP/") and version.isprintable():
            raise BadRequest(505, f"{version} is not spoken here; send HTTP/1.1")
        raise BadRequest(400, f"malformed request line {request_line[:100]!r}; write METHOD /path HTTP/1.1")
    if method not in _KNOWN_METHODS and not _METHOD.fullmatch(method):
        raise BadRequest(400, f"invalid method {method[:20]!r}")
    # Visible ASCII only (str.isprintable also refuses DEL): raw non-ASCII bytes are refused, as
    # gunicorn did.
    if not target or not target.isascii() or not target.isprintable():
        raise BadRequest(400, f"invalid request target {target[:100]!r}")

    environ = base.copy()
    headers: list[tuple[str, str]] = []
    if line_end >= 0:
        lines = text[line_end + 2:].split("\r\n")
        if len(lines) > MAX_HEADER_FIELDS:
            raise BadRequest(431, f"more than {MAX_HEADER_FIELDS} header fields")
        for line in lines:
            name, colon, value = line.partition(":")
            key = _environ_key(name) if colon else None
            if key is None:
                if line[:1] in (" ", "\t"):
                    raise BadRequest(400, "obsolete line folding is refused: put each header on one line")
                raise BadRequest(400, f"invalid header line {line[:60]!r}")
            if len(line) > MAX_HEADER_FIELD:
                raise BadRequest(431, f"a header field over {MAX_HEADER_FIELD} bytes")
            value = value.strip(" \t")
            # A value holds visible characters, spaces, tabs and obs-text; never a control byte,
            # and so never a CR or LF that is not a line's end (header injection, smuggling).
            if not value.isprintable() and _BAD_VALUE.search(value):
                raise BadRequest(400, f"the {name} header holds a control character (a bare CR or LF?); "
                                      "lines end in CRLF")
            if not key:
                continue
            headers.append((name, value))
            if key in environ:
                if key == "CONTENT_LENGTH" or key == "CONTENT_TYPE":
                    raise BadRequest(400, f"{name} is given twice")
                value = environ[key] + "," + value
            environ[key] = value

    environ["REQUEST_METHOD"] = method
    environ["RAW_URI"] = target
    environ["SERVER_PROTOCOL"] = version
    if target[0] != "/":
        target = _origin_form(target)
    path, _, query = target.partition("?")
    if "#" in path or "#" in query:
        path, query = path.partition("#")[0], query.partition("#")[0]
    environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
    environ["QUERY_STRING"] = query
    environ["standby.headers"] = headers

    transfer = environ.get("HTTP_TRANSFER_ENCODING")
    length = environ.get("CONTENT_LENGTH")
    if transfer is not None:
        if length is not None:
            raise BadRequest(400, "Content-Length and Transfer-Encoding together are refused; send one")
        if transfer.strip().lower() != "chunked":
            raise BadRequest(501, f"Transfer-Encoding {transfer[:40]!r} is not supported; send the body chunked "
                                  "or with a Content-Length")
        environ["wsgi.input"] = ChunkedInput(conn, body_limit, _expect(conn, environ, version))
    elif length is not None:
        if not length.isdigit() or not length.isascii():
            raise BadRequest(400, f"Content-Length must be a number of bytes, got {length[:20]!r}")
        size = int(length)
        environ["wsgi.input"] = LengthInput(conn, size, _expect(conn, environ, version)) if size else NO_BODY
    else:
        environ["wsgi.input"] = NO_BODY
    return environ


def _expect(conn: Connection, environ: dict, version: str) -> _Expect:
    return _Expect(conn, version == "HTTP/1.1" and environ.get("HTTP_EXPECT", "").lower() == "100-continue")


def _origin_form(target: str) -> str:
    """The path and query of an absolute-form target (`http://host/path?q`), `*`, or an
    authority (CONNECT): the last two have none."""
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        slash = rest.find("/")
        query = rest.find("?")
        if slash < 0 or 0 <= query < slash:
            return "/" + (rest[query:] if query >= 0 else "")
        return rest[slash:]
    return ""


class Response:
    """start_response and the writing of one answer: the head goes out with the first body
    piece, framed by the app's Content-Length, else chunked (HTTP/1.1) or by closing (1.0)."""

    __slots__ = ("sock", "method", "version", "keep_alive", "status", "headers", "head_sent", "chunked",
                 "left", "no_body")

    def __init__(self, sock, method: str, version: str, keep_alive: bool):
        self.sock = sock
        self.method, self.version, self.keep_alive = method, version, keep_alive
        self.status: str | None = None
        self.headers: list | None = None
        self.head_sent = False
        self.chunked = False
        self.left: int | None = None  # body bytes the app announced and has yet to give
        self.no_body = False

    def start_response(self, status: str, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response was called twice without exc_info")
        self.status, self.headers = status, headers
        return self.write

    def _head(self) -> str:
        status = self.status
        if status is None:
            raise AssertionError("the app returned without calling start_response")
        self.no_body = self.method == "HEAD" or status.startswith(_NO_BODY_STATUS)
        lines = [f"HTTP/1.1 {status}\r\n"]
        has_date = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length":
                try:
                    self.left = int(value)
                except ValueError:
                    raise ValueError(f"the app gave a bad Content-Length {value!r}") from None
            elif lower == "date":
                has_date = True
            lines.append(f"{name}: {value}\r\n")
        if not has_date:
            lines.append(date_header())
        if self.left is None and not self.no_body:
            if self.version == "HTTP/1.1":
                self.chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif self.version == "HTTP/1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines)

    def write(self, data: bytes) -> None:
        if self.head_sent:
            if not data or self.no_body:
                return
            send_all(self.sock, self._framed(data))
            return
        head = self._head().encode("latin-1")
        self.head_sent = True
        if data and not self.no_body:
            send_all(self.sock, head + self._framed(data))
        else:
            send_all(self.sock, head)

    def _framed(self, data: bytes) -> bytes:
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        if self.left is not None:
            if len(data) > self.left:
                data = data[:self.left]  # never more than announced: the next answer would be garbled
            self.left -= len(data)
        return data

    def finish(self) -> None:
        """After the app's last piece: the head if nothing went yet, the chunked body's end; an
        answer cut short of its Content-Length closes the connection."""
        if not self.head_sent:
            self.write(b"")
        if self.chunked:
            send_all(self.sock, b"0\r\n\r\n")
        elif self.left and not self.no_body:
            self.keep_alive = False


def json_error(status_int: int, reason: str, message: str) -> bytes:
    """A whole JSON error answer that closes the connection."""
    body = json.dumps({"code": status_int, "msg": message}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    return head + body


def linger(sock, seconds: float = 1.0, most: int = 1 << 20) -> None:
    """Before closing with the client's bytes still unread: half-close and drain them a moment,
    else the kernel resets the connection and the client may lose the answer before reading it
    (a "lingering close")."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds)
        drained = 0
        while drained < most:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass


def refuse(sock, status: int, message: str) -> None:
    try:
        sock.sendall(json_error(status, STATUS_REASONS.get(status, "Error"), message))
        linger(sock)
    except OSError:
        pass


def serve(conn: Connection, app, conn_environ: dict, worker_alive, body_limit: int) -> None:
    """Serve the requests of one connection until it closes, a request asks to close, or the app
    takes the socket over. `worker_alive()` False: the current answer is the last. A request
    refused here is answered JSON, and the connection closes."""
    sock = conn.sock
    while True:
        try:
            text = conn.read_head()
            if text is None:
                return
            environ = parse_head(text, conn, conn_environ, body_limit)
        except BadRequest as exc:
            refuse(sock, exc.status, str(exc))
            return
        version = environ["SERVER_PROTOCOL"]
        connection = environ.get("HTTP_CONNECTION", "").lower()
        if version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection
        response = Response(sock, environ["REQUEST_METHOD"], version, keep_alive and worker_alive())
        environ["standby.connection"] = conn
        result = None
        try:
            result = app(environ, response.start_response)
            if conn.taken:
                return
            write = response.write
            for piece in result:
                write(piece)
            response.finish()
        except OSError:
            raise  # the client went away: nothing to answer
        except Exception as exc:
            if response.head_sent:
                raise  # the answer is cut off; the connection closes
            refuse(sock, 500, f"the proxy failed: {type(exc).__name__}: {exc}"[:300])
            raise
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not _body_done(conn, environ["wsgi.input"]):
            linger(sock)
            return
        if not response.keep_alive:
            return


def _body_done(conn: Connection, body) -> bool:
    """Whether the request's body was read to its end (reading away a small rest), so that the
    connection can carry the next request."""
    if body.finished:
        return True
    if isinstance(body, LengthInput) and body.left <= DRAIN_LIMIT and not body.expect.pending:
        conn.sock.settimeout(DRAIN_SECONDS)  # read_head clears it
        try:
            while body.left > 0:
                if not body.read(BLOCK):
                    return False
        except (OSError, socket.timeout):
            return False
        return True
    return False


def base_environ(server_name: str, server_port: int, multiprocess: bool) -> dict:
    return {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "SERVER_SOFTWARE": "standby-proxy",
        "SCRIPT_NAME": "",
        "SERVER_NAME": server_name,
        "SERVER_PORT": str(server_port),
    }


def sweep(connections, now: float, keepalive: float) -> int:
    """Close the connections that have waited for a request head longer than `keepalive`
    (an idle keep-alive connection, or a client sending its head too slowly); how many."""
    closed = 0
    for conn in list(connections):
        since = conn.waiting_since
        if since and now - since > keepalive:
            conn.waiting_since = 0.0
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            closed += 1
    return closed
