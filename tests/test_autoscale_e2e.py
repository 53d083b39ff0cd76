"""Autoscaling, metrics and cost in the user's world: `app.py up` (real Temporal, worker, web app and
proxy, real instance processes), used through the JSON API, the proxy and a real Chromium.

One `up` for the module. What is set is what these tests are about: prices (STANDBY_PRICES),
and short sampling and metrics steps so a chart has points within seconds; the autoscaling
windows are the endpoints' own spec fields, kept short.
"""
from __future__ import annotations

import json

import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, wait_until
from tests.user_world import UpProcess, unique

pytestmark = pytest.mark.timeout(420)
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CPU_PRICE = 36.0  # per CPU-only instance-hour: a cent a second, so a second shows
SLOW_SERVER = f"{PY} {ROOT / 'tests' / 'proxy_instance.py'} $PORT slow"
BUSY_SERVER = f"{PY} {ROOT / 'tests' / 'cpu_instance.py'} $PORT"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def world(tmp_path_factory, temporal_server):
    up = UpProcess(tmp_path_factory.mktemp("autoscale"), temporal_address=temporal_server, extra_env={
        "STANDBY_PRICES": f"T4=0.35,cpu={CPU_PRICE:g}",
        "STANDBY_USAGE_SAMPLE_SECONDS": "1",
        "STANDBY_METRICS_STEP_SECONDS": "2",
        "STANDBY_WORKER_METRICS_PORT": str(free_port()),
    }).start()
    yield up
    assert up.stop() == 0, up.log()[-3000:]


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _ready(world, name: str) -> list[dict]:
    return [i for i in world.endpoint(name)["instances"] if i["status"] == "ready"]


# ---------------------------------------------------------------- cost


def test_an_instance_costs_its_price_from_ready_to_stopped_to_the_second(world):
    name = unique("costly")
    world.create({"name": name, "start_command": f"{PY} -m http.server $PORT --bind 127.0.0.1"})
    assert world.call(name).status_code == 200
    first = world.endpoint(name)
    time.sleep(1.5)
    second = world.endpoint(name)
    # A running instance's cost grows while it runs, not only when it stops.
    assert second["usage"]["running"] and second["usage"]["cost"] > first["usage"]["cost"] > 0
    [running] = second["instances"]
    assert running["price_per_hour"] == CPU_PRICE and running["cost"] > 0

    assert world.api("POST", f"/endpoints/{name}/stop").status_code == 202
    stopped = world.wait_status(name, "stopped", timeout=60)
    [inst] = stopped["instances"]
    billed = (_time(inst["stopped_at"]) - _time(inst["ready_at"])).total_seconds()
    one_second = CPU_PRICE / 3600
    # (stopped - ready) x price, from the timestamps the page and the API show, to the second.
    assert inst["cost"] == pytest.approx(billed * CPU_PRICE / 3600, abs=one_second)
    assert inst["billed_seconds"] == pytest.approx(billed, abs=0.01)
    # Queued, provisioning and starting time is not in it.
    assert _time(inst["ready_at"]) > _time(inst["created_at"])
    assert stopped["usage"]["cost"] == pytest.approx(inst["cost"], abs=1e-6)
    assert stopped["usage"]["cost_this_month"] <= stopped["usage"]["cost"] + 1e-6
    time.sleep(1.1)
    assert world.endpoint(name)["usage"]["cost"] == pytest.approx(inst["cost"], abs=1e-6)  # stopped: no growth

    listed = world.api("GET", f"/endpoints?prefix={name}").json()["endpoints"]
    assert listed[0]["usage"]["cost"] == pytest.approx(inst["cost"], abs=1e-6)
    signed_in = world.browser()
    page = signed_in.get(f"{world.web}/endpoints/{name}", timeout=30).text
    assert "never billed" in page and "USD" in page
    assert "Cost this month" in signed_in.get(f"{world.web}/endpoints", timeout=30).text
    # The web app's /metrics spans every project: a site admin's token scrapes it (README.md "Metrics").
    assert requests.get(f"{world.web}/metrics", timeout=30, allow_redirects=False).status_code in (302, 401)
    exposition = requests.get(f"{world.web}/metrics", timeout=30,
                              headers={"Authorization": f"Bearer {world.token}"}).text
    line = next(l for l in exposition.splitlines()
                if l.startswith("standby_endpoint_cost{") and f'endpoint="{name}"' in l)
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(inst["cost"], abs=1e-6)


# ---------------------------------------------------------------- concurrency: 0 -> 3 -> 0


class LoadLoop:
    """Clients calling a slow path in a loop, as many as `clients` says (changed while it runs);
    bounded: every phase waits for a condition at most a given time, and `stop()` ends it."""

    def __init__(self, url: str, most_clients: int):
        self.url = url
        self.clients = 0
        self.done = threading.Event()
        self.targets: dict[str, float] = {}  # instance id -> first served (seconds after the start)
        self.statuses: list[int] = []
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(most_clients)]
        for t in self.threads:
            t.start()

    def _client(self, number: int) -> None:
        session = requests.Session()
        while not self.done.is_set():
            if number >= self.clients:
                time.sleep(0.05)
                continue
            try:
                r = session.get(self.url, timeout=60)
            except requests.RequestException:
                continue
            self.statuses.append(r.status_code)
            target = r.headers.get("Deploy-Route-Target", "")
            if target and target not in self.targets:
                self.targets[target] = time.monotonic() - self.started

    def step(self, clients: int) -> None:
        self.clients = clients
        self.started = time.monotonic() if not self.targets else self.started

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(70)


@pytest.fixture(scope="module")
def bursty(world):
    """An endpoint scaled on concurrency (2 in flight per instance, at most 3): from zero, a step
    to 6 clients of a 0.5 s path until its third instance served; then one client, while the
    autoscaler drains back to one instance; then nothing, until the idle retention releases it."""
    name = unique("bursty")
    world.create({"name": name, "start_command": SLOW_SERVER, "max_instances": 3, "autoscaling": True,
                  "target_concurrency": 2, "autoscale_window_seconds": 6, "scale_down_delay_seconds": 2,
                  "idle_retention_seconds": 3})
    world.wait_status(name, "standby")
    load = LoadLoop(f"{world.proxy}/e/{name}/sleep?s=0.5", most_clients=6)
    try:
        load.step(6)
        wait_until(lambda: len(load.targets) >= 3, 90, interval=0.1, message="a third instance serving")
        served_three = time.monotonic()
        time.sleep(2)
        load.step(1)
        wait_until(lambda: len(_ready(world, name)) == 1, 60, interval=0.2, message="the autoscaler draining to one")
        load.step(0)
        lighter = time.monotonic() - served_three
    finally:
        load.stop()
    return name, load, lighter


def test_concurrency_autoscaling_from_zero_to_three_and_back_to_zero(world, bursty):
    name, load, lighter = bursty
    assert len(load.targets) == 3 and set(load.statuses) == {200}
    times = sorted(load.targets.values())
    print(f"\nload step (0 -> 6 clients) to the third instance serving: {times[2]:.2f} s (instances first "
          f"served at {', '.join(f'{t:.2f}' for t in times)} s); down to one instance {lighter:.1f} s after")
    # Load over: the idle retention releases the last instance.
    world.wait_status(name, "standby", timeout=60)
    events = list(reversed(world.api("GET", f"/endpoints/{name}/events").json()["events"]))
    decisions = [e["message"] for e in events if e["kind"] == "autoscale"]
    up = [m for m in decisions if m.endswith("-> 3 instances")]
    assert up and "in-flight" in up[0] and "target 2 per instance" in up[0], decisions
    assert any(m.endswith("-> 1 instance") and "in-flight" in m for m in decisions[decisions.index(up[0]):]), decisions
    drained = [e for e in events if e["message"].endswith("the autoscaler needs fewer instances: draining")]
    assert len(drained) == 2, [(e["kind"], e["message"]) for e in events]
    assert sum(1 for e in events if e["kind"] == "instance_ready") == 3
    assert events[-1]["kind"] == "status" and events[-1]["message"] == "endpoint is standby"


# ---------------------------------------------------------------- utilisation: 1 -> 2


@pytest.fixture(scope="module")
def busy(world):
    """An endpoint kept at one instance (min 1) that burns a core, scaled on a CPU target."""
    name = unique("busy")
    world.create({"name": name, "start_command": BUSY_SERVER, "min_instances": 1, "max_instances": 2,
                  "cpu_cores": 1, "autoscaling": True, "target_cpu_percent": 40, "autoscale_window_seconds": 6,
                  "scale_down_delay_seconds": 0})
    world.wait_status(name, "running", timeout=60)
    try:
        wait_until(lambda: len(_ready(world, name)) == 2, 90, interval=0.5, message="a second instance")
        yield name
    finally:
        # Two instances burning CPU on a shared machine: stopped as soon as the tests have seen them.
        world.api("POST", f"/endpoints/{name}/stop")


def test_a_cpu_bound_instance_scales_to_two(world, busy):
    events = world.api("GET", f"/endpoints/{busy}/events").json()["events"]
    decisions = [e["message"] for e in events if e["kind"] == "autoscale"]
    assert any("CPU" in m and "target 40%" in m and m.endswith("-> 2 instances") for m in decisions), decisions
    port = world.env["STANDBY_WORKER_METRICS_PORT"]
    exposition = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert f'standby_instance_cpu_percent{{endpoint="{busy}"' in exposition
    assert "standby_instance_cold_start_seconds_bucket" in exposition


def test_the_worker_samples_each_instance_at_its_rate(world, busy):
    """STANDBY_USAGE_SAMPLE_SECONDS=1 and 2 s steps here: each whole step of a running instance
    holds two CPU samples, give or take one (a sample landing on a step's edge)."""
    import sqlite3

    from common.metrics_store import USAGE

    def counts() -> list[int]:
        database = sqlite3.connect(f"file:{world.env['STANDBY_DATA_DIR']}/standby.db?mode=ro", uri=True)
        try:
            rows = database.execute(
                "SELECT p.instance_id, p.at, p.data FROM metric_points p JOIN endpoints e ON e.id = p.endpoint_id "
                "WHERE e.name = ? AND p.kind = ? AND p.step = 2 AND p.instance_id != '' ORDER BY p.at",
                (busy, USAGE)).fetchall()
        finally:
            database.close()
        by_instance: dict[str, list[int]] = {}
        for instance_id, _, data in rows:
            by_instance.setdefault(instance_id, []).append(json.loads(data).get("cpu_n", 0))
        # The first and last steps of an instance are partial, as is the one being written now.
        return [n for found in by_instance.values() for n in found[1:-1]]

    wait_until(lambda: len(counts()) >= 5, 30, interval=0.5, message="five whole steps of samples")
    found = counts()
    print(f"\nCPU samples per 2 s step of a running instance (1 s rate): {found}")
    assert all(1 <= n <= 3 for n in found), found
    assert 1.5 <= sum(found) / len(found) <= 2.5, found


# ---------------------------------------------------------------- charts


def test_charts_render_in_chromium_with_real_data_and_tables_without_javascript(world, bursty, busy, tmp_path):
    name = bursty[0]
    # Without JavaScript: the page's tables hold the same figures.
    wait_until(lambda: sum(world.api("GET", f"/endpoints/{name}/metrics").json()["requests"]) > 0, 30,
               message="request figures in the store")
    signed_in = world.browser()
    html = signed_in.get(f"{world.web}/endpoints/{name}", timeout=30).text
    assert 'id="requests-table"' in html and 'id="cold-starts-table"' in html
    wait_until(lambda: world.api("GET", f"/endpoints/{busy}/metrics").json()["usage"], 30,
               message="CPU figures in the store")
    assert 'id="usage-table"' in signed_in.get(f"{world.web}/endpoints/{busy}", timeout=30).text

    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requested = []
            page.goto(f"{world.web}/login")
            page.fill("#name", "admin")
            page.fill("#password", world.admin_password)
            page.click("button:has-text('Sign in')")
            page.wait_for_url(f"{world.web}/endpoints")
            page.on("request", lambda r: requested.append(r.url))
            page.goto(f"{world.web}/endpoints/{name}?range=1h")
            page.wait_for_selector("#charts[data-drawn]")
            charts = page.evaluate("""() => window.standbyCharts.map(c => ({
                title: c.title,
                points: c.u.data.slice(1).map(s => s.filter(v => v !== null && v > 0).length),
                canvas: c.u.ctx.canvas.width}))""")
            by_title = {c["title"]: c for c in charts}
            assert by_title["Requests per second"]["points"][0] > 0
            assert by_title["Latency"]["points"][0] > 0  # p50 of real requests (about 500 ms)
            assert by_title["Instances (dashed: cold starts)"]["points"][0] > 0
            assert all(c["canvas"] > 0 for c in charts)
            assert not page.locator("details.metrics-tables").get_attribute("open")  # charts shown instead
            assert all(url.startswith(world.web) for url in requested), requested  # nothing from a CDN
            page.screenshot(path=str(tmp_path / "bursty-metrics.png"), full_page=True)

            page.goto(f"{world.web}/endpoints/{busy}?range=1h")
            page.wait_for_selector("#charts[data-drawn]")
            cpu = page.evaluate("""() => window.standbyCharts.filter(c => c.title === 'CPU per instance')
                .map(c => c.u.data.slice(1).map(s => s.filter(v => v !== null && v > 0).length))""")
            assert cpu and max(cpu[0]) > 0
            page.screenshot(path=str(tmp_path / "busy-metrics.png"), full_page=True)
        finally:
            browser.close()
