"""Cold-start benchmark instance: answers with its own process start and ready times.

`X-Started-At`: when the kernel started this process (from /proc, so interpreter start-up
counts as the server's own start time); `X-Ready-At`: when it began listening.
"""
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def process_started_at() -> float:
    with open("/proc/stat") as fh:
        btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    with open(f"/proc/{os.getpid()}/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    return btime + start_ticks / os.sysconf("SC_CLK_TCK")


STARTED_AT = process_started_at()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Started-At", repr(STARTED_AT))
        self.send_header("X-Ready-At", repr(READY_AT))
        self.end_headers()
        self.wfile.write(body)


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
READY_AT = time.time()
server.serve_forever()
