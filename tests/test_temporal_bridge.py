"""The one Temporal bridge without a server: waiting from threads and greenlets, timeouts, an
unreachable server asked at most once a second, and the proxy's reading of its failures.
(Against a real server, killed and restarted: tests/faults/, tests/test_proxy_lifecycle.py.)"""
from __future__ import annotations

import asyncio
import threading
import time

import gevent
import pytest

from common.config import Settings
from common.temporal_bridge import (
    NOT_FOUND,
    TEMPORAL_ERROR,
    TIMEOUT,
    UPDATE_FAILED,
    GreenletWaiter,
    TemporalBridge,
    TemporalUnavailable,
    WorkflowActionError,
)
from proxy.lifecycle_client import ERR_NO_WORKFLOW, ERR_TIMEOUT, ERR_UNAVAILABLE, lifecycle_error
from tests.conftest import free_port
from workflows.contracts import ERR_NOT_SERVING, ERR_REPLICA_QUOTA, ERR_START_FAILED

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(tmp_path) -> Settings:
    # Nothing listens there: every connect is refused.
    return Settings(data_dir=tmp_path, temporal_address=f"127.0.0.1:{free_port()}")


@pytest.fixture
def bridge(settings):
    bridge = TemporalBridge(settings)
    yield bridge
    bridge.close()


@pytest.fixture
def greenlet_bridge(settings):
    bridge = TemporalBridge(settings, waiter=GreenletWaiter)
    yield bridge
    bridge.close()


def test_threads_get_results_exceptions_and_timeouts(bridge):
    assert bridge.call(lambda: asyncio.sleep(0.01, result="done"), timeout=5) == "done"

    async def refuse():
        raise WorkflowActionError(ERR_REPLICA_QUOTA, "deployment replica quota exceeded")

    with pytest.raises(WorkflowActionError) as info:
        bridge.call(refuse, timeout=5)
    assert info.value.type == ERR_REPLICA_QUOTA
    cancelled = threading.Event()

    async def slow():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(WorkflowActionError) as info:
        bridge.call(slow, timeout=0.2)
    assert info.value.type == TIMEOUT and "did not answer within 0.2 seconds" in info.value.message
    assert cancelled.wait(5), "a call the caller gave up on keeps running on the loop"


def test_threads_share_one_loop(bridge):
    results = []

    def caller(n):
        results.append(bridge.call(lambda: asyncio.sleep(0.2, result=n), timeout=5))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(8))
    assert time.monotonic() - began < 1.5  # concurrent on the loop, not one after the other


def test_a_waiting_greenlet_never_blocks_the_hub(greenlet_bridge):
    ticks = []

    def ticker():
        for _ in range(10):
            ticks.append(time.monotonic())
            gevent.sleep(0.02)

    waiting = [gevent.spawn(greenlet_bridge.call, lambda n=n: asyncio.sleep(0.3, result=n), 5) for n in range(3)]
    beside = gevent.spawn(ticker)
    gevent.joinall([*waiting, beside], timeout=10, raise_error=True)
    assert [g.value for g in waiting] == [0, 1, 2]
    assert len(ticks) == 10 and ticks[-1] - ticks[0] < 0.3  # it ticked while the calls waited
    with pytest.raises(WorkflowActionError) as info:
        gevent.spawn(greenlet_bridge.call, lambda: asyncio.sleep(30), 0.1).get(timeout=5)
    assert info.value.type == TIMEOUT


def test_unreachable_temporal_says_how_to_start_it_and_is_asked_once_a_second(bridge, settings, monkeypatch):
    with pytest.raises(TemporalUnavailable) as info:
        bridge.start_endpoint("tts")
    message = str(info.value)
    assert f"Temporal is not reachable at {settings.temporal_target} (connection refused)" in message
    assert "python app.py temporal" in message and "TEMPORAL_ADDRESS" in message

    from temporalio.client import Client

    attempts = []
    real_connect = Client.connect

    async def counting_connect(*args, **kwargs):
        attempts.append(time.monotonic())
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(Client, "connect", counting_connect)
    for _ in range(5):
        with pytest.raises(TemporalUnavailable) as again:
            bridge.is_running("tts")
        assert str(again.value) == message
    assert attempts == []  # within the second after a failed connect, no new attempt
    time.sleep(1.1)
    with pytest.raises(TemporalUnavailable):
        bridge.query_status("tts")
    assert len(attempts) == 1


def test_close_then_use_again(bridge):
    assert bridge.call(lambda: asyncio.sleep(0, result=1), timeout=5) == 1
    bridge.close()
    assert bridge.call(lambda: asyncio.sleep(0, result=2), timeout=5) == 2


@pytest.mark.parametrize("failure, kind", [
    (TemporalUnavailable("Temporal is not reachable at 127.0.0.1:1"), ERR_UNAVAILABLE),
    (WorkflowActionError(TEMPORAL_ERROR, "namespace default is not found"), ERR_UNAVAILABLE),
    (WorkflowActionError(TIMEOUT, "wake_until_ready did not finish within 185 seconds"), ERR_TIMEOUT),
    (WorkflowActionError(NOT_FOUND, "no running workflow for endpoint 'tts'"), ERR_NO_WORKFLOW),
    (WorkflowActionError(ERR_REPLICA_QUOTA, "deployment replica quota exceeded"), ERR_REPLICA_QUOTA),
    (WorkflowActionError(ERR_NOT_SERVING, "endpoint tts is stopped"), ERR_NOT_SERVING),
    (WorkflowActionError(ERR_START_FAILED, "process exited with code 1"), ERR_START_FAILED),
    (WorkflowActionError(UPDATE_FAILED, "handler raised"), ERR_START_FAILED),
    (WorkflowActionError("SomeOtherType", "the workflow said no"), ERR_START_FAILED),
])
def test_the_proxy_reads_each_failure_as_one_kind(failure, kind):
    assert lifecycle_error(failure).kind == kind
