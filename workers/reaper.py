"""Reaping on worker start: what a crashed worker left behind on this host.

Instance processes outlive the worker on purpose (their own sessions), so a worker crash never
takes serving instances down. What a crash can leave is a process nobody wants any more (its
instance was stopped, failed or purged meanwhile, or never recorded) — those are stopped here —
and instances recorded as running whose process is gone — those are noted here and their
InstanceWorkflow's next liveness check records the death and replaces them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select

from common.config import Settings
from common.db import Database
from common.models import I_FAILED, I_STARTING, I_READY, I_DRAINING, I_STOPPED, TERMINATED, Event, Instance
from workers.backends.base import Backend

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    stopped: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)


def reap(settings: Settings, db: Database, backend: Backend) -> ReapReport:
    report = ReapReport()
    running = set(backend.running_instance_ids())
    with db.session() as session:
        for iid in sorted(running):
            inst = session.get(Instance, iid)
            unwanted = (inst is None or inst.status in (I_STOPPED, I_FAILED)
                        or inst.endpoint.status == TERMINATED)
            if unwanted:
                backend.stop(iid, settings.stop_grace_seconds)
                report.stopped.append(iid)
                if inst is not None:
                    session.add(Event(endpoint_id=inst.endpoint_id, instance_id=iid, kind="reaped",
                                      message=f"stopped orphan process of instance {iid} ({inst.status})"))
        recorded = session.scalars(select(Instance).where(
            Instance.status.in_((I_STARTING, I_READY, I_DRAINING)), Instance.host == settings.host))
        for inst in recorded:
            if inst.id not in running:
                report.gone.append(inst.id)
                session.add(Event(endpoint_id=inst.endpoint_id, instance_id=inst.id, kind="process_gone",
                                  message=f"instance {inst.id} is recorded {inst.status} but its process is gone; "
                                          "its liveness check will record it and replace it if needed"))
    if report.stopped or report.gone:
        log.warning("reaped orphans %s; instances without a process %s", report.stopped, report.gone)
    return report
