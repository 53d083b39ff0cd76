"""SSE relay delay: time from the instance writing an event to the client reading it.

    .venv/bin/python bench/stream/run.py [--events 200] [--interval 0.01]

The instance (tests/proxy_instance.py /sse) stamps each event with the time it wrote it; the
client stamps the time it read it, directly and through Standby's proxy (same host, same
clock). Prints the median and p95 of the delay for both, and the proxy's share.
Target (issue 3): <= 5 ms through the proxy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.proxy_fixtures import ProxyWorld  # noqa: E402


def delays(host: str, port: int, path: str) -> list[float]:
    """Read an SSE response over a raw socket (no client-side buffering), one delay per event."""
    sock = socket.create_connection((host, port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
    out, buf = [], b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            now = time.time()
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    # Chunk-size lines are interleaved in the raw bytes; only data lines count.
                    if line.startswith(b"data: {\"i\""):
                        out.append((now - json.loads(line[6:])["sent_at"]) * 1000)
                if b"event: done" in event:
                    return out
    finally:
        sock.close()
    return out


def summary(values: list[float]) -> str:
    values = sorted(values)
    return f"median {statistics.median(values):.2f} ms, p95 {values[int(len(values) * 0.95) - 1]:.2f} ms (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="standby-bench-stream-"))
    world = ProxyWorld(tmp)
    try:
        world.add_endpoint("stream")
        inst = world.add_instance("stream", "streamer")
        world.start_proxy()
        path = f"/sse?n={args.events}&interval={args.interval}"
        delays("127.0.0.1", inst.port, path)  # warm up
        direct = delays("127.0.0.1", inst.port, path)
        proxied = delays("127.0.0.1", world.proxy.port, f"/e/stream{path}")
        print(f"direct       {summary(direct)}")
        print(f"via standby  {summary(proxied)}")
        added = statistics.median(proxied) - statistics.median(direct)
        print(f"added by the proxy (median): {added:.2f} ms (target: <= 5 ms end to end through the proxy)")
    finally:
        world.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
