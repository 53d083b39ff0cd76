"""Many GPU hosts (docs/architecture.md "Hosts and pools"): three workers on this machine play three
hosts, each advertising its own loopback address (127.0.0.2, .3, .4) with its own GPUs, in two
pools, sharing one database and Temporal, with the real proxy and the real web app in front.

    h1  127.0.0.2  pool a  T4 x 2
    h2  127.0.0.3  pool a  T4 x 1
    h3  127.0.0.4  pool b  T4 x 1

Commands are written as users write them (a fixed port: each instance in its own network
namespace, published on its host's address). Hosts go down 4 s after their last heartbeat here
(a setting: STANDBY_HOST_DOWN_AFTER_SECONDS).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from common.config import load_settings
from common.db import Database
from common.models import Endpoint, Instance
from common.schema import upgrade
from tests.conftest import ROOT, USED_ENDPOINT_NAMES, free_port, wait_until, with_admin
from tests.proxy_fixtures import ProxyProcess

pytestmark = pytest.mark.timeout(240)
SERVER = "python -m http.server 8080"


class Cluster:
    def __init__(self, tmp: Path, temporal_address: str):
        uid = uuid.uuid4().hex[:6]
        self.tmp = tmp
        self.pool_a, self.pool_b = f"a-{uid}", f"b-{uid}"
        self.database_url = f"sqlite:///{tmp / 'shared.db'}"
        self.base = {k: v for k, v in os.environ.items() if not k.startswith(("STANDBY_", "TEMPORAL_"))}
        self.base.update({
            "DATABASE_URL": self.database_url, "TEMPORAL_ADDRESS": temporal_address,
            "STANDBY_TASK_QUEUE": f"hosts-{uid}", "STANDBY_POOL": self.pool_a,
            "STANDBY_HOST_DOWN_AFTER_SECONDS": "4", "STANDBY_STOP_GRACE_SECONDS": "2",
            "STANDBY_PROXY_PORT": str(free_port()), "STANDBY_DATA_DIR": str(tmp / "proxy-data"),
            "PYTHONUNBUFFERED": "1",
        })
        self.hosts = {
            "h1": {"ip": "127.0.0.2", "pool": self.pool_a, "gpus": "T4:2"},
            "h2": {"ip": "127.0.0.3", "pool": self.pool_a, "gpus": "T4:1"},
            "h3": {"ip": "127.0.0.4", "pool": self.pool_b, "gpus": "T4:1"},
        }
        self.names = {short: f"{short}-{uid}" for short in self.hosts}
        self.workers: dict[str, subprocess.Popen] = {}
        upgrade(self.database_url)
        self.db = Database(self.database_url)

    def worker_env(self, short: str) -> dict:
        host = self.hosts[short]
        return {**self.base, "STANDBY_DATA_DIR": str(self.tmp / short), "STANDBY_GPUS": host["gpus"]}

    def start_worker(self, short: str) -> None:
        host = self.hosts[short]
        log = open(self.tmp / f"{short}.log", "ab")
        # The flags, as an operator starts a worker on each host.
        self.workers[short] = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "worker", "--host", self.names[short], "--pool", host["pool"],
             "--advertise-address", host["ip"]],
            cwd=ROOT, env=self.worker_env(short), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_worker(self, short: str) -> None:
        os.killpg(self.workers[short].pid, signal.SIGKILL)
        self.workers[short].wait(10)

    def stop(self) -> None:
        from workers.backends.process import ProcessBackend

        for short, proc in self.workers.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            backend = ProcessBackend(load_settings(self.worker_env(short)))
            for iid in backend.running_instance_ids():
                backend.stop(iid, 1.0)

    def instances(self, name: str, live: bool = True) -> list[Instance]:
        with self.db.session() as s:
            endpoint = s.scalar(select(Endpoint).where(Endpoint.name == name))
            rows = list(s.scalars(select(Instance).where(Instance.endpoint_id == endpoint.id)
                                  .order_by(Instance.created_at)))
            for row in rows:
                s.expunge(row)
        return [r for r in rows if r.status not in ("stopped", "failed")] if live else rows


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, temporal_server):
    from webapp import create_app

    tmp = tmp_path_factory.mktemp("hosts")
    c = Cluster(tmp, temporal_server)
    for short in c.hosts:
        c.start_worker(short)
    c.proxy = ProxyProcess(c.base, tmp / "proxy.log")
    c.proxy.start()
    c.app = with_admin(create_app({"TESTING": True, "SECRET_KEY": "test", "STANDBY_SETTINGS": load_settings(
        {**c.base, "STANDBY_DATA_DIR": str(tmp / "web-data")})}))
    c.api = c.app.test_client()
    wait_until(lambda: len(c.api.get("/api/v1/hosts").get_json()["hosts"]) == 3, 60, message="three hosts")
    try:
        yield c
    finally:
        c.proxy.stop()
        c.stop()


def create(cluster, name: str, **spec) -> dict:
    assert name not in USED_ENDPOINT_NAMES
    USED_ENDPOINT_NAMES.add(name)
    body = {"name": name, "start_command": SERVER, "port": 8080, "gpu_type": "T4", "gpu_count": 1,
            "pools": [cluster.pool_a], "startup_timeout_seconds": 180, "health_interval_seconds": 1, **spec}
    response = cluster.api.post("/api/v1/endpoints", json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def status(cluster, name: str) -> dict:
    return cluster.api.get(f"/api/v1/endpoints/{name}").get_json()


def wait_status(cluster, name: str, wanted: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (body := status(cluster, name))["status"] == wanted and body, timeout, interval=0.2,
                      message=f"{name} {wanted}")


def review_page(cluster, name: str, **fields) -> str:
    """The create form submitted as a user does: the review page, nothing created yet."""
    from tests.test_webapp_ui import csrf_token
    from tests.test_webapp_validation import FORM_VALID

    form = cluster.api.get("/endpoints/new").get_data(as_text=True)
    data = {**FORM_VALID, "name": name, "start_command": SERVER, "gpu_type": "T4", "gpu_count": "1",
            "min_instances": "0", "max_instances": "2", "health_path": "", "csrf_token": csrf_token(form), **fields}
    response = cluster.api.post("/endpoints/new", data=data)
    assert response.status_code == 200, response.get_data(as_text=True)[:2000]
    return response.get_data(as_text=True)


def stop(cluster, *names: str) -> None:
    for name in names:
        cluster.api.post(f"/api/v1/endpoints/{name}/stop")
    for name in names:
        wait_status(cluster, name, "stopped", 60)


def host_of(cluster, instance: Instance) -> str:
    return next(short for short, full in cluster.names.items() if full == instance.host)


# ---------------------------------------------------------------- registration and refusal
def test_hosts_join_with_their_gpus_pools_and_addresses(cluster):
    hosts = {h["name"]: h for h in cluster.api.get("/api/v1/hosts").get_json()["hosts"]}
    for short, expected in cluster.hosts.items():
        host = hosts[cluster.names[short]]
        assert (host["pool"], host["address"], host["state"]) == (expected["pool"], expected["ip"], "up")
        count = int(expected["gpus"].split(":")[1])
        assert host["gpu_summary"] == {"T4": {"total": count, "used": 0, "free": count}}
        assert host["cpu_cores"] >= 1 and host["memory_gb"] > 0 and host["network_namespaces"] == "net"
    page = cluster.api.get("/hosts").get_data(as_text=True)
    assert all(cluster.names[s] in page for s in cluster.hosts)


def test_a_request_no_host_of_the_pool_can_ever_hold_is_refused_saying_what_the_pool_has(cluster):
    too_big = cluster.api.post("/api/v1/endpoints", json={
        "name": "toobig", "start_command": SERVER, "port": 8080, "gpu_type": "T4", "gpu_count": 3,
        "pools": [cluster.pool_a]})
    assert too_big.status_code == 400
    message = too_big.get_json()["errors"]["gpu_count"]
    assert message.startswith(f"no host of pool {cluster.pool_a!r} can ever hold this instance (3 x T4 GPU")
    assert f"{cluster.names['h1']}: T4 x 2" in message and f"{cluster.names['h2']}: T4 x 1" in message
    unknown = cluster.api.post("/api/v1/endpoints", json={"name": "nopool", "start_command": SERVER,
                                                          "pools": ["nowhere"]})
    assert unknown.status_code == 400 and "'nowhere' has no hosts" in unknown.get_json()["errors"]["pools"]
    odd = cluster.api.post("/api/v1/endpoints", json={"name": "oddsplit", "start_command": SERVER,
                                                      "pools": [cluster.pool_a, cluster.pool_b], "max_instances": 3})
    assert odd.status_code == 400 and "multiple of the number of pools" in odd.get_json()["errors"]["max_instances"]


# ---------------------------------------------------------------- placement and routing
def test_instances_are_placed_by_free_gpus_and_the_proxy_reaches_every_host(cluster):
    name = "spread3"
    create(cluster, name, min_instances=3, max_instances=3)
    wait_until(lambda: len([i for i in cluster.instances(name) if i.status == "ready"]) == 3, 90,
               message="three ready instances")
    instances = cluster.instances(name)
    placed = sorted(host_of(cluster, i) for i in instances)
    assert placed == ["h1", "h1", "h2"]  # all of pool a's GPUs, none of pool b's
    for inst in instances:
        assert inst.address.startswith(cluster.hosts[host_of(cluster, inst)]["ip"] + ":")
    hosts = {h["name"]: h for h in cluster.api.get("/api/v1/hosts").get_json()["hosts"]}
    assert hosts[cluster.names["h1"]]["gpu_summary"]["T4"] == {"total": 2, "used": 2, "free": 0}
    # Round robin through the one proxy reaches all three, on both hosts (once its view, refreshed
    # every second, has the last one that became ready).
    try:
        seen: set[str] = set()
        wait_until(lambda: seen.update(requests.get(f"{cluster.proxy.url}/e/{name}/", timeout=30)
                                       .headers["Deploy-Route-Target"] for _ in range(3))
                   or seen == {i.id for i in instances}, 15, interval=0.2, message="all three instances answering")
    finally:
        stop(cluster, name)


def test_a_gpu_freed_on_any_host_of_the_pool_goes_to_the_head_of_its_queue(cluster):
    big, small, first, second = "fifo-big", "fifo-small", "fifo-first", "fifo-second"
    create(cluster, big, min_instances=2, max_instances=2)  # binpack: h2's one GPU, then one of h1's
    wait_status(cluster, big, "running", 90)
    create(cluster, small, min_instances=1)  # the last free GPU, on h1
    wait_status(cluster, small, "running", 90)
    create(cluster, first, min_instances=1)
    wait_status(cluster, first, "queued")
    create(cluster, second, min_instances=1)
    wait_status(cluster, second, "queued")
    wait_until(lambda: (status(cluster, first)["queue_position"], status(cluster, second)["queue_position"]) == (1, 2),
               10, message="positions 1 and 2")
    # The review page says, before confirming, that a third would queue, and where; pool b has room.
    review = review_page(cluster, "fifo-review", pools=f"{cluster.pool_a}, {cluster.pool_b}")
    assert f"Pool {cluster.pool_a}: an instance (1 T4 GPU) would queue at position 3 (0 T4 free" in review
    assert f"Pool {cluster.pool_b}: an instance (1 T4 GPU) would start at once; 1 of its 1 host has room" in review
    [freed] = cluster.instances(small)
    stop(cluster, small)  # one GPU freed, on h1
    body = wait_status(cluster, first, "running", 90)
    assert host_of(cluster, cluster.instances(first)[0]) == host_of(cluster, freed)
    assert status(cluster, second)["status"] == "queued" and status(cluster, second)["queue_position"] == 1
    stop(cluster, big)  # two more: the second gets one
    wait_status(cluster, second, "running", 90)
    stop(cluster, first, second)
    assert body["queue_position"] is None


def test_a_drained_host_takes_no_new_instances(cluster):
    h1 = cluster.names["h1"]
    assert cluster.api.post(f"/api/v1/hosts/{h1}/drain").status_code == 202
    wait_until(lambda: any(h["name"] == h1 and h["state"] == "draining"
                           for h in cluster.api.get("/api/v1/hosts").get_json()["hosts"]), 10, message="draining")
    name = "afterdrain"
    create(cluster, name, min_instances=1, max_instances=1)
    wait_status(cluster, name, "running", 90)
    assert host_of(cluster, cluster.instances(name)[0]) == "h2"  # h1 has more GPUs, but drains
    assert cluster.api.post(f"/api/v1/hosts/{h1}/undrain").status_code == 202
    wait_until(lambda: any(h["name"] == h1 and h["state"] == "up"
                           for h in cluster.api.get("/api/v1/hosts").get_json()["hosts"]), 10, message="up again")
    stop(cluster, name)


# ---------------------------------------------------------------- host failure
def test_a_host_that_goes_silent_is_down_its_instance_replaced_and_requests_answered(cluster):
    name = "survivor"
    create(cluster, name, min_instances=1, max_instances=1)
    wait_status(cluster, name, "running", 90)
    [first] = cluster.instances(name)
    victim = host_of(cluster, first)
    assert victim in ("h1", "h2")
    answers = []
    cluster.kill_worker(victim)
    deadline = time.monotonic() + 60
    replacement = None
    while time.monotonic() < deadline:
        try:
            answers.append(requests.get(f"{cluster.proxy.url}/e/{name}/", timeout=30).status_code)
        except requests.RequestException as exc:
            answers.append(type(exc).__name__)
        live = [i for i in cluster.instances(name) if i.status == "ready" and i.id != first.id]
        if live:
            replacement = live[0]
            break
        time.sleep(0.2)
    assert replacement is not None, "no replacement within 60 s"
    assert host_of(cluster, replacement) != victim
    assert all(a == 200 for a in answers), answers  # the old process still answered meanwhile
    lost = next(i for i in cluster.instances(name, live=False) if i.id == first.id)
    assert lost.status == "failed" and "is down" in lost.reason
    hosts = {h["name"]: h for h in cluster.api.get("/api/v1/hosts").get_json()["hosts"]}
    assert hosts[cluster.names[victim]]["state"] == "down"
    # Within a refresh of its routing view the proxy sends everything to the replacement.
    wait_until(lambda: {requests.get(f"{cluster.proxy.url}/e/{name}/", timeout=30).headers["Deploy-Route-Target"]
                        for _ in range(4)} == {replacement.id}, 10, interval=0.2, message="only the replacement")
    # The worker comes back: it stops the lost instance's process (nobody wants it), runs no duplicate.
    cluster.start_worker(victim)
    from workers.backends.process import ProcessBackend

    backend = ProcessBackend(load_settings(cluster.worker_env(victim)))
    wait_until(lambda: first.id not in backend.running_instance_ids(), 60, message="the lost instance reaped")
    wait_until(lambda: any(h["name"] == cluster.names[victim] and h["state"] == "up"
                           for h in cluster.api.get("/api/v1/hosts").get_json()["hosts"]), 30, message="back up")
    stop(cluster, name)


def test_an_endpoint_over_two_pools_keeps_serving_when_one_pools_hosts_are_all_down(cluster):
    name = "twopools"
    create(cluster, name, pools=[cluster.pool_a, cluster.pool_b], min_instances=2, max_instances=2)
    wait_until(lambda: len([i for i in cluster.instances(name) if i.status == "ready"]) == 2, 90,
               message="two ready instances")
    assert sorted(host_of(cluster, i)[:2] for i in cluster.instances(name))[-1] == "h3"  # one in pool b
    cluster.kill_worker("h3")  # all of pool b
    answers = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        answers.append(requests.get(f"{cluster.proxy.url}/e/{name}/", timeout=30).status_code)
        time.sleep(0.2)
    assert all(a == 200 for a in answers), answers
    wait_until(lambda: any(i.status == "failed" and "is down" in i.reason
                           for i in cluster.instances(name, live=False)), 30, message="pool b's instance lost")
    assert requests.get(f"{cluster.proxy.url}/e/{name}/", timeout=30).status_code == 200
    cluster.start_worker("h3")
    stop(cluster, name)
