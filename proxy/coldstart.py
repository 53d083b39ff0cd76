"""Holding requests until an instance can take them: cold starts and scale-out on demand.

A request that finds no ready instance below its concurrency limit takes a slot in the
endpoint's hold queue (bounded by `hold_queue_size`) and waits, bounded by the endpoint's
startup timeout. All requests held for one endpoint in this process share one wake call (and
one on-demand scale-out); the endpoint workflow dedups across proxy processes. Waiting is on a
per-endpoint notifier that fires when a wake or scale-out answers or a request ends, with the
routing refresh interval as a fallback poll, like knative's activator waiting on a breaker.
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
from proxy.routing_view import EndpointView, InstanceView, RoutingView
from proxy.temporal_bridge import ERR_REPLICA_QUOTA, LifecycleError, TemporalBridge
from proxy.traffic import TrafficTracker

NOT_SERVING_STATES = ("stopped", "failed", "terminated")
# After a refused on-demand scale-out (quota reached elsewhere), wait this long before asking again.
SCALE_OUT_COOLDOWN_SECONDS = 2.0
# While a wake or scale-out is pending, how often the database is asked for a ready instance.
COLD_START_POLL_SECONDS = 0.01


class HoldFull(Exception):
    """The endpoint's hold queue is full."""


class HoldTimeout(Exception):
    """No instance could take the request within the endpoint's startup timeout."""


class EndpointGone(Exception):
    """The endpoint disappeared from the routing view while the request was held."""


class NotServing(Exception):
    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


@dataclass
class Acquired:
    instance: InstanceView
    cold_start: bool


class ColdStarts:
    def __init__(
        self,
        bridge: TemporalBridge,
        routing: RoutingView,
        balancer: Balancer,
        tracker: TrafficTracker,
        metrics: Metrics,
    ):
        self.bridge = bridge
        self.routing = routing
        self.balancer = balancer
        self.tracker = tracker
        self.metrics = metrics
        self._wakes: dict[str, AsyncResult] = {}
        self._scale_outs: dict[str, AsyncResult] = {}
        self._scale_out_refused_at: dict[str, float] = {}
        self._changed: dict[str, Event] = {}
        tracker.on_release = self.notify

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
    def _shared(self, table: dict[str, AsyncResult], view: EndpointView, call) -> AsyncResult:
        pending = table.get(view.name)
        if pending is None:
            pending = table[view.name] = AsyncResult()
            gevent.spawn(self._run_shared, table, view, call, pending)
        return pending

    def _run_shared(self, table, view: EndpointView, call, pending: AsyncResult) -> None:
        try:
            pending.set(call())
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about the failure
            pending.set_exception(exc)
        finally:
            table.pop(view.name, None)
            self.notify(view.name)

    def wake(self, view: EndpointView) -> AsyncResult:
        def call():
            result = self.bridge.wake(view.name, uuid.uuid4().hex, timeout=view.startup_timeout_seconds + 5)
            self.routing.learn(view.name, InstanceView(result.instance_id, result.address))
            if result.cold_start:
                self.metrics.cold_start(view.name)
            return result

        first = view.name not in self._wakes
        pending = self._shared(self._wakes, view, call)
        if first:
            gevent.spawn(self._poll_until_ready, view.name, pending)
        return pending

    def _poll_until_ready(self, name: str, pending: AsyncResult) -> None:
        """While a wake is pending, look for the instance in the database every few milliseconds:
        the worker records it ready before the lifecycle's answer makes its way back through
        Temporal. One poller per endpoint and process, however many requests are held."""
        while not pending.ready():
            pending.wait(COLD_START_POLL_SECONDS)
            if not pending.ready() and self.routing.poll_ready(name):
                self.notify(name)
                return

    def scale_out_on_demand(self, view: EndpointView) -> AsyncResult | None:
        refused_at = self._scale_out_refused_at.get(view.name, 0.0)
        if view.name not in self._scale_outs and time.monotonic() - refused_at < SCALE_OUT_COOLDOWN_SECONDS:
            return None

        def call():
            try:
                result = self.bridge.scale_out(view.name, uuid.uuid4().hex, timeout=view.startup_timeout_seconds + 5)
            except LifecycleError:
                self._scale_out_refused_at[view.name] = time.monotonic()
                raise
            self.routing.learn(view.name, InstanceView(result.instance_id, result.address))
            return result

        return self._shared(self._scale_outs, view, call)

    def scale_out_for(self, view: EndpointView, request_id: str) -> InstanceView:
        """`Deploy-Route-Rule: scale-out`: a new instance for this request alone."""
        result = self.bridge.scale_out(view.name, request_id, timeout=view.startup_timeout_seconds + 5)
        instance = InstanceView(result.instance_id, result.address)
        self.routing.learn(view.name, instance)
        self.notify(view.name)
        return instance

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
        self, name: str, client_ip: str, sticky_id: str | None, tick_seconds: float | None
    ) -> Generator[None, None, Acquired]:
        """Wait for an instance with room; yields once per `tick_seconds` (SSE keep-alives).

        The caller must begin tracking the returned instance before yielding to the hub, so that
        the capacity it saw is still there.
        """
        view = self.routing.get(name)
        if view is None:
            raise EndpointGone()
        deadline = time.monotonic() + view.startup_timeout_seconds
        next_tick = time.monotonic() + tick_seconds if tick_seconds else None
        cold_start = False
        while True:
            view = self.routing.get(name)
            if view is None:
                raise EndpointGone()
            if view.status in NOT_SERVING_STATES:
                raise NotServing(view.status)
            candidates = self.balancer.available(view)
            if candidates:
                return Acquired(pick(self.balancer, view, candidates, client_ip, sticky_id), cold_start)
            pending = None
            waking = not view.instances
            if waking:
                pending = self.wake(view)
            elif view.live_count < view.max_instances:
                pending = self.scale_out_on_demand(view)
            now = time.monotonic()
            if now >= deadline:
                raise HoldTimeout()
            wait = min(deadline - now, max(self.routing.refresh_seconds, 0.05))
            if next_tick is not None:
                if now >= next_tick:
                    next_tick = now + tick_seconds
                    yield None
                    continue
                wait = min(wait, next_tick - now)
            # The notifier fires when a wake or scale-out answers, when the wake's poller sees a
            # ready instance, and when a request ends.
            self._wait_change(name, wait)
            if waking:
                cold_start = True  # held through a wake
            if pending is not None and pending.ready():
                    exc = pending.exception
                    if exc is None:
                        # A scale-out result has no flag: it always started an instance.
                        cold_start = cold_start or bool(getattr(pending.value, "cold_start", True))
                    elif not (isinstance(exc, LifecycleError) and exc.kind == ERR_REPLICA_QUOTA):
                        raise exc


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
