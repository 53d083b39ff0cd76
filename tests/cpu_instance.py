"""A CPU-bound instance for the utilisation autoscaling test: `python tests/cpu_instance.py <port>`.

It answers HTTP on the port and, all the while, keeps one core busy (as a model busy with work
would), so the worker measures it near 100% of one CPU core."""
from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def burn() -> None:
    while True:
        sum(i * i for i in range(10_000))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b"busy\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    threading.Thread(target=burn, daemon=True).start()
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
