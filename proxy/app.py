"""WSGI entry of the proxy: `application` for gunicorn, `make_app(settings)` for everything else.

The chain is assembled here, once per worker process: routing view (DB cache) -> balancer and
cold-start holding -> forwarder, with the traffic reporter and the lifecycle client beside them.
Background greenlets (view refresh, traffic reports) start on the first request, i.e. inside
the gevent worker after gunicorn has monkey patched it.
"""
from __future__ import annotations

import json
import logging
import time

from common.config import Settings, load_settings
from common.db import Database
from proxy.balancer import Balancer
from proxy.coldstart import ColdStarts
from proxy.forward import Forwarder
from proxy.handler import ProxyHandler
from proxy.metrics import Metrics, render
from proxy.routing_view import RoutingView
from proxy.lifecycle_client import LifecycleClient
from proxy.server import ON_SHUTDOWN
from proxy.traffic import ReporterSlot, TrafficTracker
from proxy.websocket import Sockets

log = logging.getLogger("standby.proxy")
# How often the request tallies reach prometheus_client (proxy/metrics.py).
METRICS_FLUSH_SECONDS = 1.0


class ProxyApp:
    """Routes `/e/...` to the handler; `/metrics` and `/healthz` are the proxy's own."""

    def __init__(self, settings: Settings, keepalive_seconds: float | None = None):
        self.settings = settings
        self.routing = RoutingView(Database(settings.database_url), settings.proxy_refresh_seconds)
        self.lifecycle = LifecycleClient(settings)
        self.tracker = TrafficTracker(
            self.lifecycle.send_traffic,
            debounce_seconds=settings.traffic_debounce_seconds,
            periodic_seconds=settings.traffic_periodic_seconds,
            slot=ReporterSlot(settings.data_dir / "proxy-reporters", settings.proxy_port),
        )
        self.metrics = Metrics()
        self.tracker.on_in_flight = self.metrics.in_flight
        self.balancer = Balancer(self.tracker.in_flight)
        self.coldstarts = ColdStarts(self.lifecycle, self.routing, self.balancer, self.tracker, self.metrics,
                                     outage_grace_seconds=settings.proxy_lifecycle_outage_seconds)
        self.forwarder = Forwarder(connect_timeout=settings.proxy_connect_timeout_seconds)
        self.sockets = Sockets(self.routing, grace_seconds=settings.proxy_websocket_grace_seconds)
        self.handler = ProxyHandler(
            self.routing,
            self.coldstarts,
            self.tracker,
            self.forwarder,
            self.metrics,
            max_body_bytes=settings.proxy_max_body_bytes,
            keepalive_seconds=settings.proxy_sse_keepalive_seconds if keepalive_seconds is None else keepalive_seconds,
            body_timeout_seconds=settings.proxy_body_timeout_seconds,
            sockets=self.sockets,
        )
        self._started = False

    def start(self) -> None:
        """Load the view and start the background greenlets; idempotent."""
        if self._started:
            return
        import gevent

        self._started = True
        self.routing.refresh()
        gevent.spawn(self.routing.run_forever)
        gevent.spawn(self.tracker.run_forever)
        gevent.spawn(self._write_metrics_forever)
        gevent.spawn(self.sockets.run_forever)
        gevent.spawn(self._flush_metrics_forever)
        ON_SHUTDOWN.append(self.sockets.going_away_all)
        self.lifecycle.start()
        healed = self.tracker.heal()
        if healed:
            log.warning("took over the reports of a proxy process that died: %d endpoint(s) had requests in "
                        "flight, now reported ended", len(healed))

    def _write_metrics_forever(self) -> None:
        """Once per step, just after its end: the step's request figures go to the charts' store
        (common/metrics_store.py), under this process's reporter id, off the request path."""
        import gevent

        from common.metrics_store import TRAFFIC, MetricsWriter, Point

        s = self.settings
        writer = MetricsWriter(self.routing.database, self.tracker.reporter, s.metrics_step_seconds,
                               s.metrics_raw_retention_seconds, s.metrics_retention_seconds)
        step = writer.step
        while True:
            gevent.sleep(step - time.time() % step + 0.05)
            taken = self.metrics.recorder.take()
            at = time.time() - step / 2  # within the step that just ended
            try:
                writer.write(TRAFFIC, [Point(endpoint, instance_id, at, agg.to_json())
                                       for (endpoint, instance_id), agg in taken.items()])
            except Exception:  # noqa: BLE001 - a chart loses a step; the proxy goes on
                log.exception("writing request metrics failed")

    def __call__(self, environ, start_response):
        if not self._started:
            self.start()
        path = environ.get("PATH_INFO", "")
        if path.startswith("/e/"):
            return self.handler(environ, start_response)
        if path == "/metrics":
            body, content_type = render(self.metrics)
            start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/healthz":
            return _json(start_response, "200 OK", {"ok": True, "view_age_seconds": self._view_age()})
        return _json(start_response, "404 Not Found",
                     {"code": 404, "msg": f"no such path {path!r}; endpoint URLs look like /e/<endpoint-name>/<path>"})

    def _flush_metrics_forever(self) -> None:
        import gevent

        while True:
            gevent.sleep(METRICS_FLUSH_SECONDS)
            try:
                self.metrics.flush()
            except Exception:  # noqa: BLE001 - metrics must never stop
                log.exception("flushing metrics failed")

    def _view_age(self) -> float | None:
        import time

        return round(time.monotonic() - self.routing.loaded_at, 3) if self.routing.loaded_at else None


def _json(start_response, status: str, payload: dict):
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def make_app(settings: Settings | None = None) -> ProxyApp:
    return ProxyApp(settings or load_settings())


class _LazyApplication:
    """Builds the app in the worker on first use, so importing this module stays side-effect free."""

    def __init__(self) -> None:
        self._app: ProxyApp | None = None

    def warm(self) -> ProxyApp:
        if self._app is None:
            self._app = make_app()
            self._app.start()
        return self._app

    def __call__(self, environ, start_response):
        app = self._app or self.warm()
        return app(environ, start_response)


application = _LazyApplication()
