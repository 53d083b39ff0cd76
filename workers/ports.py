"""How an instance gets its port (docs/architecture.md "Ports and readiness"), decided from the
start command alone.

- A command that says `$PORT`, `${PORT}` or `{port}` gets a free port substituted and shares the
  host's network: any number of instances run side by side.
- Any other command listens on the endpoint's `port`, as written (`python -m http.server 8080`).
  Each instance then runs in its own network namespace (workers/netns_relay.py) and is reached
  through a host port Standby picks. Where this host cannot make network namespaces (neither
  root / CAP_SYS_ADMIN nor unprivileged user namespaces), such a command is refused with a
  message that says what to change, at create and at start.
"""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

_PORT_PATTERN = re.compile(r"\{port\}|\$\{PORT\}|\$PORT(?![A-Za-z0-9_])")
RELAY_SCRIPT = Path(__file__).resolve().parent / "netns_relay.py"


def substitute_port(command: str, port: int) -> str:
    """Replace `{port}`, `$PORT` and `${PORT}`; other braces and `$PORTS` are left alone."""
    return _PORT_PATTERN.sub(str(port), command)


def uses_port_placeholder(command: str) -> bool:
    return bool(_PORT_PATTERN.search(command or ""))


@functools.lru_cache(maxsize=1)
def namespace_mode() -> str | None:
    """`net` (root), `user+net` (unprivileged user namespaces), or None where neither works.
    Checked once per process by a short-lived child, so this process's namespace is untouched."""
    if not sys.platform.startswith("linux"):
        return None
    for mode in ("net", "user+net"):
        try:
            done = subprocess.run([sys.executable, str(RELAY_SCRIPT), "--check", mode],
                                  capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return mode
    return None


def fixed_port_refusal(port: int) -> str:
    return (f"this command listens on a fixed port ({port}), which needs a network namespace per "
            "instance, and this host cannot create one (run the worker as root, or allow "
            "unprivileged user namespaces); or write $PORT in the start command where the port "
            f"goes, e.g. `python -m http.server $PORT` instead of `python -m http.server {port}`")
