"""Which revision a request goes to (README.md "Revisions and updates").

An endpoint with a traffic split (revision -> percent, from the routing view) sends each request to
one revision first, then balances among that revision's instances as usual: smooth weighted round
robin over the shares (exactly 10 of every 100 requests to a 10% revision), the client's hash with
`ip_hash` balancing (a client stays on one revision), and a sticky client to its instance's
revision. A revision with a share and no ready instance is woken for the request like a sleeping
endpoint. The choices are the pure functions of common/revisions.py; this keeps their counters.
"""
from __future__ import annotations

from dataclasses import replace

from common.revisions import hashed_choice, primary, smooth_weighted_choice
from proxy.balancer import IP_HASH, normalize_policy
from proxy.routing_view import EndpointView


class RevisionPicker:
    def __init__(self) -> None:
        self._counters: dict[str, dict[int, int]] = {}

    def choose(self, view: EndpointView, client_ip: str = "", sticky_id: str | None = None) -> int:
        """The revision for one request; 0 when the endpoint has no split."""
        split = dict(view.split)
        if not split:
            return 0
        if sticky_id:
            pinned = view.instance(sticky_id)
            if pinned is not None and pinned.revision in split:
                return pinned.revision
        if normalize_policy(view.balancing) == IP_HASH:
            return hashed_choice(split, client_ip)
        return smooth_weighted_choice(split, self._counters.setdefault(view.name, {}))

    def narrow_for(self, view: EndpointView, client_ip: str = "", sticky_id: str | None = None,
                   health_check: bool = False) -> EndpointView:
        """The view with only the chosen revision's instances. A routes endpoint's health check
        (`/ping`) takes no turn of the split, so a 10% revision still gets exactly its share of
        the real requests: it goes to the primary revision (the largest share), or, while that one
        has no instance, to any running one, and wakes no sleeping revision."""
        if health_check and view.split:
            primary_only = narrow(view, primary(dict(view.split)))
            return primary_only if primary_only.instances else view
        return narrow(view, self.choose(view, client_ip, sticky_id))


def narrow(view: EndpointView | None, revision: int) -> EndpointView | None:
    """The view with only `revision`'s instances (their revision's share decides the rest). A
    revision that lost its share meanwhile (an update ended) gives way to the primary one."""
    if view is None or not view.split:
        return view
    split = dict(view.split)
    if revision not in split:
        revision = primary(split)
    return replace(view, instances=tuple(i for i in view.instances if i.revision == revision), revision=revision)
