"""CPU the proxy spends per request on its figures: the traffic claim (in-flight counts, the
autoscaler's load) and the metrics (Prometheus, the charts' in-memory aggregates).

    .venv/bin/python bench/proxy/metrics_overhead.py [--against /path/to/another/checkout] [--requests 200000]

Times, in one process per checkout, what the request path calls for its figures, exactly as
proxy/handler.py calls it: `tracker.claim(...)` then `release()`, and `metrics.observe(...)`.
With --against, the same loop runs against that checkout's code (e.g. `git archive <commit>`
unpacked), alternating rounds, and the difference per request is printed. The whole-proxy
figure is `bench/proxy/run.py` (req/s and p50 against nginx); on a shared, noisy machine this
loop isolates the part the metrics add.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOOP = r"""
import inspect, json, sys, time
sys.path.insert(0, sys.argv[1])
from proxy.metrics import Metrics
from proxy.traffic import TrafficTracker
n = int(sys.argv[2])
tracker = TrafficTracker(lambda endpoint, report: None)
metrics = Metrics()
full = len(inspect.signature(metrics.observe).parameters) > 3
for _ in range(2000):  # warm: labelled children cached, aggregates made
    c = tracker.claim("bench", "abcdefgh"); c.release()
    metrics.observe("bench", 200, 0.0004, "abcdefgh", 0.00002, False) if full else metrics.observe("bench", 200, 0.0004)
start = time.perf_counter()
for i in range(n):
    c = tracker.claim("bench", "abcdefgh")
    c.release()
    if full:
        metrics.observe("bench", 200, 0.0004, "abcdefgh", 0.00002, False)
    else:
        metrics.observe("bench", 200, 0.0004)
print(json.dumps({"us_per_request": (time.perf_counter() - start) / n * 1e6}))
"""


def run(root: Path, requests: int) -> float:
    out = subprocess.run([sys.executable, "-c", LOOP, str(root), str(requests)], capture_output=True, text=True,
                         check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])["us_per_request"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout to compare with (the baseline)")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    this, base = [], []
    for _ in range(args.rounds):
        if args.against:
            base.append(run(args.against, args.requests))
        this.append(run(ROOT, args.requests))
    print(f"this checkout: {statistics.median(this):.2f} us of CPU per request for its figures "
          f"(median of {args.rounds} rounds: {', '.join(f'{v:.2f}' for v in this)})")
    if args.against:
        print(f"baseline {args.against}: {statistics.median(base):.2f} us "
              f"({', '.join(f'{v:.2f}' for v in base)})")
        print(f"added per request: {statistics.median(this) - statistics.median(base):+.2f} us "
              f"({statistics.median(this) / statistics.median(base):.2f}x)")


if __name__ == "__main__":
    main()
