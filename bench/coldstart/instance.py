"""Cold-start benchmark instance: a plain HTTP server that reports when it started, on the clock
the benchmark shares with it (time.time(), same machine).

    python bench/coldstart/instance.py PORT [DELAY]

DELAY (seconds, default 0) is slept before binding, in place of loading a model.

`GET <any path>` answers 200 with JSON (all Unix times, seconds):
- `process_start`: when the kernel started this process (/proc/self/stat `starttime`, ticks of
  1/SC_CLK_TCK since boot, put on the wall clock through CLOCK_BOOTTIME, the clock the kernel
  stamps it with). It is truncated to the tick (10 ms here), so the process started up to one
  tick later: `process_start_tick` says how long a tick is;
- `process_start_via_uptime`: the same through /proc/uptime (10 ms granularity), as a check;
- `first_line`: the script's first statement (interpreter start-up is over);
- `listening`: the socket listens (the server is ready as far as it knows);
- `first_request`: the first request it received (the readiness probe of whoever started it);
- `this_request`: when this request's handler began.
"""
import time

FIRST_LINE_AT = time.time()  # the first statement: the script began running

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402


def process_start() -> dict:
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    with open("/proc/self/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the name
    now, since_boot = time.time(), time.clock_gettime(time.CLOCK_BOOTTIME)
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return {"process_start": now - since_boot + start_ticks * tick,
            "process_start_via_uptime": now - uptime + start_ticks * tick,
            "process_start_tick": tick}


TIMES = {"pid": os.getpid(), "first_line": FIRST_LINE_AT, **process_start()}
_first_request = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        arrived = time.time()
        with _first_request:
            TIMES.setdefault("first_request", arrived)
        body = json.dumps({**TIMES, "this_request": arrived}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)  # binds and listens
TIMES["listening"] = time.time()
server.serve_forever()
