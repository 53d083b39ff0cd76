"""Load-balancing policies: pick one instance among the candidates of an endpoint.

Pure logic over the routing view and this process's in-flight counts, so it is unit tested
without a server. The endpoint's `balancing` spec field names the default policy; the
`Deploy-Route-Rule` header can ask for `random` or `round-robin` per request.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from typing import Callable, Sequence

from proxy.routing_view import EndpointView, InstanceView

ROUND_ROBIN, LEAST_CONNECTIONS, IP_HASH, RANDOM = "round_robin", "least_connections", "ip_hash", "random"
POLICIES = (ROUND_ROBIN, LEAST_CONNECTIONS, IP_HASH, RANDOM)


_NORMALIZED: dict[str | None, str] = {}


def normalize_policy(name: str | None) -> str:
    """Spec values and header values in either spelling: `round-robin`, `Round_Robin`, ...
    (remembered: this runs for every request)."""
    known = _NORMALIZED.get(name)
    if known is not None:
        return known
    policy = (name or ROUND_ROBIN).strip().lower().replace("-", "_")
    aliases = {"least_conn": LEAST_CONNECTIONS, "leastconn": LEAST_CONNECTIONS, "iphash": IP_HASH, "rr": ROUND_ROBIN}
    policy = aliases.get(policy, policy)
    policy = policy if policy in POLICIES else ROUND_ROBIN
    if len(_NORMALIZED) < 256:
        _NORMALIZED[name] = policy
    return policy


class Balancer:
    def __init__(self, in_flight: Callable[[str], int], rng: random.Random | None = None):
        self._in_flight = in_flight
        self._counters: dict[str, itertools.count] = {}
        self._rng = rng or random.Random()

    def has_capacity(self, view: EndpointView, instance: InstanceView) -> bool:
        return view.max_concurrency <= 0 or self._in_flight(instance.id) < view.max_concurrency

    def available(self, view: EndpointView) -> list[InstanceView]:
        """Ready instances below the endpoint's per-instance concurrency limit."""
        if view.max_concurrency <= 0:
            return list(view.instances)
        return [inst for inst in view.instances if self._in_flight(inst.id) < view.max_concurrency]

    def pick(
        self, view: EndpointView, candidates: Sequence[InstanceView], client_ip: str = "", policy: str | None = None
    ) -> InstanceView:
        if not candidates:
            raise ValueError("no candidate instance")
        policy = normalize_policy(policy or view.balancing)
        if len(candidates) == 1:
            if policy in (ROUND_ROBIN, LEAST_CONNECTIONS):
                self._next(view.name)  # keep the cycle moving when a second instance appears
            return candidates[0]
        if policy == RANDOM:
            return self._rng.choice(candidates)
        if policy == IP_HASH:
            return self._by_ip(candidates, client_ip)
        if policy == LEAST_CONNECTIONS:
            fewest = min(self._in_flight(inst.id) for inst in candidates)
            idle = [inst for inst in candidates if self._in_flight(inst.id) == fewest]
            return idle[self._next(view.name) % len(idle)]
        return candidates[self._next(view.name) % len(candidates)]

    def _next(self, endpoint: str) -> int:
        counter = self._counters.get(endpoint)
        if counter is None:
            counter = self._counters[endpoint] = itertools.count()
        return next(counter)

    @staticmethod
    def _by_ip(candidates: Sequence[InstanceView], client_ip: str) -> InstanceView:
        # Rendezvous hashing: a client keeps its instance when others come or go.
        def score(inst: InstanceView) -> bytes:
            return hashlib.blake2b(f"{client_ip}|{inst.id}".encode(), digest_size=8).digest()

        return max(candidates, key=score)


def sticky_cookie_name(endpoint: str) -> str:
    return f"standby_route_{endpoint.replace('-', '_')}"
