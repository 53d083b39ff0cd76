"""Instances cannot read the platform's secrets (README.md "Instance isolation").

The data dir holds the database (every endpoint's sealed secrets, the users' password hashes and
token hashes), the keys that open the secrets and sign the web sessions, every instance's logs
and the other instances' working directories. An instance runs code its endpoint's owner wrote,
so on the process backend it runs as an unprivileged user that can read none of it:

- **A uid of its own per instance**, from `STANDBY_INSTANCE_UIDS` (default 200000-299999), with a
  group of the same number and no other groups. No account is needed for such a uid (as for a
  container's), so nothing is created on the host, and no instance can read another's files,
  environment (`/proc/<pid>/environ`, which holds its secrets) or signal its processes, as it
  could if they shared one user.
- **Its working directory is its own** (0700, owned by its uid; its HOME and TMPDIR), and only the
  way to it can be entered: the data dir and `instances/` are 0711 (enter, not list), everything
  else in the data dir is the worker's alone (0600 files, 0700 directories; `app.py` runs every
  part with umask 077). When the instance stops, its directory goes back to root.
- This needs the worker to run as root (it sets the uid of what it starts) and the paths an
  instance needs — its working directory, the Python interpreter, Standby's runtime for model
  code — to be enterable by other users. Where either is missing, instances run as the worker's
  own user, as before, and the worker says why at start and in every instance's log.

The docker backend gives a container no privileges and mounts only its own working directory,
never the data dir (workers/backends/docker.py).
"""
from __future__ import annotations

import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import Settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Isolation:
    """How this worker starts instances: `uids` to draw from, or None with the reason why not."""

    uids: range | None
    reason: str = ""

    def uid_for(self, instance_id: str, taken: set[int]) -> int | None:
        """The uid of a new instance: spread by its id over the range (so a uid is seldom used
        again soon), never one a running instance has."""
        if self.uids is None:
            return None
        size = len(self.uids)
        start = int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:8], "big") % size
        for step in range(size):
            uid = self.uids[(start + step) % size]
            if uid not in taken:
                return uid
        raise RuntimeError(f"every uid of STANDBY_INSTANCE_UIDS ({self.uids.start}-{self.uids.stop - 1}) is taken "
                           "by a running instance; widen the range")


def parse_uids(raw: str) -> range | None:
    """`200000-299999` -> that range; `off` -> None. ValueError saying what to write otherwise."""
    text = (raw or "").strip().lower()
    if text in ("off", "none", "no", "false", ""):
        return None
    low, sep, high = text.partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or not 1000 <= int(low) <= int(high) < 2**31 - 1:
        raise ValueError(f"STANDBY_INSTANCE_UIDS must be a range of uids such as 200000-299999 (above the host's "
                         f"accounts, from 1000 on) or off, got {raw!r}")
    return range(int(low), int(high) + 1)


def first_closed(path: Path) -> Path | None:
    """The first directory on the way to `path` (itself included) that other users cannot enter."""
    path = Path(path).resolve()
    for part in [*reversed(path.parents), path]:
        try:
            mode = os.stat(part).st_mode
        except FileNotFoundError:
            break
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return part
    return None


def decide(settings: Settings) -> Isolation:
    """Once, at worker start: whether instances can run as uids of their own here."""
    uids = parse_uids(settings.instance_uids)
    if uids is None:
        return Isolation(None, "STANDBY_INSTANCE_UIDS=off")
    if os.geteuid() != 0:
        return Isolation(None, "the worker does not run as root, so it cannot start instances as other users")
    needed = [settings.instances_dir, Path(sys.executable).parent, Path(sys.executable).resolve().parent,
              Path(sys.prefix), ROOT]
    for path in needed:
        closed = first_closed(path)
        if closed is not None:
            return Isolation(None, f"{closed} cannot be entered by other users (mode "
                                   f"{stat.filemode(os.stat(closed).st_mode)}), and an instance needs to reach "
                                   f"{path}; put Standby and its data dir where other users can enter (chmod o+x)")
    return Isolation(uids)


def harden_data_dir(settings: Settings) -> None:
    """The data dir's permissions as the module's docstring says: the way to the instances'
    directories can be entered, everything else is the worker's alone. Idempotent; run at start
    by every part that writes there."""
    data = Path(settings.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    settings.instances_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o711)
    os.chmod(settings.instances_dir, 0o711)
    for entry in data.iterdir():
        if entry == settings.instances_dir or entry.is_symlink():
            continue
        _private(entry)
    for entry in settings.instances_dir.iterdir():
        if entry.is_file() or entry.name == "stopped":
            _private(entry)


def _private(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            if stat.S_IMODE(mode) & 0o077:
                os.chmod(path, 0o700)
        elif stat.S_IMODE(mode) & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass  # removed meanwhile (a -wal file, a draft)


def give(instance_dir: Path, uid: int) -> None:
    """The instance's directory and everything in it to its uid, 0700: its own and no one else's."""
    for root, dirs, files in os.walk(instance_dir):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)
        os.chmod(root, 0o700)
    os.chown(instance_dir, uid, uid)
    os.chmod(instance_dir, 0o700)


def take_back(instance_dir: Path) -> None:
    """A stopped instance's directory back to root: a later instance given the same uid cannot
    enter it."""
    try:
        os.chown(instance_dir, 0, 0)
        os.chmod(instance_dir, 0o700)
    except FileNotFoundError:
        pass
