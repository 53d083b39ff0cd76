"""An instance that tries to reach what it must not (tests/test_isolation.py) and answers, on
GET /, what each attempt got: its uid and groups, then "read" / "denied" / "missing" per path.
Standard library only; run as `python tests/isolation_probe.py $PORT`."""
from __future__ import annotations

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
        return "read"
    except PermissionError:
        return "denied"
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"error {err.errno}"


def listing(path: str) -> str:
    try:
        os.listdir(path)
        return "read"
    except PermissionError:
        return "denied"
    except FileNotFoundError:
        return "missing"


def write(directory: str) -> str:
    path = os.path.join(directory, f"probe-{os.getpid()}")
    try:
        with open(path, "w") as handle:
            handle.write("x")
        os.unlink(path)
        return "written"
    except PermissionError:
        return "denied"


def signal_process(pid: int) -> str:
    try:
        os.kill(pid, 0)
        return "allowed"
    except PermissionError:
        return "denied"
    except ProcessLookupError:
        return "missing"


class Probe(BaseHTTPRequestHandler):
    def do_GET(self):
        targets = json.loads(os.environ.get("PROBE_TARGETS", "{}"))
        body = json.dumps({
            "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "read": {path: read(path) for path in targets.get("read", [])},
            "list": {path: listing(path) for path in targets.get("list", [])},
            "write": {path: write(path) for path in targets.get("write", [])},
            "signal": {str(pid): signal_process(pid) for pid in targets.get("signal", [])},
            "own_workdir": write(os.getcwd()), "home": write(os.environ.get("HOME", "/nonexistent")),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Probe).serve_forever()
