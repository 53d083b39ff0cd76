"""Which network instance containers join on this host's engine, found once per worker.

A bridge network gives every container its own network namespace, so the server listens on the
port the user declared and Docker publishes it on a free host port: several instances of one
fixed-port image share a host. Without one (an engine started with `--bridge=none` that cannot
create a network either), containers fall back to the host's network and share its ports.
README.md, "Docker backend networking", says what to configure.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from docker.errors import APIError, NotFound

DEFAULT_BRIDGE = "bridge"
# Made by the first worker that needs it, on engines without a default bridge; kept afterwards
# (other workers on the same engine use it too).
STANDBY_NETWORK = "standby"
LABEL_NETWORK_OWNER = "standby.network"
HOST = "host"


@dataclass(frozen=True)
class Networking:
    network: str  # what containers join: a network name, or "host"
    description: str  # one line for every instance log: what the engine could do, and why

    @property
    def publishes_ports(self) -> bool:
        return self.network != HOST


def detect_networking(client, forced: str | None = None) -> Networking:
    """The engine's default bridge, else Standby's own bridge network (made if missing), else the
    host's network. `forced` names a network to use as it is ("host" for host networking)."""
    if forced == HOST:
        return Networking(HOST, "host networking (chosen by configuration): containers share this host's ports")
    if forced:
        try:
            client.networks.get(forced)
        except NotFound:
            raise ValueError(f"docker network {forced!r} does not exist on this engine: create it "
                             f"(docker network create {forced}) or choose another") from None
        return Networking(forced, f"network {forced!r} (chosen by configuration), container ports published")
    if _network_named(client, DEFAULT_BRIDGE) is not None:
        return Networking(DEFAULT_BRIDGE, "the engine's default bridge network, container ports published")
    why = "the engine has no default bridge network (dockerd --bridge=none)"
    if _network_named(client, STANDBY_NETWORK) is not None:
        return Networking(STANDBY_NETWORK, f"bridge network {STANDBY_NETWORK!r}, container ports published ({why})")
    try:
        client.networks.create(STANDBY_NETWORK, driver="bridge", check_duplicate=True,
                               labels={LABEL_NETWORK_OWNER: "instances"})
    except APIError as exc:
        # Another worker on the same engine may have made it meanwhile: that is as good.
        if _network_named(client, STANDBY_NETWORK) is None:
            return Networking(HOST, f"host networking: {why}, and creating bridge network {STANDBY_NETWORK!r} "
                                    f"failed ({explain_api_error(exc)}); containers share this host's ports, so a "
                                    f"fixed-port image runs once per port: use $PORT in the start command")
    return Networking(STANDBY_NETWORK, f"bridge network {STANDBY_NETWORK!r} made by Standby, container ports "
                                       f"published ({why})")


def _network_named(client, name: str):
    # The engine's name filter matches substrings ("bridge" finds "my-bridge-net" too).
    return next((n for n in client.networks.list(names=[name]) if n.name == name), None)


def resolve_bind(address: str) -> str:
    """STANDBY_INSTANCE_BIND as the IP Docker needs: an IP as it is, a name (such as
    host.docker.internal) resolved here, on the worker."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(address, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError):
        raise ValueError(f"STANDBY_INSTANCE_BIND={address!r} does not resolve on this worker: give an IP "
                         f"address of this host (127.0.0.1 when the proxy runs on this host's network)") from None


def join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # an IPv6 literal
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def explain_api_error(exc: APIError) -> str:
    return str(getattr(exc, "explanation", None) or exc)
