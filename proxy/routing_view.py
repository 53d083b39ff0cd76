"""The proxy's routing view: endpoints, their ready instances and active key hashes.

Read from the database in three queries and cached in-process; a background greenlet refreshes
it every `proxy_refresh_seconds`, so the hot path never touches the database or Temporal while
an instance is ready. The proxy never writes to the database.

Wake and scale-out answers carry the new instance's address before the refresh may see it;
`learn()` overlays it until the database shows that instance (ready or not) or it expires.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, make_dataclass, replace

from datetime import datetime, timedelta, timezone

from sqlalchemy import or_, select

from common.db import Database
from common.spec_fields import PROXY, ROUTES, python_type, read_by
from common.models import (
    I_DRAINING,
    I_PROVISIONING,
    I_QUEUED,
    I_READY,
    I_STARTING,
    INSTANCE_LIVE_STATES,
    ApiKey,
    Endpoint,
    Instance,
    Revision,
)

log = logging.getLogger("standby.proxy.routing")

# How long a learned instance is trusted without the database showing it.
LEARNED_TTL_SECONDS = 30.0
# How long an instance that refused a connection is left out while the database still calls it ready.
GONE_TTL_SECONDS = 30.0
# An unknown endpoint name triggers a reload at most this often.
MISS_RELOAD_SECONDS = 0.1


@dataclass(frozen=True)
class InstanceView:
    id: str
    address: str  # "127.0.0.1:43121"
    # Unix time it became ready (0: unknown). A request that arrived before it waited for a start:
    # that, and only that, is a cold start (`Deploy-Cold-Start: true`).
    ready_at: float = 0.0
    # The revision it runs (`Deploy-Revision`); 0 for an endpoint without revisions.
    revision: int = 0


def _instance(self, instance_id: str) -> InstanceView | None:
    for inst in self.instances:
        if inst.id == instance_id:
            return inst
    return None


# The spec fields the proxy reads, as their declarations say (common/spec_fields.py).
PROXY_FIELDS = tuple(f for f in read_by(PROXY) if f.name != "name")

# One endpoint as the proxy sees it: its name and status, the spec fields the proxy reads
# (routes as a tuple, so the view stays immutable), and what the database says of its instances.
EndpointView = make_dataclass("EndpointView", [
    ("name", str),
    ("status", str),
    ("status_reason", str, field(default="")),
    *[(f.name, python_type(f) if f.kind != ROUTES else tuple, field(default=() if f.kind == ROUTES else f.default))
      for f in PROXY_FIELDS],
    ("key_hashes", frozenset, field(default=frozenset())),
    # Ready instances only, oldest first so that balancing order is stable between refreshes.
    ("instances", tuple, field(default=())),
    # Instances that exist and count against max_instances but take no new requests.
    ("draining_ids", frozenset, field(default=frozenset())),
    # Every instance not yet stopped or failed (for scale-out decisions).
    ("live_count", int, field(default=0)),
    # The traffic split: (revision, percent) pairs summing to 100; empty without revisions
    # (README.md "Revisions and updates"). proxy/revisions.py picks a revision per request.
    ("split", tuple, field(default=())),
    # Set on a view narrowed to one revision's instances (0: the whole endpoint).
    ("revision", int, field(default=0)),
], frozen=True, namespace={"instance": _instance})
EndpointView.__module__ = __name__


@dataclass
class _Learned:
    instance: InstanceView
    at: float


@dataclass
class RoutingView:
    database: Database
    refresh_seconds: float = 1.0
    _endpoints: dict[str, EndpointView] = field(default_factory=dict)
    # endpoint name -> instance id -> learned instance
    _learned: dict[str, dict[str, _Learned]] = field(default_factory=dict)
    # Ids the last load saw ready or past ready, per endpoint: a learned id seen there is settled.
    _known_ids: dict[str, frozenset] = field(default_factory=dict)
    # Instances that refused a connection (released, or died): left out until a load no longer
    # shows them ready, so no request is sent there again meanwhile.
    _gone: dict[str, float] = field(default_factory=dict)
    loaded_at: float = 0.0
    _miss_reloaded_at: float = 0.0

    def get(self, name: str) -> EndpointView | None:
        view = self._endpoints.get(name)
        learned = self._learned.get(name)
        if view is None or not (learned or self._gone):
            return view
        now = time.monotonic()
        extra = []
        for inst_id, entry in list((learned or {}).items()):
            if now - entry.at > LEARNED_TTL_SECONDS or inst_id in self._known_ids.get(name, ()):
                del learned[inst_id]
            elif view.instance(inst_id) is None and inst_id not in self._gone:
                extra.append(entry.instance)
        instances = view.instances
        if self._gone:
            instances = tuple(inst for inst in instances if inst.id not in self._gone)
        if not extra and len(instances) == len(view.instances):
            return view
        live_count = max(view.live_count, len(instances) + len(extra))
        return replace(view, instances=instances + tuple(extra), live_count=live_count)

    def forget(self, instance_id: str) -> None:
        """An instance refused a connection: route nothing more to it until the database agrees
        it is gone (or shows it ready again, after a later load)."""
        self._gone[instance_id] = time.monotonic()

    def find(self, name: str) -> EndpointView | None:
        """`get`, but an endpoint the cached view does not know yet (created since the last
        refresh) is looked up at once, so a brand-new endpoint answers its first request. Misses
        reload at most every MISS_RELOAD_SECONDS, so unknown names cannot hammer the database."""
        view = self.get(name)
        now = time.monotonic()
        if view is None and now - self._miss_reloaded_at >= MISS_RELOAD_SECONDS:
            self._miss_reloaded_at = now
            self.refresh()
            view = self.get(name)
        return view

    def learn(self, endpoint: str, instance: InstanceView) -> None:
        """An instance the lifecycle just reported ready, before the database refresh shows it."""
        self._learned.setdefault(endpoint, {})[instance.id] = _Learned(instance, time.monotonic())

    def refresh(self) -> None:
        try:
            endpoints, known = self._load()
        except Exception:  # keep serving the last view when the database hiccups
            log.exception("routing view refresh failed; keeping the previous view")
            return
        now = time.monotonic()
        # A forgotten instance stays out while the database still calls it ready (its death is on
        # its way there), at most GONE_TTL_SECONDS (a refusal that was only a hiccup).
        ready_ids = {inst.id for view in endpoints.values() for inst in view.instances}
        self._gone = {iid: at for iid, at in self._gone.items() if iid in ready_ids and now - at < GONE_TTL_SECONDS}
        self._endpoints = endpoints
        # An id the load saw is settled by the database: drop it from the overlay (in get()).
        self._known_ids = known
        self.loaded_at = now

    def _load(self) -> tuple[dict[str, EndpointView], dict[str, frozenset]]:
        with self.database.session() as session:
            endpoint_rows = session.execute(
                select(Endpoint.id, Endpoint.name, Endpoint.status, Endpoint.status_reason,
                       *[getattr(Endpoint, f.name) for f in PROXY_FIELDS])
            ).all()
            # Live instances, and those that ended recently enough to settle a learned id; the
            # history of long-stopped instances would grow every refresh without bound.
            recent = datetime.now(timezone.utc) - timedelta(seconds=2 * LEARNED_TTL_SECONDS)
            instance_rows = session.execute(
                select(Instance.endpoint_id, Instance.id, Instance.status, Instance.address, Instance.ready_at,
                       Instance.revision)
                .where(or_(Instance.status.in_(INSTANCE_LIVE_STATES), Instance.stopped_at >= recent))
                .order_by(Instance.created_at, Instance.id)
            ).all()
            split_rows = session.execute(
                select(Revision.endpoint_id, Revision.number, Revision.traffic).where(Revision.traffic > 0)
                .order_by(Revision.number)
            ).all()
            key_rows = session.execute(
                select(ApiKey.endpoint_id, ApiKey.key_hash).where(ApiKey.revoked_at.is_(None))
            ).all()

        keys: dict[int, set[str]] = {}
        for endpoint_id, key_hash in key_rows:
            keys.setdefault(endpoint_id, set()).add(key_hash.lower())
        ready: dict[int, list[InstanceView]] = {}
        draining: dict[int, set[str]] = {}
        live: dict[int, int] = {}
        seen: dict[int, set[str]] = {}
        splits: dict[int, list[tuple[int, int]]] = {}
        for endpoint_id, number, traffic in split_rows:
            splits.setdefault(endpoint_id, []).append((number, traffic))
        for endpoint_id, inst_id, status, address, ready_at, revision in instance_rows:
            if status not in (I_QUEUED, I_PROVISIONING, I_STARTING):
                seen.setdefault(endpoint_id, set()).add(inst_id)
            if status in INSTANCE_LIVE_STATES:
                live[endpoint_id] = live.get(endpoint_id, 0) + 1
            if status == I_READY and address:
                ready.setdefault(endpoint_id, []).append(InstanceView(inst_id, address, _epoch(ready_at),
                                                                     revision or 0))
            elif status == I_DRAINING:
                draining.setdefault(endpoint_id, set()).add(inst_id)

        endpoints: dict[str, EndpointView] = {}
        known: dict[str, frozenset] = {}
        for row in endpoint_rows:
            spec = {}
            for f in PROXY_FIELDS:
                value = getattr(row, f.name)
                spec[f.name] = tuple(value or ()) if f.kind == ROUTES else (f.default if value is None else value)
            endpoints[row.name] = EndpointView(
                name=row.name,
                status=row.status or "",
                status_reason=row.status_reason or "",
                **spec,
                key_hashes=frozenset(keys.get(row.id, ())),
                instances=tuple(ready.get(row.id, ())),
                draining_ids=frozenset(draining.get(row.id, ())),
                live_count=live.get(row.id, 0),
                split=tuple(splits.get(row.id, ())),
            )
            known[row.name] = frozenset(seen.get(row.id, ()))
        return endpoints, known

    def poll_ready(self, name: str, revision: int = 0) -> bool:
        """One endpoint's ready instances, straight from the database: while requests are held
        for a cold start, this sees the instance the moment the worker records it ready, ahead
        of the lifecycle's answer making its way back through Temporal; and a route rule naming
        an instance the cached view does not know yet looks here before answering 1006.
        Returns whether any (of `revision`, when given)."""
        try:
            with self.database.session() as session:
                rows = session.execute(
                    select(Instance.id, Instance.address, Instance.ready_at, Instance.revision)
                    .join(Endpoint, Endpoint.id == Instance.endpoint_id)
                    .where(Endpoint.name == name, Instance.status == I_READY, Instance.address != "")
                ).all()
        except Exception:
            log.exception("polling %s for ready instances failed", name)
            return False
        found = False
        for inst_id, address, ready_at, inst_revision in rows:
            if inst_id in self._gone:
                continue
            self.learn(name, InstanceView(inst_id, address, _epoch(ready_at), inst_revision or 0))
            found = found or not revision or inst_revision == revision
        return found

    def run_forever(self) -> None:
        """Body of the refresh greenlet."""
        import gevent

        while True:
            gevent.sleep(self.refresh_seconds)
            self.refresh()


def _epoch(value: datetime | None) -> float:
    if value is None:
        return 0.0
    if value.tzinfo is None:  # SQLite hands back naive datetimes; every stored time is UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()
