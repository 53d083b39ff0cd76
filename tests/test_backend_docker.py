"""The docker backend against a real engine: the one that answers, else a private dockerd started
for this module (tests/docker_engine.py); skipped when neither is possible.

The test image is built here from the host's static busybox (its httpd serves the bind-mounted
workdir, so a file named `ping` makes /ping answer 200), so no registry is needed.
"""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from common.config import Settings
from tests.docker_engine import docker_client
from workers.backends.base import LaunchSpec
from workers.health import wait_until_ready
from workers.workdir import log_path_for, prepare_workdir

docker = pytest.importorskip("docker")

pytestmark = pytest.mark.timeout(120)
IMAGE = "standby-test-busybox:latest"


@pytest.fixture(scope="module")
def client():
    # The engine that answers, else a private dockerd for this module (stopped and removed after).
    with docker_client() as client:
        try:
            client.images.get(IMAGE)
        except docker.errors.ImageNotFound:
            client.api.import_image_from_data(_busybox_rootfs(), repository=IMAGE.split(":")[0], tag="latest",
                                              changes=["ENV PATH=/bin"])
        yield client


def _busybox_rootfs() -> bytes:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("building the test image needs a static busybox on the host (apt-get install busybox-static)")
    data = Path(busybox).read_bytes()
    if b"ld-linux" in data[:8192]:
        pytest.skip(f"{busybox} is dynamically linked; the test image needs busybox-static")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in ("sh", "httpd", "sleep", "env", "echo", "cat"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", backend="docker", stop_grace_seconds=1.0, host="dock")


@pytest.fixture
def backend(client, settings):
    from workers.backends.docker import DockerBackend

    backend = DockerBackend(settings, client=client)
    try:
        yield backend
    finally:
        backend.stop_all(1.0)
        for container in client.containers.list(all=True, filters={
                "label": [f"standby.data_dir={settings.data_dir}"]}):
            container.remove(force=True)


def make_spec(settings, tmp_path, instance_id, command, **kwargs) -> LaunchSpec:
    source = tmp_path / f"src-{instance_id}"
    source.mkdir(exist_ok=True)
    (source / "ping").write_text("pong")
    workdir = prepare_workdir(settings, instance_id, source)
    return LaunchSpec(instance_id=instance_id, endpoint_name="ep", start_command=command, image=IMAGE,
                      port=0, workdir=str(workdir), log_path=str(log_path_for(settings, instance_id)),
                      **kwargs)


HTTPD = "httpd -f -p 127.0.0.1:{port} -h /workspace"


def test_launch_serves_on_allocated_port_then_stops(client, settings, backend, tmp_path):
    spec = make_spec(settings, tmp_path, "dk1", HTTPD, cpu_cores=0.5, memory_gb=0.25)
    launched = backend.launch(spec)
    assert launched.address == f"127.0.0.1:{launched.port}" and launched.container_id
    result = wait_until_ready(launched.address, "/ping", 20, lambda: backend.liveness("dk1"))
    assert result.ready, result.reason
    assert backend.liveness("dk1").alive
    assert backend.running_instance_ids() == ["dk1"]
    container = client.containers.get(launched.container_id)
    assert container.labels["standby.instance"] == "dk1" and container.labels["standby.endpoint"] == "ep"
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert container.attrs["HostConfig"]["Memory"] == 256 * 1024 * 1024

    backend.stop("dk1", 1.0)
    assert not backend.liveness("dk1").alive
    assert backend.running_instance_ids() == []
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(launched.container_id)
    backend.stop("dk1", 1.0)  # idempotent


def test_env_and_logs_reach_the_log_file(settings, backend, tmp_path):
    spec = make_spec(settings, tmp_path, "dk2", "sh -c 'echo port-arg=$PORT; env; exit 5'", env={"MODEL": "tiny"})
    launched = backend.launch(spec)
    result = wait_until_ready(launched.address, "/ping", 20, lambda: backend.liveness("dk2"))
    assert result.reason == "process exited with code 5 before answering /ping"
    liveness = backend.liveness("dk2")
    assert not liveness.alive and liveness.exit_code == 5
    backend.stop("dk2", 1.0)  # joins the log follower
    log = Path(spec.log_path).read_text()
    assert f"port-arg={launched.port}" in log
    assert f"PORT={launched.port}" in log and "MODEL=tiny" in log and "STANDBY_INSTANCE_ID=dk2" in log


def test_relaunch_replaces_the_container(client, settings, backend, tmp_path):
    first = backend.launch(make_spec(settings, tmp_path, "dk3", "sleep 300"))
    second = backend.launch(make_spec(settings, tmp_path, "dk3", "sleep 300"))
    containers = client.containers.list(all=True, filters={"label": ["standby.instance=dk3"]})
    assert [c.id for c in containers] == [second.container_id]
    assert first.container_id != second.container_id


def test_missing_image_is_a_clear_error(settings, backend, tmp_path):
    spec = make_spec(settings, tmp_path, "dk4", "")
    # A registry on a closed local port: the pull fails without leaving this machine.
    spec.image = "127.0.0.1:9/standby-no-such-image:never"
    with pytest.raises(ValueError, match="was not found"):
        backend.launch(spec)
