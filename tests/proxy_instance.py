"""A small real instance server for proxy tests: `python tests/proxy_instance.py <port> <instance-id>`.

Paths: /ping, /echo (method, path, query, headers, body hash), /1k, /sse?n=&interval=,
/sleep?s=, /upload (counts a streamed body, chunked or not), /download?mb=, /hop (answers with
hop-by-hop headers). Every answer carries `X-Instance: <id>`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

INSTANCE_ID = "unset"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    # ---- body helpers ----
    def _body_chunks(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 65536))
                    if not data:
                        return
                    left -= len(data)
                    yield data
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    return
                left -= len(data)
                yield data

    def _send(self, status: int, body: bytes, content_type="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance", INSTANCE_ID)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, payload: dict, status=200, extra=()):
        self._send(status, json.dumps(payload).encode(), extra=extra)

    def _chunk(self, data: bytes):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # ---- routes ----
    def handle_any(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path == "/ping":
            return self._send(200, b"ok", "text/plain")
        if path == "/1k":
            return self._send(200, b"x" * 1024, "text/plain")
        if path == "/sleep":
            time.sleep(float(query.get("s", "1")))
            return self._json({"instance": INSTANCE_ID, "slept": float(query.get("s", "1"))})
        if path == "/upload":
            digest, total = hashlib.sha256(), 0
            for chunk in self._body_chunks():
                digest.update(chunk)
                total += len(chunk)
            return self._json({"instance": INSTANCE_ID, "bytes": total, "sha256": digest.hexdigest()})
        if path == "/download":
            size = int(float(query.get("mb", "1")) * 1024 * 1024)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Instance", INSTANCE_ID)
            self.end_headers()
            block = b"d" * 65536
            while size > 0:
                self.wfile.write(block[: min(size, len(block))])
                size -= len(block)
            return None
        if path == "/sse":
            return self._sse(int(query.get("n", "3")), float(query.get("interval", "0.5")))
        if path == "/hop":
            body = b"hop"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Instance", INSTANCE_ID)
            self.send_header("Connection", "keep-alive, X-Private-Hop")
            self.send_header("X-Private-Hop", "secret")
            self.send_header("Keep-Alive", "timeout=5")
            self.send_header("Set-Cookie", "a=1")
            self.send_header("Set-Cookie", "b=2")
            self.end_headers()
            self.wfile.write(body)
            return None
        # /echo and anything else: describe the request
        digest, total = hashlib.sha256(), 0
        for chunk in self._body_chunks():
            digest.update(chunk)
            total += len(chunk)
        return self._json({
            "instance": INSTANCE_ID,
            "method": self.command,
            "path": path,
            "raw_path": self.path,
            "query": url.query,
            "headers": {k: v for k, v in self.headers.items()},
            "body_bytes": total,
            "body_sha256": digest.hexdigest(),
        })

    def _sse(self, count: int, interval: float):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Instance", INSTANCE_ID)
        self.end_headers()
        for i in range(count):
            self._chunk(f"id: {i}\ndata: {json.dumps({'i': i, 'sent_at': time.time()})}\n\n".encode())
            time.sleep(interval)
        self._chunk(b"event: done\ndata: {}\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def main() -> None:
    global INSTANCE_ID
    port = int(sys.argv[1])
    INSTANCE_ID = sys.argv[2] if len(sys.argv) > 2 else f"i{port}"
    server = Server(("127.0.0.1", port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
