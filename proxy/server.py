"""The proxy's gunicorn worker: gunicorn's gevent worker, serving each connection with the proxy's
own HTTP/1.1 loop (proxy/http1.py) instead of gunicorn's per-request machinery.

gunicorn keeps what it is good at: the arbiter, worker processes and their signals, the gevent
accept loop and the graceful shutdown. Each accepted connection then goes to `http1.serve`, which
parses requests, calls the WSGI app (proxy/app.py) and writes its answers. Around it:

- **Bytes that are not HTTP** (a TLS ClientHello sent to this plain-HTTP port, a stray binary
  protocol) would wait for a line end that never comes until the client gives up. The first byte
  of a request is a letter (the method), so a connection whose first byte is not one is answered
  400 at once, saying what it got, and closed. A connection silent for 30 s is closed.
- **A protocol switch**, which WSGI has no word for: a WebSocket handshake that the instance
  accepts takes the client's socket over (`take_over`, proxy/websocket.py); the app then answers
  `TAKEN_OVER`, and the connection is the relay's until it closes.
- **Shutting down**: idle keep-alive connections are closed at once (they would hold the worker
  until the graceful timeout), and `ON_SHUTDOWN` hooks run (open WebSockets are told 1001).
"""
from __future__ import annotations

import errno
import socket
import time

from gunicorn.workers.ggevent import GeventWorker

from common.config import load_settings
from proxy import http1
from proxy.http1 import json_error, linger  # noqa: F401 (the error answers of this port)

# How long a new connection may stay silent before its first byte (then keep-alive applies).
FIRST_BYTE_TIMEOUT_SECONDS = 30.0
# How often connections waiting past the keep-alive timeout are looked for.
SWEEP_SECONDS = 1.0
_METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# What the app answers once it took the socket over (any object the server recognises).
TAKEN_OVER = [b""]

# When each open connection was accepted, until its first request reads it (`arrival_of`): a
# request that waited in the accept queue while an instance started waited for that start too.
_ACCEPTED_AT: dict[int, float] = {}
# Open connections, so that a stopping worker closes the idle ones at once.
_CONNECTIONS: set[http1.Connection] = set()
# Called when the worker is asked to stop (SIGTERM, SIGQUIT).
ON_SHUTDOWN: list = []


def arrival_of(sock, now: float) -> float:
    """When the request on `sock` arrived: the accept time for a connection's first request,
    else now (a keep-alive connection's later requests arrive when they are read)."""
    if sock is None or not _ACCEPTED_AT:
        return now
    return min(now, _ACCEPTED_AT.pop(id(sock), now))


def take_over(environ: dict) -> tuple[socket.socket, bytes]:
    """The client's socket, for a protocol switch (WebSocket), and the bytes the server read from
    it past the request. The app answers `TAKEN_OVER` once done with it; the server then neither
    reads another request from it nor writes a response to it."""
    conn: http1.Connection = environ["standby.connection"]
    conn.taken = True
    ahead, conn.buf = conn.buf, b""
    conn.sock.settimeout(None)
    return conn.sock, ahead


class ProxyWorker(GeventWorker):
    def init_process(self):
        self.body_limit = load_settings().proxy_max_body_bytes
        self._sweeper = None
        super().init_process()

    def _sweep_forever(self) -> None:
        """Idle keep-alive connections and slow request heads are closed after the keep-alive
        timeout (proxy/http1.py `sweep`)."""
        import gevent

        while True:
            gevent.sleep(SWEEP_SECONDS)
            try:
                http1.sweep(_CONNECTIONS, time.monotonic(), self.cfg.keepalive)
            except Exception:  # noqa: BLE001 - the sweep must go on
                self.log.exception("connection sweep failed")

    def handle(self, listener, client, addr):
        _ACCEPTED_AT[id(client)] = time.time()
        try:
            self._handle(listener, client, addr)
        finally:
            _ACCEPTED_AT.pop(id(client), None)
            try:
                client.close()
            except OSError:
                pass

    def _handle(self, listener, client, addr):
        client.setblocking(1)
        try:
            client.settimeout(FIRST_BYTE_TIMEOUT_SECONDS)
            first = client.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if not first:
            return
        if first[0] not in _METHOD_START:
            what = "a TLS handshake" if first[0] == 0x16 else f"the byte {first!r}"
            http1.refuse(client, 400, f"this port speaks plain HTTP/1.1 and got {what}; "
                                      "send an HTTP request (http://, not https://)")
            return
        conn = http1.Connection(client)
        environ = self._connection_environ(listener, client, addr)
        _CONNECTIONS.add(conn)
        if self._sweeper is None:
            import gevent

            self._sweeper = gevent.spawn(self._sweep_forever)
        try:
            http1.serve(conn, self.wsgi, environ, self._alive, self.body_limit)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, None):
                self.log.exception("socket error serving a connection")
        except Exception:  # noqa: BLE001 - logged; the connection closes
            self.log.exception("error serving a request")
        finally:
            _CONNECTIONS.discard(conn)

    def _alive(self) -> bool:
        return self.alive

    def _connection_environ(self, listener, client, addr) -> dict:
        base = getattr(self, "_base_environ", None)
        if base is None:
            host, port = listener.getsockname()[:2]
            base = self._base_environ = http1.base_environ(str(host), port, self.cfg.workers > 1)
        environ = base.copy()
        if isinstance(addr, tuple):
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(addr[0]), str(addr[1])
        else:
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = "", ""
        environ["gunicorn.socket"] = client
        return environ

    # ---- stopping ----
    def _shutting_down(self) -> None:
        for conn in list(_CONNECTIONS):
            if conn.idle:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for hook in ON_SHUTDOWN:
            try:
                hook()
            except Exception:  # noqa: BLE001 - every hook gets its turn
                self.log.exception("shutdown hook failed")

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        import gevent

        gevent.spawn(self._shutting_down)

    def handle_quit(self, sig, frame):
        import gevent

        gevent.spawn(self._shutting_down)
        super().handle_quit(sig, frame)
