"""The web app's gunicorn worker: gthread, with two changes for hostile clients.

1. **Slow clients cost no thread.** gunicorn's gthread worker hands a connection to a pool
   thread as soon as its first byte arrives, and that thread then blocks until the whole header
   block is in. Eight clients sending headers at one byte a second held all eight threads, and a
   normal request waited behind them. Here a pool thread takes what has arrived without waiting:
   while the header block is incomplete the connection goes back to the worker's poller
   (gunicorn's own "pending" queue) and the thread is free again at once; gunicorn's parser gets
   the bytes once the headers are all there. A client that takes longer than HEADER_TIMEOUT_SECONDS for its headers is
   disconnected, and one that goes quiet is closed after the keep-alive timeout, as gunicorn does.
   The app stays on threads rather than gevent: its Temporal client lives on an asyncio thread
   (common/temporal_bridge.py) and archive checks are CPU work, both of which suit threads.

2. **Every error gunicorn answers itself is JSON** (a request line over `limit_request_line` is
   414, a malformed request 400, oversized headers 431), like the app's own errors, so an API
   client never has to parse gunicorn's HTML page.
"""
from __future__ import annotations

import json
import socket
import time

from gunicorn.workers import gthread

HEADER_TIMEOUT_SECONDS = 10.0
LINGER_SECONDS = 1.0
# Past this many bytes without the end of the headers, the thread hands them to gunicorn's
# parser, which reads the rest and refuses what its limits refuse, as before.
_MAX_HEADER_BYTES = 64 * 1024
_DEFER = gthread._DEFER  # gunicorn's "give the connection back to the poller" answer


class _CapturedError:
    """Stands in for the client socket while gunicorn writes its HTML error page, keeping the
    status line for the JSON answer written instead."""

    def __init__(self):
        self.data = b""

    def gettimeout(self):
        return 0.0

    def setblocking(self, _flag):
        pass

    def sendall(self, data):
        self.data += data

    send = sendall


def _shut(sock) -> None:
    """Shut both directions: gunicorn's close of the connection then returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _linger(sock, seconds: float = LINGER_SECONDS) -> None:
    """Half-close, read what the client still sends until it closes (bounded), then shut."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < 65536 and (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            data = sock.recv(4096)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    _shut(sock)


class WebWorker(gthread.ThreadWorker):
    def handle(self, conn):
        ready = self._collect_headers(conn)
        if ready is _DEFER:
            return _DEFER  # wait in the poller for more bytes
        if ready is False:
            _shut(conn.sock)
            return False
        buffered = getattr(conn, "header_bytes", b"")
        conn.header_bytes, conn.header_started = b"", None
        if buffered:
            conn.init()  # the parser, for a new connection; a kept-alive one has it already
            conn.parser.unreader.unread(buffered)
            conn.data_ready = True
        keep_alive = super().handle(conn)
        if not keep_alive:
            # gunicorn closes in its main loop, lingering up to 2 s per connection for the client
            # to close first (so unread request bytes cannot turn into a reset that cuts the
            # answer short). A client that never closes then stalls every other connection for
            # those 2 s; lingering here, in this connection's own thread, stalls nobody else.
            _linger(conn.sock)
        return keep_alive

    def _collect_headers(self, conn):
        """Read what the client has sent so far, without waiting. True once the header block is
        complete (the bytes then go to gunicorn's parser); _DEFER to wait for more; False to close.

        The bytes are taken off the socket, not peeked: the poller then wakes the connection only
        when more arrive."""
        if self.cfg.is_ssl or getattr(conn, "is_http2", False):
            return True
        if conn.parser is not None and conn.parser.unreader.buf.getvalue():
            return True  # bytes of the next request already read (pipelining)
        collected = getattr(conn, "header_bytes", b"")
        while len(collected) < _MAX_HEADER_BYTES:
            try:
                chunk = conn.sock.recv(_MAX_HEADER_BYTES - len(collected), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return False
            if not chunk:
                return False  # the client closed before completing a request
            collected += chunk
        conn.header_bytes = collected
        if b"\r\n\r\n" in collected or b"\n\n" in collected or len(collected) >= _MAX_HEADER_BYTES:
            return True
        now = time.monotonic()
        started = getattr(conn, "header_started", None)
        if started is None:
            conn.header_started = now
        elif now - started > HEADER_TIMEOUT_SECONDS:
            self.log.info("closing %s: its request headers took longer than %gs", conn.client, HEADER_TIMEOUT_SECONDS)
            return False
        return _DEFER

    def handle_error(self, req, client, addr, exc):
        captured = _CapturedError()
        super().handle_error(req, captured, addr, exc)
        status_line = captured.data.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        status = parts[1] if len(parts) > 1 and parts[1].isdigit() else "500"
        reason = parts[2] if len(parts) > 2 else "Internal Server Error"
        message = reason if status == "500" else f"{reason}: {str(exc)[:200]}"
        body = json.dumps({"error": message, "errors": {}}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            client.setblocking(True)
            client.settimeout(5)
            client.sendall(head + body)
        except Exception:  # the client may be gone already; gunicorn ignores that too
            self.log.debug("failed to send the error answer")
