"""Holding requests until an instance can take them: cold starts and scale-out on demand.

A request that finds no ready instance below its concurrency limit takes a slot in the
endpoint's hold queue (bounded by `hold_queue_size`) and waits, bounded by the endpoint's
startup timeout or the client's own `X-Scale-Up-Timeout`. All requests held for one endpoint
share one wake call (and one on-demand scale-out); the endpoint workflow dedups across proxies.
Waiting is on a per-endpoint notifier that fires when a wake or scale-out answers, when the
database shows a ready instance, or when a request ends, with the routing refresh interval as a
fallback poll, like knative's activator waiting on a breaker.

Choosing an instance and claiming it (`TrafficTracker.claim`) happen in one step, with no yield
to the hub in between, so the capacity a request saw is still there when it counts itself.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Generator

import gevent
from gevent.event import AsyncResult, Event

from proxy.balancer import Balancer
from proxy.metrics import Metrics
from proxy.revisions import narrow
from proxy.routing_view import EndpointView, InstanceView, RoutingView
from proxy.lifecycle_client import ERR_REPLICA_QUOTA, ERR_TIMEOUT, ERR_UNAVAILABLE, LifecycleClient, LifecycleError
from proxy.traffic import Claim, TrafficTracker

NOT_SERVING_STATES = ("stopped", "failed", "terminated")
# After a refused on-demand scale-out (quota reached elsewhere), wait this long before asking again.
SCALE_OUT_COOLDOWN_SECONDS = 2.0
# While a wake or scale-out is pending, how often the database is asked for a ready instance.
COLD_START_POLL_SECONDS = 0.01


class HoldFull(Exception):
    """The endpoint's hold queue is full."""


class HoldTimeout(Exception):
    """No instance could take the request within the endpoint's startup timeout."""


class ClientWaitOver(Exception):
    """No instance could take the request within the client's own X-Scale-Up-Timeout."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = seconds


class EndpointGone(Exception):
    """The endpoint disappeared from the routing view while the request was held."""


class NotServing(Exception):
    def __init__(self, status: str, reason: str = ""):
        super().__init__(status)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Acquired:
    """An instance chosen for a request, and the request's claim on it (release it once done)."""

    claim: Claim
    instance: InstanceView
    cold_start: bool


class ColdStarts:
    def __init__(
        self,
        lifecycle: LifecycleClient,
        routing: RoutingView,
        balancer: Balancer,
        tracker: TrafficTracker,
        metrics: Metrics,
        outage_grace_seconds: float = 60.0,
    ):
        self.lifecycle = lifecycle
        self.routing = routing
        self.balancer = balancer
        self.tracker = tracker
        self.metrics = metrics
        # Keyed by (endpoint, revision): each revision of a split wakes and scales on its own.
        self._wakes: dict[tuple[str, int], AsyncResult] = {}
        self._scale_outs: dict[tuple[str, int], AsyncResult] = {}
        self._scale_out_refused_at: dict[tuple[str, int], float] = {}
        self._changed: dict[str, Event] = {}
        # How long a held request waits through Temporal being unreachable (it restarts).
        self.outage_grace_seconds = outage_grace_seconds
        tracker.on_release = self.notify

    # ---- choosing and claiming ----
    def take(self, view: EndpointView, candidates, client_ip: str, sticky_id: str | None,
             arrived_at: float) -> Acquired:
        """Pick among `candidates` and claim the pick, in one step. It is a cold start exactly
        when the instance became ready after the request arrived (it waited for that start)."""
        instance = pick(self.balancer, view, candidates, client_ip, sticky_id)
        claim = self.tracker.claim(view.name, instance.id)
        return Acquired(claim, instance, cold_start=instance.ready_at > arrived_at)

    # ---- notifier ----
    def notify(self, endpoint: str) -> None:
        event = self._changed.pop(endpoint, None)
        if event is not None:
            event.set()

    def _wait_change(self, endpoint: str, timeout: float) -> None:
        event = self._changed.get(endpoint)
        if event is None:
            event = self._changed[endpoint] = Event()
        event.wait(timeout)

    # ---- shared lifecycle calls ----
    def _shared(self, table: dict[tuple[str, int], AsyncResult], view: EndpointView, call) -> AsyncResult:
        key = (view.name, view.revision)
        pending = table.get(key)
        if pending is None:
            pending = table[key] = AsyncResult()
            gevent.spawn(self._run_shared, table, key, call, pending)
        return pending

    def _run_shared(self, table, key: tuple[str, int], call, pending: AsyncResult) -> None:
        try:
            pending.set(call())
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about the failure
            pending.set_exception(exc)
        finally:
            table.pop(key, None)
            self.notify(key[0])

    def wake(self, view: EndpointView) -> AsyncResult:
        """Wake the endpoint (the view's revision, when it is narrowed to one)."""
        def call():
            result = self.lifecycle.wake(view.name, uuid.uuid4().hex, timeout=view.startup_timeout_seconds + 5,
                                         revision=view.revision)
            self.routing.learn(view.name, InstanceView(result.instance_id, result.address,
                                                       _ready_at(result), _revision(result)))
            if result.cold_start:
                self.metrics.cold_start(view.name)
            return result

        first = (view.name, view.revision) not in self._wakes
        pending = self._shared(self._wakes, view, call)
        if first:
            gevent.spawn(self._poll_until_ready, view.name, pending, view.revision)
        return pending

    def _poll_until_ready(self, name: str, pending: AsyncResult, revision: int = 0) -> None:
        """While a wake is pending, look for the instance in the database every few milliseconds:
        the worker records it ready before the lifecycle's answer makes its way back through
        Temporal (or while Temporal restarts). One poller per endpoint (and revision) and process,
        however many requests are held."""
        while not pending.ready():
            pending.wait(COLD_START_POLL_SECONDS)
            if not pending.ready() and self.routing.poll_ready(name, revision):
                self.notify(name)
                return

    def scale_out_on_demand(self, view: EndpointView) -> AsyncResult | None:
        key = (view.name, view.revision)
        refused_at = self._scale_out_refused_at.get(key, 0.0)
        if key not in self._scale_outs and time.monotonic() - refused_at < SCALE_OUT_COOLDOWN_SECONDS:
            return None

        def call():
            try:
                result = self.lifecycle.scale_out(view.name, uuid.uuid4().hex, timeout=view.startup_timeout_seconds + 5,
                                                  revision=view.revision)
            except LifecycleError:
                self._scale_out_refused_at[key] = time.monotonic()
                raise
            self.routing.learn(view.name, InstanceView(result.instance_id, result.address, _ready_at(result),
                                                       _revision(result)))
            return result

        return self._shared(self._scale_outs, view, call)

    def scale_out_for(self, view: EndpointView, request_id: str) -> Acquired:
        """`Deploy-Route-Rule: scale-out`: a new instance for this request alone."""
        result = self.lifecycle.scale_out(view.name, request_id, timeout=view.startup_timeout_seconds + 5,
                                          revision=view.revision)
        instance = InstanceView(result.instance_id, result.address, _ready_at(result), _revision(result))
        self.routing.learn(view.name, instance)
        self.notify(view.name)
        return Acquired(self.tracker.claim(view.name, instance.id), instance, cold_start=True)

    # ---- holding ----
    def enter_hold(self, view: EndpointView) -> None:
        if self.tracker.held(view.name) >= view.hold_queue_size:
            raise HoldFull()
        self.tracker.hold(view.name, +1)
        self.metrics.held(view.name, +1)

    def leave_hold(self, endpoint: str) -> None:
        self.tracker.hold(endpoint, -1)
        self.metrics.held(endpoint, -1)

    def acquire(
        self, name: str, client_ip: str, sticky_id: str | None, tick_seconds: float | None,
        arrived_at: float, client_wait: float | None = None, room=None, revision: int = 0,
    ) -> Generator[None, None, Acquired]:
        """Wait for an instance with room (of `revision`, when the endpoint splits its traffic)
        and claim it; yields once per `tick_seconds` (SSE keep-alives). Bounded by the startup
        timeout and by `client_wait` when the client set one. `room(view, candidates)` narrows the
        candidates further (a WebSocket's `max_websockets`)."""
        view = narrow(self.routing.get(name), revision)
        if view is None:
            raise EndpointGone()
        if not view.instances:
            # The cached view may be a refresh behind: an instance that is ready already must
            # serve this request warm, not wait for (and be counted as) a start.
            self.routing.poll_ready(name, view.revision)
        started = time.monotonic()
        deadline = started + view.startup_timeout_seconds
        client_deadline = started + client_wait if client_wait is not None else None
        next_tick = started + tick_seconds if tick_seconds else None
        outage_since: float | None = None
        while True:
            view = narrow(self.routing.get(name), revision)
            if view is None:
                raise EndpointGone()
            if view.status in NOT_SERVING_STATES:
                raise NotServing(view.status, view.status_reason)
            candidates = self.balancer.available(view)
            if room is not None:
                candidates = room(view, candidates)
            if candidates:
                return self.take(view, candidates, client_ip, sticky_id, arrived_at)
            pending = None
            if not view.instances:
                pending = self.wake(view)
            elif view.live_count < view.max_instances:
                pending = self.scale_out_on_demand(view)
            now = time.monotonic()
            if now >= deadline:
                raise HoldTimeout()
            if client_deadline is not None and now >= client_deadline:
                raise ClientWaitOver(client_wait)
            wait = min(deadline - now, max(self.routing.refresh_seconds, 0.05))
            if client_deadline is not None:
                wait = min(wait, client_deadline - now)
            if next_tick is not None:
                if now >= next_tick:
                    next_tick = now + tick_seconds
                    yield None
                    continue
                wait = min(wait, next_tick - now)
            # The notifier fires when a wake or scale-out answers, when the wake's poller sees a
            # ready instance, and when a request ends.
            self._wait_change(name, wait)
            if pending is not None and pending.ready():
                exc = pending.exception
                if exc is None:
                    outage_since = None
                elif not _passing(exc):
                    raise exc
                elif exc.kind != ERR_REPLICA_QUOTA:
                    outage_since = outage_since or time.monotonic()
                    if time.monotonic() - outage_since > self.outage_grace_seconds:
                        raise exc


def _passing(exc: BaseException) -> bool:
    """Failures a held request waits through: the replica quota (a request ending frees room),
    and Temporal unreachable or slow (it restarts; the instance may be starting all the same, and
    the database poll sees it ready). The next turn of the loop asks again; only the startup
    timeout, the client's own limit, or a definite answer (failed, not serving) ends the hold."""
    return isinstance(exc, LifecycleError) and exc.kind in (ERR_REPLICA_QUOTA, ERR_UNAVAILABLE, ERR_TIMEOUT)


def _ready_at(result) -> float:
    return float(getattr(result, "ready_at", None) or time.time())


def _revision(result) -> int:
    return int(getattr(result, "revision", 0) or 0)


def pick(balancer: Balancer, view: EndpointView, candidates, client_ip: str, sticky_id: str | None) -> InstanceView:
    if sticky_id:
        for inst in candidates:
            if inst.id == sticky_id:
                return inst
    return balancer.pick(view, candidates, client_ip)


def run_to_end(steps: Generator[None, None, Acquired]) -> Acquired:
    """Drive `acquire` without keep-alives."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
