"""Cold-start overhead (issue 7): first response from a `standby` endpoint minus the instance
server's own start-to-ready time, for first and later wakes, fixed port and `$PORT`.

    .venv/bin/python bench/coldstart/run.py [--runs 10] [--idle-retention 2] [--server-delay 0]

Runs `app.py up` as a user does (tests/user_world.py's UpProcess: its own Temporal dev server,
worker, web app and proxy, all at their defaults, on free ports with a data directory of its
own) and uses it through the JSON API and the proxy. The instance is bench/coldstart/instance.py,
started by a command as users write it (README "Ports and readiness"), with no health path:

- fixed port: `python .../instance.py 8080` with `"port": 8080`: each instance runs in its own
  network namespace behind the worker's relay;
- `$PORT`:     `python .../instance.py $PORT`: the host's network, no relay.

`python` is this venv's interpreter (its bin directory goes first in PATH, as if the venv were
activated), so the figures carry no version manager's shim.

One clock for everything (time.time() on this machine): the client's send and receipt; the
instance's own stamps (its /proc process start, first line, listening, first request received,
this request received); the worker's (the instance row's `started_at`, `ready_at`); Temporal's
(event times in the endpoint's and the instance's workflow histories). The server's own
start-to-ready is process start -> listening; the overhead is what the client waited beyond
that.

- Later wakes: one endpoint per variant with an idle retention of `--idle-retention` seconds,
  woken once to warm up, then `--runs` times: wait until both are `standby` again (released
  after the idle retention), then wake one, and a second later the other (the order
  alternating). Both answer within the idle retention of the first, so no release runs while a
  wake is measured; a pair where that did not hold is counted.
- First wakes: `--runs` fresh endpoints per variant, each woken once, between two later-wake
  pairs (once those are back in standby), and stopped right after, so no other instance lives
  while one is measured. Interleaving the two kinds makes a change in the machine's load fall
  on both alike.

Everything else (API and history look-ups) happens after the wakes. `--server-delay 5
--idle-retention 8` makes the server sleep 5 s before it listens, like one that loads a model:
what readiness detection costs such a server. Target (issue 3): <= 150 ms of overhead.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.user_world import UpProcess  # noqa: E402
from workflows.contracts import endpoint_workflow_id, instance_workflow_id  # noqa: E402

INSTANCE = ROOT / "bench" / "coldstart" / "instance.py"
VARIANTS = ("fixed", "$PORT")
# Before each measured wake, the system is left alone this long: the proxy's routing view
# (refreshed every second, STANDBY_PROXY_REFRESH_SECONDS) has seen the endpoint in standby, so the
# wake takes the ordinary cold-start path, and the tail of the previous start or release
# (status writes, the proxy's traffic report a second after a request) is over.
QUIET_SECONDS = 1.2
# Between the two wakes of a later-wake pair: the first one's tail (its ready report, the proxy's
# traffic report) is mostly over, and the second still answers well within the idle retention.
PAIR_GAP_SECONDS = 1.0
# First-wake endpoints are stopped right after their wake; they must not be released before.
LONG_RETENTION_SECONDS = 3600


@dataclass
class ColdStart:
    variant: str
    kind: str  # "first" | "later"
    endpoint: str
    instance_id: str
    sent: float
    answered: float
    server: dict  # what instance.py reported
    overlapped: bool = False
    # Filled in after all wakes: stamp name -> Unix time (worker and Temporal).
    stamps: dict = field(default_factory=dict)

    def at(self, stamp: str) -> float | None:
        if stamp in ("sent", "answered"):
            return getattr(self, stamp)
        return self.server.get(stamp, self.stamps.get(stamp))

    @property
    def own(self) -> float:
        return self.server["listening"] - self.server["process_start"]

    @property
    def total(self) -> float:
        return self.answered - self.sent

    @property
    def overhead(self) -> float:
        return self.total - self.own


# The timeline of one cold start: (label, from stamp, to stamp, what happens); each row prints the
# median of (to - from). Rows without indent are the phases, indented rows the steps inside them.
TIMELINE = [
    ("wake call -> instance spawned", "sent", "process_start", ""),
    ("  endpoint workflow task scheduled", "sent", "ep_task_scheduled", "proxy, update call"),
    ("  wake update accepted", "ep_task_scheduled", "update_accepted", "endpoint workflow task"),
    ("  instance workflow started", "update_accepted", "child_started", "child start"),
    ("  its first workflow task scheduled", "child_started", "child_task_scheduled", "child start, parent told"),
    ("  start_instance activity scheduled", "child_task_scheduled", "activity_scheduled", "instance workflow task"),
    ("  start_instance picked up by worker", "activity_scheduled", "activity_started", "activity dispatch"),
    ("  worker spawned the process", "activity_started", "launched", "provision"),
    ("  process started", "launched", "process_start", "relay, unshare; < 0: exec before Popen returns"),
    ("instance spawned -> server listening", "process_start", "listening", "the server's own start-to-ready"),
    ("  first line", "process_start", "first_line", "interpreter start-up"),
    ("  listening", "first_line", "listening", "imports, bind (and --server-delay)"),
    ("server listening -> ready seen by worker", "listening", "ready_seen", ""),
    ("  first probe reached the server", "listening", "first_request", "relay's listen check, probe interval"),
    ("  worker saw it ready", "first_request", "ready_seen", ""),
    ("ready seen by worker -> first response", "ready_seen", "answered", ""),
    ("  request reached the server", "ready_seen", "this_request", "DB write, proxy's poll, forward"),
    ("  response received", "this_request", "answered", ""),
    ("first response (total)", "sent", "answered", ""),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="cold starts per variant and kind (default 10)")
    parser.add_argument("--idle-retention", type=int, default=2,
                        help="idle retention of the later-wake endpoints, seconds (default 2)")
    parser.add_argument("--server-delay", type=float, default=0.0,
                        help="the instance sleeps this long before it listens, as if it loaded a model "
                             "(default 0); needs an --idle-retention at least 2 s longer")
    args = parser.parse_args()
    if args.idle_retention < args.server_delay + 2:
        parser.error("--idle-retention must be at least --server-delay + 2 s: both wakes of a pair must "
                     "answer within the idle retention of the first")
    specs = variant_specs(args.server_delay)
    began, load_before = time.monotonic(), os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="standby-bench-coldstart-"))
    venv_bin = str(Path(sys.executable).parent)
    up = UpProcess(tmp, extra_env={"PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")])})
    try:
        up.start(timeout=120)
        print(f"app.py up is up in {time.monotonic() - began:.1f} s", flush=True)
        samples = measure(up, specs, args.runs, args.idle_retention)
        add_stamps(up, samples)
    finally:
        try:
            status = up.stop()
            if status != 0:
                print(f"app.py up exited with {status}; its log:\n{up.log()[-3000:]}", file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report(samples, args)
    # The machine may be shared: its load says how much to trust one run against another.
    print(f"\nbench wall time {time.monotonic() - began:.0f} s; load average (1 min) "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs")


# ---------------------------------------------------------------- the two kinds of wake
def variant_specs(server_delay: float) -> dict[str, dict]:
    """Endpoint specs as users write them (README "Your first endpoint in one minute")."""
    delay = f" {server_delay:g}" if server_delay else ""
    script = shlex.quote(str(INSTANCE))
    return {
        "fixed": {"start_command": f"python {script} 8080{delay}", "port": 8080},
        "$PORT": {"start_command": f"python {script} $PORT{delay}"},
    }


def measure(up: UpProcess, specs: dict[str, dict], runs: int, idle_retention: int) -> list[ColdStart]:
    """Rounds of: a later-wake pair, then (once both are back in standby) one first wake per
    variant, so a change in the machine's load falls on both kinds alike."""
    first = {variant: [f"first-{slug(variant)}-{i}" for i in range(runs)] for variant in VARIANTS}
    later = {variant: f"later-{slug(variant)}" for variant in VARIANTS}
    for variant, spec in specs.items():
        for name in first[variant]:
            up.create({"name": name, **spec, "idle_retention_seconds": LONG_RETENTION_SECONDS})
        up.create({"name": later[variant], **spec, "idle_retention_seconds": idle_retention})
    for name in [*later.values(), *(name for names in first.values() for name in names)]:
        up.wait_status(name, "standby")
    later_pair(up, later, list(VARIANTS), idle_retention)  # each one's first wake: a warm-up, not counted
    samples = []
    for i in range(runs):
        order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
        samples += later_pair(up, later, order, idle_retention)
        for variant in order:
            for name in later.values():  # released after the idle retention: nothing else lives
                up.wait_status(name, "standby", timeout=60)
            time.sleep(QUIET_SECONDS)
            samples.append(wake(up, first[variant][i], variant, "first"))
            # Stopped at once, so that no other instance lives while the next one is measured.
            assert up.api("POST", f"/endpoints/{first[variant][i]}/stop").status_code == 202
            up.wait_status(first[variant][i], "stopped")
        print(f"round {i + 1}/{runs} done", flush=True)
    return samples


def later_pair(up: UpProcess, names: dict[str, str], order: list[str], idle_retention: int) -> list[ColdStart]:
    """Both later-wake endpoints, once they are back in standby: one, and a second later the other."""
    for name in names.values():
        up.wait_status(name, "standby", timeout=60)
    time.sleep(QUIET_SECONDS)
    pair = [wake(up, names[order[0]], order[0], "later")]
    time.sleep(PAIR_GAP_SECONDS)
    pair.append(wake(up, names[order[1]], order[1], "later"))
    # The first one's idle retention ran from its answer: its release may have begun.
    pair[1].overlapped = pair[1].answered - pair[0].answered > idle_retention
    return pair


def wake(up: UpProcess, name: str, variant: str, kind: str) -> ColdStart:
    """One request to a sleeping endpoint, timed by the client."""
    conn = http.client.HTTPConnection("127.0.0.1", up.ports["proxy"], timeout=120)
    try:
        sent = time.time()
        conn.request("GET", f"/e/{name}/coldstart")
        response = conn.getresponse()
        body = response.read()
        answered = time.time()
    finally:
        conn.close()
    assert response.status == 200, (response.status, body[:500])
    assert response.getheader("Deploy-Cold-Start") == "true", f"{name}: not a cold start"
    return ColdStart(variant, kind, name, response.getheader("Deploy-Route-Target"), sent, answered,
                     json.loads(body))


# ---------------------------------------------------------------- stamps of the worker and Temporal
def add_stamps(up: UpProcess, samples: list[ColdStart]) -> None:
    for sample in samples:
        rows = up.api("GET", f"/endpoints/{sample.endpoint}/instances").json()["instances"]
        row = next(r for r in rows if r["id"] == sample.instance_id)
        sample.stamps.update(launched=unix(row["started_at"]), ready_seen=unix(row["ready_at"]))
    asyncio.run(_add_history_stamps(f"127.0.0.1:{up.ports['temporal']}", samples))


async def _add_history_stamps(address: str, samples: list[ColdStart]) -> None:
    from temporalio.api.enums.v1 import EventType
    from temporalio.client import Client

    client = await Client.connect(address)

    async def events(workflow_id: str) -> list[tuple[float, str, object]]:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        return [(e.event_time.seconds + e.event_time.nanos / 1e9, EventType.Name(e.event_type), e)
                for e in history.events]

    endpoint_events = {}
    for sample in samples:
        if sample.endpoint not in endpoint_events:
            endpoint_events[sample.endpoint] = await events(endpoint_workflow_id(sample.endpoint))

        def first(source, kind: str, since: float, activity: str = "") -> float | None:
            for at, name, event in source:
                if at >= since and name == f"EVENT_TYPE_{kind}" and (
                        not activity or event.activity_task_scheduled_event_attributes.activity_type.name == activity):
                    return at
            return None

        # Temporal stamps events with the server's clock, which is this machine's.
        mine = endpoint_events[sample.endpoint]
        task = first(mine, "WORKFLOW_TASK_SCHEDULED", sample.sent)
        accepted = first(mine, "WORKFLOW_EXECUTION_UPDATE_ACCEPTED", sample.sent)
        child = await events(instance_workflow_id(sample.endpoint, sample.instance_id))
        scheduled = first(child, "ACTIVITY_TASK_SCHEDULED", 0, activity="start_instance")
        sample.stamps.update(
            ep_task_scheduled=task, update_accepted=accepted,
            child_started=first(child, "WORKFLOW_EXECUTION_STARTED", 0),
            child_task_scheduled=first(child, "WORKFLOW_TASK_SCHEDULED", 0),
            activity_scheduled=scheduled,
            # The started event follows the scheduled one of start_instance (its only activity then).
            activity_started=first(child, "ACTIVITY_TASK_STARTED", scheduled or 0),
        )


# ---------------------------------------------------------------- report
def report(samples: list[ColdStart], args: argparse.Namespace) -> None:
    columns = [(variant, kind) for kind in ("first", "later") for variant in VARIANTS]
    groups = {col: [s for s in samples if (s.variant, s.kind) == col] for col in columns}
    head = "".join(f"{variant + ' ' + kind:>13}" for variant, kind in columns)
    delay = f"; the server sleeps {args.server_delay:g} s before it listens" if args.server_delay else ""
    print(f"\ncold starts through the proxy: medians in ms, {args.runs} per column "
          f"(later wakes: idle retention {args.idle_retention} s{delay})")
    print(f"{'':42}{head}")
    for label, start, end, note in TIMELINE:
        cells = ""
        for col in columns:
            values = [s.at(end) - s.at(start) for s in groups[col]
                      if s.at(start) is not None and s.at(end) is not None]
            cells += f"{statistics.median(values) * 1000:13.1f}" if values else f"{'-':>13}"
        print(f"{label:42}{cells}  {note}".rstrip())
    print("(each row is a median of its own: rows do not add up exactly)")

    print(f"\n{'overhead = total - own start-to-ready':42}{head}")
    measures = [
        ("median", lambda v: statistics.median(v), lambda s: s.overhead),
        ("p90", lambda v: percentile(v, 90), lambda s: s.overhead),
        ("median, own counted from the first line", lambda v: statistics.median(v),
         lambda s: s.total - (s.server["listening"] - s.server["first_line"])),
    ]
    for label, aggregate, measure in measures:
        cells = "".join(f"{aggregate([measure(s) for s in groups[col]]) * 1000:13.1f}" for col in columns)
        print(f"{label:42}{cells}")
    for kind in ("first", "later"):
        fixed = statistics.median(s.overhead for s in groups[("fixed", kind)])
        port = statistics.median(s.overhead for s in groups[("$PORT", kind)])
        print(f"relay's cost, {kind} wakes: fixed-port overhead - $PORT overhead = {(fixed - port) * 1000:.1f} ms")
    print("target (issue 3): overhead <= 150 ms")

    tick = samples[0].server["process_start_tick"]
    uptime_gap = [s.server["process_start_via_uptime"] - s.server["process_start"] for s in samples]
    late = sum(s.server["process_start"] > s.server["first_line"] for s in samples)
    print(f"\nchecks: the /proc process start is truncated to {tick * 1000:.0f} ms, so own start-to-ready reads up "
          f"to that much long and the overhead that much short; through /proc/uptime the same start reads "
          f"{min(uptime_gap) * 1000:+.1f}..{max(uptime_gap) * 1000:+.1f} ms; process starts after the first line: "
          f"{late}; later wakes that overlapped a release: {sum(s.overlapped for s in samples)}")


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1] if len(values) > 1 else values[0]


def unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def slug(variant: str) -> str:
    return "port" if variant == "$PORT" else variant


if __name__ == "__main__":
    main()
