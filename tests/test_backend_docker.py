"""The docker backend against a real engine: the one that answers, else a private dockerd started
for this module (tests/docker_engine.py); skipped when neither is possible.

The test images are built here from the host's static busybox, so no registry is needed: one with
no command of its own, and one whose command is a fixed-port server (httpd on port 8080, serving
the bind-mounted workdir, so a file named `ping` makes /ping answer 200).

The private dockerd has no default bridge (`--bridge=none`) and no iptables, so the backend makes
its own bridge network there and Docker publishes ports through its userland proxy; README.md,
"Docker backend networking", says what that shows and what it does not.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import socket
import tarfile
import time
from pathlib import Path

import pytest
import urllib3

from common.config import Settings
from tests.docker_engine import docker_client
from workers.backends.base import LaunchSpec
from workers.health import wait_until_ready
from workers.workdir import log_path_for, prepare_workdir

docker = pytest.importorskip("docker")

pytestmark = pytest.mark.timeout(120)
IMAGE = "standby-test-busybox:latest"
FIXED_PORT_IMAGE = "standby-test-httpd8080:latest"


@pytest.fixture(scope="module")
def client():
    # The engine that answers, else a private dockerd for this module (stopped and removed after).
    with docker_client() as client:
        images = {IMAGE: ["ENV PATH=/bin"],
                  FIXED_PORT_IMAGE: ["ENV PATH=/bin", 'CMD ["httpd", "-f", "-p", "8080", "-h", "/workspace"]']}
        for image, changes in images.items():
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                client.api.import_image_from_data(_busybox_rootfs(), repository=image.split(":")[0], tag="latest",
                                                  changes=changes)
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


@contextlib.contextmanager
def running_backend(client, settings, **kwargs):
    """A DockerBackend whose containers are all gone afterwards, whatever the test did."""
    from workers.backends.docker import DockerBackend

    backend = DockerBackend(settings, client=client, **kwargs)
    try:
        yield backend
    finally:
        backend.stop_all(1.0)
        for container in client.containers.list(all=True, filters={
                "label": [f"standby.data_dir={settings.data_dir}"]}):
            container.remove(force=True)


@pytest.fixture
def backend(client, settings):
    with running_backend(client, settings) as backend:
        yield backend


def make_spec(settings, tmp_path, instance_id, command, image=IMAGE, port=8080, **kwargs) -> LaunchSpec:
    source = tmp_path / f"src-{instance_id}"
    source.mkdir(exist_ok=True)
    (source / "ping").write_text("pong")
    (source / "whoami").write_text(instance_id)
    workdir = prepare_workdir(settings, instance_id, source)
    return LaunchSpec(instance_id=instance_id, endpoint_name="ep", start_command=command, image=image,
                      port=port, workdir=str(workdir), log_path=str(log_path_for(settings, instance_id)),
                      **kwargs)


def get(address: str, path: str) -> tuple[int, str]:
    response = urllib3.request("GET", f"http://{address}{path}", timeout=3.0, retries=False)
    return response.status, response.data.decode()


def answers(address: str) -> bool:
    try:
        get(address, "/ping")
    except urllib3.exceptions.HTTPError:
        return False
    return True


def ready(backend, launched, instance_id: str) -> None:
    result = wait_until_ready(launched.address, "/ping", 20, lambda: backend.liveness(instance_id))
    assert result.ready, f"{result.reason}; log: {Path(log_path_for(backend.settings, instance_id)).read_text()}"


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_instances_of_a_fixed_port_image_share_the_host(client, settings, backend, tmp_path):
    networking = backend.networking()
    if "bridge" in {n.name for n in client.networks.list(names=["bridge"])}:
        assert networking.network == "bridge"
    else:  # the private dockerd (--bridge=none): the backend makes its own bridge network
        assert networking.network == "standby", networking.description
        assert client.networks.get("standby").attrs["Labels"] == {"standby.network": "instances"}

    # The image's own command listens on 8080, always: two of it at once on one host.
    specs = [make_spec(settings, tmp_path, i, "", image=FIXED_PORT_IMAGE, port=8080) for i in ("fp1", "fp2")]
    launched = [backend.launch(spec) for spec in specs]
    for spec, instance in zip(specs, launched):
        ready(backend, instance, spec.instance_id)
    assert launched[0].address != launched[1].address
    for spec, instance in zip(specs, launched):
        assert instance.address == f"127.0.0.1:{instance.port}"
        # Reached from the host at its own published address, each answers with its own files.
        assert get(instance.address, "/whoami") == (200, spec.instance_id)
        container = client.containers.get(instance.container_id)
        assert container.attrs["HostConfig"]["NetworkMode"] == networking.network
        assert container.attrs["HostConfig"]["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
        assert "PORT=8080" in container.attrs["Config"]["Env"]
        log = Path(spec.log_path).read_text()
        assert f"networking on this engine: {networking.description}" in log
        assert f"listening on port 8080 inside, published at 127.0.0.1:{instance.port}" in log

    # A restarted worker's backend finds them by their labels, and stops them.
    from workers.backends.docker import DockerBackend

    restarted = DockerBackend(settings, client=client)
    assert restarted.running_instance_ids() == ["fp1", "fp2"]
    assert all(restarted.liveness(i).alive for i in ("fp1", "fp2"))
    # A retried start takes each over, at the address it was launched with (workers/activities.py).
    for spec, instance in zip(specs, launched):
        adopted = restarted.adopt(spec.instance_id)
        assert (adopted.address, adopted.container_id) == (instance.address, instance.container_id)
        assert adopted.started_at > 0 and adopted.log_path == spec.log_path
    assert restarted.exited_instances() == {}
    for spec, instance in zip(specs, launched):
        restarted.stop(spec.instance_id, 1.0)
        assert not restarted.liveness(spec.instance_id).alive
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(instance.container_id)
        assert not answers(instance.address)  # the published port went with it
    assert restarted.running_instance_ids() == [] == backend.running_instance_ids()
    restarted.stop("fp1", 1.0)  # idempotent
    assert restarted.adopt("fp1") is None


def test_port_placeholder_is_the_declared_port_inside(client, tmp_path):
    # Names for both addresses: the bind is resolved on the worker, the advertised name kept.
    settings = Settings(data_dir=tmp_path / "data", backend="docker", stop_grace_seconds=1.0, host="dock",
                        instance_bind="localhost", advertise_address="localhost")
    with running_backend(client, settings) as backend:
        spec = make_spec(settings, tmp_path, "pp1", "httpd -f -p $PORT -h /workspace", port=9000)
        launched = backend.launch(spec)
        assert launched.address == f"localhost:{launched.port}"
        ready(backend, launched, "pp1")
        assert get(launched.address, "/whoami") == (200, "pp1")
        container = client.containers.get(launched.container_id)
        assert container.attrs["Config"]["Cmd"] == ["httpd", "-f", "-p", "9000", "-h", "/workspace"]
        assert container.attrs["HostConfig"]["PortBindings"] == {"9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}


def test_limits_and_labels(client, settings, backend, tmp_path):
    spec = make_spec(settings, tmp_path, "dk1", "sleep 300", cpu_cores=0.5, memory_gb=0.25, disk_gb=1)
    launched = backend.launch(spec)
    container = client.containers.get(launched.container_id)
    assert container.labels["standby.instance"] == "dk1" and container.labels["standby.endpoint"] == "ep"
    assert container.labels["standby.port"] == "8080"
    assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert container.attrs["HostConfig"]["Memory"] == 256 * 1024 * 1024
    storage_limit = container.attrs["HostConfig"].get("StorageOpt")
    driver = client.info()["Driver"]
    if storage_limit:  # a driver that limits size (overlay2 on xfs with pquota, btrfs, zfs...)
        assert storage_limit == {"size": "1G"}
    else:  # vfs or overlay2 on ext4, as here: started anyway, and the log says the limit is not enforced
        assert f"disk_gb=1 is not enforced: storage driver {driver} cannot limit" in Path(spec.log_path).read_text()
    assert backend.liveness("dk1").alive


def test_env_and_logs_reach_the_log_file(settings, backend, tmp_path):
    spec = make_spec(settings, tmp_path, "dk2", "sh -c 'echo port-arg=$PORT; env; exit 5'", env={"MODEL": "tiny"})
    launched = backend.launch(spec)
    result = wait_until_ready(launched.address, "/ping", 20, lambda: backend.liveness("dk2"))
    assert result.reason == "process exited with code 5 before answering /ping"
    liveness = backend.liveness("dk2")
    assert not liveness.alive and liveness.exit_code == 5
    assert "exit code 5" in liveness.detail
    backend.stop("dk2", 1.0)  # joins the log follower
    log = Path(spec.log_path).read_text()
    assert "port-arg=8080" in log
    assert "PORT=8080" in log and "MODEL=tiny" in log and "STANDBY_INSTANCE_ID=dk2" in log


def test_out_of_memory_is_reported(settings, backend, tmp_path):
    # A string that doubles until it outgrows the limit (the engine's minimum, 6 MiB). Not at once:
    # the engine watches for out-of-memory kills only from shortly after the start.
    spec = make_spec(settings, tmp_path, "oom1", "sh -c 'sleep 1; x=x; while true; do x=$x$x; done'",
                     memory_gb=0.001)
    backend.launch(spec)
    deadline = time.monotonic() + 30
    while backend.liveness("oom1").alive and time.monotonic() < deadline:
        time.sleep(0.1)
    liveness = backend.liveness("oom1")
    assert not liveness.alive and liveness.exit_code == 137, liveness.detail
    assert "(killed: out of memory; raise memory_gb)" in liveness.detail
    # Exited on its own (not stopped by Standby): the worker's exit watcher tells its workflow.
    assert backend.exited_instances() == {"oom1": "ep"}
    backend.stop("oom1", 0)
    assert backend.exited_instances() == {}


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


def test_bind_address_not_on_this_host_is_a_clear_error(client, tmp_path):
    # A documentation address (RFC 5737): binding it fails on this host, and nothing is sent.
    settings = Settings(data_dir=tmp_path / "data", backend="docker", stop_grace_seconds=1.0, host="dock",
                        instance_bind="198.51.100.7")
    with running_backend(client, settings) as backend:
        spec = make_spec(settings, tmp_path, "bb1", "", image=FIXED_PORT_IMAGE)
        with pytest.raises(ValueError, match="STANDBY_INSTANCE_BIND=198.51.100.7.*not an address of host dock"):
            backend.launch(spec)
        assert client.containers.list(all=True, filters={"label": ["standby.instance=bb1"]}) == []


def test_host_network_fallback(client, settings, tmp_path):
    # What an engine without bridge networking gets (here chosen, so the same engine shows it).
    with running_backend(client, settings, network="host") as backend:
        assert backend.networking().network == "host"
        # $PORT: a port Standby allocates on the host. The server binds loopback: it is the host's.
        spec = make_spec(settings, tmp_path, "hp1", "httpd -f -p 127.0.0.1:$PORT -h /workspace")
        launched = backend.launch(spec)
        assert launched.address == f"127.0.0.1:{launched.port}" and launched.port != 8080
        ready(backend, launched, "hp1")
        container = client.containers.get(launched.container_id)
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert f"PORT={launched.port}" in container.attrs["Config"]["Env"]
        assert "on the host's network" in Path(spec.log_path).read_text()

        # A fixed port: one instance per port; the second is refused, saying what to change.
        port = free_loopback_port()
        command = f"httpd -f -p 127.0.0.1:{port} -h /workspace"
        first = backend.launch(make_spec(settings, tmp_path, "hf1", command, port=port))
        assert first.address == f"127.0.0.1:{port}"
        ready(backend, first, "hf1")
        with pytest.raises(ValueError, match=rf"port {port} on host dock is taken by instance hf1.*\$PORT"):
            backend.launch(make_spec(settings, tmp_path, "hf2", command, port=port))
        assert client.containers.list(all=True, filters={"label": ["standby.instance=hf2"]}) == []
        assert get(first.address, "/whoami") == (200, "hf1")
        backend.stop("hf1", 1.0)
        assert not answers(first.address)
