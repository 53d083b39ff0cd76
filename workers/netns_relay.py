"""Run one instance's server in its own network namespace, reachable through a host port.

    python netns_relay.py --listen 127.0.0.1:43121 --port 8080 [--mode net|user+net] -- CMD...

Why (docs/architecture.md "Ports and readiness"): the `port` of an endpoint is the port its
server listens on, as the user wrote it (`python -m http.server 8080`). Two instances of that
command cannot share one network namespace, so each gets its own. This process is the bridge
between the two worlds:

1. it binds the socket on the host side first (a socket stays in the namespace it was created in),
2. then moves itself into a new network namespace and brings its loopback up,
3. starts the command there (same process group, so stopping the instance stops both),
4. starts listening on the host port only once the server listens inside (a connect to it that
   is not refused; /proc/net/tcp would say so without connecting, but reading it walks the
   host's whole TCP table, 8-13 ms a look, bench/README.md), so until then a probe sees
   "connection refused", exactly as without the relay, and
5. relays every connection accepted on the host port to 127.0.0.1:<port> inside.

It exits with the command's exit status (or dies by the same signal), so the backend's liveness
and exit-code reporting see the server, not the relay. Standard library only: it runs with the
worker's interpreter but imports nothing of Standby's.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MODES = ("net", "user+net")
BLOCK = 64 * 1024
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def unshare_network(mode: str) -> None:
    """Move this process into a new network namespace (and, for `user+net`, a user namespace
    that maps the caller to root inside, which needs no privileges where the kernel allows
    unprivileged user namespaces)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | (CLONE_NEWUSER if mode == "user+net" else 0)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({mode}) failed: {os.strerror(err)}")
    if mode == "user+net":
        with open("/proc/self/setgroups", "w") as fh:
            fh.write("deny")
        with open("/proc/self/uid_map", "w") as fh:
            fh.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as fh:
            fh.write(f"0 {gid} 1")
    loopback_up()


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | _IFF_UP, b""))


def check(mode: str) -> int:
    """`--check MODE`: exit 0 when this host lets us create such a namespace."""
    try:
        unshare_network(mode)
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(BLOCK)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        # Half-close: the other direction may still be sending (e.g. a response after EOF).
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def _inner_connection(port: int) -> socket.socket | None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            sock.close()
    return None


def _serve(client: socket.socket, port: int) -> None:
    inner = _inner_connection(port)
    if inner is None:
        client.close()  # nothing listens inside yet: the caller sees the connection close
        return
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(inner, client), daemon=True)
    back.start()
    _pump(client, inner)
    back.join()
    client.close()
    inner.close()


def listening_inside(port: int) -> bool:
    """Whether something in this network namespace listens on `port`. A refused connect costs
    microseconds; an accepted one is closed at once, before any byte is sent."""
    sock = _inner_connection(port)
    if sock is None:
        return False
    sock.close()
    return True


def _open_when_listening(listener: socket.socket, port: int, child: subprocess.Popen) -> None:
    delay = 0.002
    while child.poll() is None:
        if listening_inside(port):
            listener.listen(1024)
            _accept_forever(listener, port)
            return
        time.sleep(delay)
        delay = min(0.05, delay * 1.1)


def _accept_forever(listener: socket.socket, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.EINVAL):
                return  # closed: the server exited
            continue
        threading.Thread(target=_serve, args=(client, port), daemon=True).start()


def _ignore(_signum, _frame) -> None:
    """Stopping an instance signals its whole process group: the server gets the signal itself
    and may drain its requests, which must keep flowing through here until it exits."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", choices=MODES, help="only check whether such a namespace can be made")
    parser.add_argument("--listen", help="host-side HOST:PORT to accept connections on")
    parser.add_argument("--port", type=int, help="the port the server listens on inside")
    parser.add_argument("--mode", choices=MODES, default="net")
    parser.add_argument("--uid", type=int, help="run the command as this uid (and group), with no other groups "
                                                "(README.md \"Instance isolation\")")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not (args.listen and args.port and command):
        parser.error("--listen, --port and a command are required")
    host, _, listen_port = args.listen.rpartition(":")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host.strip("[]"), int(listen_port)))
    unshare_network(args.mode)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _ignore)
    # Handlers (unlike SIG_IGN) are reset by exec, so the server gets default dispositions.
    identity = {"user": args.uid, "group": args.uid, "extra_groups": []} if args.uid is not None else {}
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, **identity)
    threading.Thread(target=_open_when_listening, args=(listener, args.port, child), daemon=True).start()
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:
            continue
    listener.close()
    sys.stdout.flush()
    if code < 0:  # die the way the server died, so the exit reads "killed by SIGKILL"
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main())
