"""Tell an instance's workflow the moment its process (or container) exits on its own.

Without this, a crashed instance is noticed at its next liveness check (every health interval,
10 s by default), and the proxy keeps routing requests to a dead address meanwhile. The watcher
looks at this host's instances twice a second and signals `process_exited` to the workflow of
each one that exited without Standby stopping it; the workflow checks at once, records the
death with its exit code and replaces it (workflows/instance.py).

The same loop runs the backend's disk watchdog (`enforce_disk`, where it has one): an instance
stopped for outgrowing its disk_gb is then told like any other that exited, with that reason.
"""
from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client

from workers.backends.base import Backend
from workflows.contracts import SIGNAL_PROCESS_EXITED, instance_workflow_id

log = logging.getLogger(__name__)
WATCH_SECONDS = 0.5


async def watch_exits(backend: Backend, client: Client, stop: asyncio.Event, every: float = WATCH_SECONDS) -> None:
    told: set[str] = set()
    while not stop.is_set():
        enforce_disk = getattr(backend, "enforce_disk", None)
        if enforce_disk is not None:
            try:
                for instance_id in await asyncio.to_thread(enforce_disk):
                    log.warning("instance %s outgrew its disk_gb and was stopped", instance_id)
            except Exception:  # noqa: BLE001
                log.exception("the disk watchdog failed")
        try:
            exited = await asyncio.to_thread(backend.exited_instances)
        except Exception:  # noqa: BLE001 - a watcher that dies would be worse than a missed look
            log.exception("looking for exited instances failed")
            exited = {}
        for instance_id, endpoint in exited.items():
            if instance_id in told or not endpoint:
                continue
            told.add(instance_id)
            try:
                await client.get_workflow_handle(instance_workflow_id(endpoint, instance_id)).signal(
                    SIGNAL_PROCESS_EXITED)
                log.warning("instance %s of %s exited on its own: its workflow was told", instance_id, endpoint)
            except Exception as err:  # noqa: BLE001 - its workflow may have ended already
                log.info("could not tell instance %s's workflow it exited: %s", instance_id, err)
        told &= set(exited)  # a relaunch under the same id (a retried start) is watched again
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def unstick(client: Client, namespace: str, running: dict[str, str]) -> int:
    """A worker that starts while instances of its host still run took over from one that died.
    The workflows of those instances (and of their endpoints) had their next tasks bound to the
    dead worker's sticky queue, where each would wait out the sticky timeout before any worker
    took it, one after the other along a chain (an endpoint's release, then its instance's stop).
    Resetting their stickiness sends their next tasks to the shared queue at once."""
    from temporalio.api.common.v1 import WorkflowExecution
    from temporalio.api.workflowservice.v1 import ResetStickyTaskQueueRequest

    from workflows.contracts import endpoint_workflow_id

    ids = set()
    for instance_id, endpoint in running.items():
        if endpoint:
            ids.update((endpoint_workflow_id(endpoint), instance_workflow_id(endpoint, instance_id)))
    done = 0
    for workflow_id in sorted(ids):
        try:
            await client.workflow_service.reset_sticky_task_queue(ResetStickyTaskQueueRequest(
                namespace=namespace, execution=WorkflowExecution(workflow_id=workflow_id)))
            done += 1
        except Exception as err:  # noqa: BLE001 - closed or unknown: nothing to unstick
            log.debug("reset sticky queue of %s: %s", workflow_id, err)
    return done
