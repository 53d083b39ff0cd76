"""Traffic figures the proxy sends to EndpointWorkflow (its `traffic` signal)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InstanceTraffic:
    instance_id: str
    in_flight: int = 0
    # Unix time (seconds) of the last request start or end seen for this instance.
    last_request_at: float = 0.0
    requests: int = 0  # total requests seen by this reporter, monotonic
    # Of those, answered 500 or above by the instance, or refused by it: an update's new instances
    # are judged by them (README.md "Revisions and updates").
    errors: int = 0


@dataclass
class TrafficReport:
    """Sent by each proxy process, debounced (never one per request).

    `reporter` identifies the proxy process (host:pid); `seq` grows with each report so that
    the workflow can drop a late, reordered one. A report replaces the reporter's previous one.
    """

    reporter: str
    seq: int
    sent_at: float
    instances: list[InstanceTraffic] = field(default_factory=list)
    # Requests held for an endpoint with no ready instance (cold start in progress).
    held: int = 0
    # Request-seconds of this reporter's requests in flight or held, counted since the process
    # started (it only grows): the concurrency autoscaler averages it over its windows
    # (workflows/autoscale.py), so a report sent every second or every ten says the same load.
    load_seconds: float = 0.0
