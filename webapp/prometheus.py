"""The web app's Prometheus `/metrics`: what the database knows, per scrape (README.md "Metrics").

Cost is here because the web app is what computes it for the list, the detail page and the API
(common/cost.py): one computation, the same numbers everywhere. A running instance's cost grows
between scrapes like it does on the page.
"""
from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from common.cost import endpoint_usage, instance_usage
from common.models import INSTANCE_LIVE_STATES, TERMINATED, Endpoint
from webapp.auth import SITE_ADMIN, access
from webapp.extensions import db, settings

bp = Blueprint("prometheus", __name__)


class _CostCollector:
    def __init__(self, endpoints: list[Endpoint], now: datetime, prices):
        self.endpoints, self.now, self.prices, self.currency = endpoints, now, prices, prices.currency

    def collect(self):
        total = GaugeMetricFamily("standby_endpoint_cost", "Cost of an endpoint's instances, running total "
                                  "(billed ready -> stopped)", labels=["endpoint", "currency"])
        month = GaugeMetricFamily("standby_endpoint_cost_this_month", "Cost of an endpoint's instances this "
                                  "calendar month (UTC)", labels=["endpoint", "currency"])
        billed = GaugeMetricFamily("standby_endpoint_billed_seconds", "Seconds billed, ready -> stopped",
                                   labels=["endpoint"])
        running = GaugeMetricFamily("standby_instance_cost", "Cost so far of each live instance",
                                    labels=["endpoint", "instance", "currency"])
        for endpoint in self.endpoints:
            usage = endpoint_usage(endpoint.instances, self.now, self.prices)
            total.add_metric([endpoint.name, self.currency], usage.cost)
            month.add_metric([endpoint.name, self.currency], usage.month_cost)
            billed.add_metric([endpoint.name], usage.billed_seconds)
            for instance in endpoint.instances:
                if instance.status in INSTANCE_LIVE_STATES:
                    running.add_metric([endpoint.name, instance.id, self.currency],
                                       instance_usage(instance, self.now, self.prices).cost)
        yield from (total, month, billed, running)


@bp.get("/metrics")
@access(SITE_ADMIN)
def metrics():
    """Prometheus text: cost per endpoint (total, this month) and per live instance. Every
    project's endpoints, so a site admin's token scrapes it (README.md "Metrics")."""
    endpoints = list(db.session.scalars(select(Endpoint).where(Endpoint.status != TERMINATED)
                                        .options(selectinload(Endpoint.instances))))
    registry = CollectorRegistry()
    registry.register(_CostCollector(endpoints, datetime.now(timezone.utc), settings().price_list))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
