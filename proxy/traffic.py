"""In-flight counts and last-request times per instance, reported to the lifecycle, debounced.

The lifecycle never releases an instance whose aggregated in-flight count is above zero and runs
its idle timer from `last_request_at`, so this process reports (per endpoint, one `traffic`
signal per debounce interval at most): whenever its figures changed since its last report, every
`periodic_seconds` while any instance has requests in flight, and so always soon after the
in-flight count drops back to zero. Never one signal per request.

One exception to the debounce: a request that begins on an instance after a quiet spell is
reported at the next tick (`URGENT_TICK_SECONDS`), because the lifecycle may be about to drain
that instance (it starts draining shortly before the idle retention ends, see
workflows/lifecycle.py); under steady traffic no instance is ever quiet, so this adds no signals.

`claim()` is the one way a request takes and gives back its place on an instance: the claim is
released exactly once, whatever path the request leaves by.

A proxy process that dies takes its in-flight requests with it, but the lifecycle would still
count them (until its report goes stale, a minute later) and keep their instances, and GPUs,
for nothing. So each process reports under a *slot* (`ReporterSlot`): a numbered lock file that
the kernel releases when the process dies, and a file of what it last reported. Its successor
(gunicorn's replacement worker, or the restarted proxy) takes the free slot, reads that file and
reports the dead process's requests as ended: one report interval after the restart, the counts
are right again.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from workflows.contracts import InstanceTraffic, TrafficReport

# Entries idle this long, with nothing in flight, are dropped from reports.
FORGET_AFTER_SECONDS = 600.0
# A request on an instance that saw none for this long is reported without waiting out the debounce.
QUIET_SPELL_SECONDS = 1.0
# How often the reporter looks for due reports (an urgent one waits at most this long).
URGENT_TICK_SECONDS = 0.05


@dataclass
class _InstanceFigures:
    in_flight: int = 0
    last_request_at: float = 0.0
    requests: int = 0
    errors: int = 0


@dataclass
class _EndpointFigures:
    instances: dict[str, _InstanceFigures] = field(default_factory=dict)
    held: int = 0
    dirty: bool = False
    urgent: bool = False
    last_sent: float = 0.0  # monotonic
    # Requests in flight or held now, and the request-seconds they added up to (the load the
    # autoscaler averages), counted up to `load_since` (wall clock, as the request times).
    load: int = 0
    load_seconds: float = 0.0
    load_since: float = 0.0

    def busy(self) -> bool:
        return any(fig.in_flight > 0 for fig in self.instances.values())

    def add_load(self, delta: int, now: float) -> None:
        self.load_seconds += self.load * (now - self.load_since)
        self.load_since = now
        self.load = max(0, self.load + delta)


def default_reporter_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Claim:
    """One request's place on one instance: counted in flight from creation until `release()`,
    which is idempotent, so every exit path may call it (forward.StreamedResponse.close, error
    answers, exceptions)."""

    __slots__ = ("_tracker", "endpoint", "instance_id", "_held")

    def __init__(self, tracker: "TrafficTracker", endpoint: str, instance_id: str):
        self._tracker, self.endpoint, self.instance_id = tracker, endpoint, instance_id
        self._held = True
        tracker.begin(endpoint, instance_id)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._tracker.end(self.endpoint, self.instance_id)

    @property
    def held(self) -> bool:
        return self._held


class ReporterSlot:
    """This process's reporter identity (`<host>:<port>:<slot>`), held by an flock on
    `<dir>/<port>-<slot>.lock`, and the file of its last reports, `<dir>/<port>-<slot>.json`."""

    def __init__(self, directory: Path, port: int, max_slots: int = 256):
        import fcntl

        directory.mkdir(parents=True, exist_ok=True)
        for slot in range(max_slots):
            fd = os.open(directory / f"{port}-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._fd = fd  # held for the life of the process
            self.reporter = f"{socket.gethostname()}:{port}:{slot}"
            self.path = directory / f"{port}-{slot}.json"
            return
        raise RuntimeError(f"no free reporter slot under {directory} (more than {max_slots} proxy processes?)")

    def load(self) -> dict[str, TrafficReport]:
        try:
            raw = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        reports = {}
        for endpoint, item in raw.items():
            instances = [InstanceTraffic(**i) for i in item.get("instances", [])]
            reports[endpoint] = TrafficReport(item["reporter"], item["seq"], item["sent_at"], instances,
                                              item.get("held", 0))
        return reports

    def save(self, reports: dict[str, TrafficReport]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: asdict(report) for name, report in reports.items()}))
        os.replace(tmp, self.path)


class TrafficTracker:
    def __init__(
        self,
        send: Callable[[str, TrafficReport], None],
        debounce_seconds: float = 1.0,
        periodic_seconds: float = 10.0,
        reporter: str | None = None,
        slot: ReporterSlot | None = None,
    ):
        self._send = send
        self.debounce_seconds = debounce_seconds
        self.periodic_seconds = periodic_seconds
        self.slot = slot
        self.reporter = reporter or (slot.reporter if slot else default_reporter_id())
        # Reports of a slot's successive owners must keep growing: a time-based sequence.
        self._seq = time.time_ns()
        # What this reporter last told each endpoint (kept in the slot's file).
        self._last_reports: dict[str, TrafficReport] = {}
        self._endpoints: dict[str, _EndpointFigures] = {}
        self._load_forgotten: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}  # instance id -> count, for the balancer
        # Told of every change of an endpoint's in-flight count (the proxy's metrics gauge).
        self.on_in_flight: Callable[[str, int], None] = lambda endpoint, delta: None
        # Called with the endpoint name whenever one of its requests ends (capacity freed).
        self.on_release: Callable[[str], None] = lambda endpoint: None

    def _figures(self, endpoint: str, instance_id: str) -> tuple[_EndpointFigures, _InstanceFigures]:
        ep = self._endpoints.get(endpoint)
        if ep is None:
            ep = self._endpoints[endpoint] = _EndpointFigures()
        fig = ep.instances.get(instance_id)
        if fig is None:
            fig = ep.instances[instance_id] = _InstanceFigures()
        return ep, fig

    def in_flight(self, instance_id: str) -> int:
        return self._in_flight.get(instance_id, 0)

    def claim(self, endpoint: str, instance_id: str) -> Claim:
        return Claim(self, endpoint, instance_id)

    def begin(self, endpoint: str, instance_id: str) -> None:
        ep, fig = self._figures(endpoint, instance_id)
        now = time.time()
        if fig.in_flight == 0 and now - fig.last_request_at > QUIET_SPELL_SECONDS:
            ep.urgent = True
        fig.in_flight += 1
        fig.requests += 1
        fig.last_request_at = now
        ep.add_load(+1, now)
        ep.dirty = True
        self.on_in_flight(endpoint, +1)
        self._in_flight[instance_id] = self._in_flight.get(instance_id, 0) + 1

    def end(self, endpoint: str, instance_id: str) -> None:
        ep, fig = self._figures(endpoint, instance_id)
        fig.in_flight = max(0, fig.in_flight - 1)
        now = fig.last_request_at = time.time()
        ep.add_load(-1, now)
        ep.dirty = True
        left = self._in_flight.get(instance_id, 0) - 1
        if left > 0:
            self._in_flight[instance_id] = left
        else:
            self._in_flight.pop(instance_id, None)
        self.on_in_flight(endpoint, -1)
        self.on_release(endpoint)

    def error(self, endpoint: str, instance_id: str) -> None:
        """A request the instance answered with 500 or above, or refused: counted for the
        lifecycle, which rolls an update back when its new instances err too often."""
        ep, fig = self._figures(endpoint, instance_id)
        fig.errors += 1
        ep.dirty = True

    def hold(self, endpoint: str, delta: int) -> None:
        ep = self._endpoints.setdefault(endpoint, _EndpointFigures())
        ep.held = max(0, ep.held + delta)
        ep.add_load(delta, time.time())
        ep.dirty = True

    def held(self, endpoint: str) -> int:
        ep = self._endpoints.get(endpoint)
        return ep.held if ep else 0

    def due_reports(self, now: float | None = None) -> list[tuple[str, TrafficReport]]:
        """Reports to send now; marks them sent."""
        now = time.monotonic() if now is None else now
        wall = time.time()
        due = []
        for name, ep in list(self._endpoints.items()):
            since = now - ep.last_sent
            changed = ep.dirty and (since >= self.debounce_seconds or ep.urgent)
            keepalive = ep.busy() and since >= self.periodic_seconds
            if not (changed or keepalive):
                continue
            self._seq = max(self._seq + 1, time.time_ns())
            ep.add_load(0, wall)
            report = TrafficReport(
                reporter=self.reporter,
                seq=self._seq,
                sent_at=wall,
                instances=[
                    InstanceTraffic(inst_id, fig.in_flight, fig.last_request_at, fig.requests, fig.errors)
                    for inst_id, fig in ep.instances.items()
                ],
                held=ep.held,
                load_seconds=round(self._load_forgotten.get(name, 0.0) + ep.load_seconds, 6),
            )
            ep.dirty = ep.urgent = False
            ep.last_sent = now
            due.append((name, report))
            self._forget_idle(name, ep, wall)
        return due

    def _forget_idle(self, name: str, ep: _EndpointFigures, wall: float) -> None:
        for inst_id, fig in list(ep.instances.items()):
            if fig.in_flight == 0 and wall - fig.last_request_at > FORGET_AFTER_SECONDS:
                del ep.instances[inst_id]
        if not ep.instances and ep.held == 0 and not ep.dirty:
            # Its count of request-seconds must keep growing for the autoscaler: kept aside.
            self._load_forgotten[name] = self._load_forgotten.get(name, 0.0) + ep.load_seconds
            del self._endpoints[name]

    def flush(self) -> None:
        due = self.due_reports()
        for endpoint, report in due:
            self._send(endpoint, report)
        if due and self.slot is not None:
            self._last_reports.update(due)
            try:
                self.slot.save(self._last_reports)
            except OSError:
                pass  # healing after a crash is best effort; reporting itself went out

    def heal(self) -> list[tuple[str, TrafficReport]]:
        """Take over the slot of a process that died: report its in-flight requests as ended
        (now), keeping its last request times, so the lifecycle counts right at once."""
        if self.slot is None:
            return []
        now = time.time()
        healed = []
        for endpoint, old in self.slot.load().items():
            if not any(i.in_flight for i in old.instances):
                continue
            self._seq = max(self._seq + 1, time.time_ns())
            instances = [InstanceTraffic(i.instance_id, 0, now if i.in_flight else i.last_request_at, i.requests,
                                         i.errors) for i in old.instances]
            report = TrafficReport(self.reporter, self._seq, now, instances, 0)
            self._send(endpoint, report)
            healed.append((endpoint, report))
        self._last_reports = dict(healed)
        try:
            self.slot.save(self._last_reports)
        except OSError:
            pass
        return healed

    def run_forever(self) -> None:
        """Body of the reporter greenlet: one tick per debounce interval."""
        import gevent

        tick = min(URGENT_TICK_SECONDS, self.debounce_seconds, self.periodic_seconds)
        while True:
            gevent.sleep(tick)
            try:
                self.flush()
            except Exception:  # a reporting failure must never stop the reporter
                import logging

                logging.getLogger("standby.proxy.traffic").exception("traffic report failed")
