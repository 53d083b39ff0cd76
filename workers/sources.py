"""Put a "routes" endpoint's model code into an instance's fresh workdir (at provision).

Two kinds of source: a registered archive version (extracted with the same safety checks as the
upload), or a git URL + ref (cloned, the ref checked out, the resolved commit returned so the
caller can record it). Every failure raises `SourceError` with a message fit for the instance's
failure reason.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.archives import ArchiveError, archive_kind, extract_archive, sha256_of
from common.config import Settings
from common.git_source import allowed_protocols, git_ref_error, git_url_error


class SourceError(ValueError):
    """The model code could not be put in place; the message says why (a ValueError, so the
    provision activity's existing handler turns it into a non-retryable failure reason)."""


@dataclass
class SourceInfo:
    kind: str  # "archive" | "git"
    resolved_commit: str = ""  # git: the commit the ref pointed at when cloned
    git_url: str = ""
    git_ref: str = ""
    archive_sha256: str = ""
    files: int = 0


def _field(source: Any, name: str, default: Any = "") -> Any:
    if isinstance(source, dict):
        return source.get(name, default)
    return getattr(source, name, default)


def source_snapshot(source: Any) -> dict:
    """The fields `populate_routes_source` needs, copied out of an ORM row while its session is open."""
    kind = _field(source, "kind") or ("git" if _field(source, "git_url") else "archive")
    return {"kind": kind, "archive_path": _field(source, "archive_path"),
            "archive_sha256": _field(source, "archive_sha256"),
            "git_url": _field(source, "git_url"), "git_ref": _field(source, "git_ref")}


def populate_routes_source(settings: Settings, source: Any, workdir: str | Path,
                           heartbeat: Callable[[str], None] | None = None) -> SourceInfo:
    """Fill `workdir` from `source`: a ModelVersion row, an Endpoint row with git_url/git_ref
    (no model version), or a dict with the same fields (kind, archive_path, archive_sha256,
    git_url, git_ref). `heartbeat(detail)` is called every few seconds while a clone or an
    extraction runs, so a Temporal activity can heartbeat through a long one."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    beat = _Throttled(heartbeat)
    kind = _field(source, "kind") or ("git" if _field(source, "git_url") else "archive")
    if kind == "git":
        return _from_git(settings, _field(source, "git_url"), _field(source, "git_ref"), workdir, beat)
    if kind == "archive":
        return _from_archive(settings, _field(source, "archive_path"), _field(source, "archive_sha256"), workdir,
                             beat)
    raise SourceError(f"unknown model source kind {kind!r} (expected archive or git)")


class _Throttled:
    def __init__(self, heartbeat: Callable[[str], None] | None, every_seconds: float = 5.0):
        self.heartbeat, self.every, self.last = heartbeat, every_seconds, 0.0

    def __call__(self, detail: str) -> None:
        now = time.monotonic()
        if self.heartbeat is not None and now - self.last >= self.every:
            self.last = now
            self.heartbeat(detail)


def _from_archive(settings: Settings, archive_path: str, expected_sha256: str, workdir: Path,
                  beat: _Throttled) -> SourceInfo:
    if not archive_path:
        raise SourceError("the model version has no archive")
    path = Path(archive_path)
    if not path.is_absolute():
        path = settings.models_dir / path
    if not path.is_file():
        raise SourceError(f"the model archive {path} is missing on this host")
    if expected_sha256 and sha256_of(path) != expected_sha256:
        raise SourceError(f"the model archive {path} does not match its recorded SHA-256; it was changed or damaged")
    try:
        info = extract_archive(path, archive_kind(path.name), workdir, settings.model_max_unpacked_bytes,
                               on_member=lambda name: beat(f"extracting {name}"))
    except ArchiveError as exc:
        raise SourceError(f"cannot extract the model archive: {exc}") from None
    except OSError as exc:
        raise SourceError(f"cannot extract the model archive: {exc}") from None
    return SourceInfo(kind="archive", archive_sha256=expected_sha256, files=info.members)


# Clones running right now, by process group id, so that a worker exiting (or killed by
# `app.py up` on Ctrl-C, which sends SIGTERM first) does not leave them behind.
_live_groups: set[int] = set()
_live_lock = threading.Lock()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _kill_live_clones() -> None:
    with _live_lock:
        groups = list(_live_groups)
    for pgid in groups:
        _kill_group(pgid)


def git_environment(settings: Settings) -> dict[str, str]:
    """The environment of every git command: no prompts (a credential prompt would wait forever
    on a worker), no credential helpers or askpass programs from the host's config, and only the
    transports common/git_source.py allows, for the URL, its submodules and redirects alike."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    env.update({
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "true",
        "SSH_ASKPASS": "true",
        # ssh must not ask either (host key, passphrase): BatchMode fails instead.
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
        "GIT_ALLOW_PROTOCOL": allowed_protocols(settings.allow_file_git),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "credential.helper",
        "GIT_CONFIG_VALUE_0": "",
    })
    return env


def _git(settings: Settings, args: list[str], cwd: Path | None, deadline: float, beat: _Throttled) -> str:
    """Run one git command in its own process group, killed (with every helper it started:
    ssh, git-remote-https, index-pack) on timeout, on cancellation and on any error here."""
    # ext:: would run an arbitrary command taken from the URL; GIT_ALLOW_PROTOCOL refuses it too.
    command = ["git", "-c", "protocol.ext.allow=never", *args]
    try:
        process = subprocess.Popen(command, cwd=cwd, env=git_environment(settings), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    except FileNotFoundError:
        raise SourceError("git is not installed on this worker host") from None
    with _live_lock:
        _live_groups.add(process.pid)
    timeout = settings.model_git_timeout_seconds
    try:
        while True:
            try:
                out, err = process.communicate(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise SourceError(f"git {args[0]} took longer than {timeout:g} s "
                                      "(STANDBY_MODEL_GIT_TIMEOUT_SECONDS); check the URL and the network") from None
                # A cancelled activity learns it here: heartbeat raises, and the finally kills git.
                beat(f"git {args[0]}")
    finally:
        if process.returncode is None:
            _kill_group(process.pid)
            process.kill()
            process.communicate()
        else:
            _kill_group(process.pid)  # helpers git left behind in its group
        with _live_lock:
            _live_groups.discard(process.pid)
    if process.returncode != 0:
        detail = (err or out).strip().splitlines()
        raise SourceError(f"git {args[0]} failed: {' '.join(detail[-3:]) or f'exit {process.returncode}'}")
    return out.strip()


def _resolve(settings: Settings, clone: Path, ref: str, deadline: float, beat: _Throttled) -> str:
    # A branch exists only as origin/<ref> in a fresh clone; tags and commits resolve as given.
    for candidate in (f"origin/{ref}", ref):
        try:
            return _git(settings, ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{candidate}^{{commit}}"],
                        clone, deadline, beat)
        except SourceError:
            continue
    raise SourceError(f"git ref {ref!r} was not found in the repository (branch, tag or commit)")


def _from_git(settings: Settings, url: str, ref: str, workdir: Path, beat: _Throttled) -> SourceInfo:
    if not url or not ref:
        raise SourceError("a git source needs both a URL and a ref")
    # The web app checked these when they were registered; rows written before the rules got
    # stricter (or by other means) are checked again, with the same rules.
    if problem := git_url_error(url, settings.allow_file_git):
        raise SourceError(f"the git URL is refused: {problem}")
    if problem := git_ref_error(ref):
        raise SourceError(f"the git ref is refused: {problem}")
    # One deadline for the whole source: clone, resolve, checkout and submodules together.
    deadline = time.monotonic() + settings.model_git_timeout_seconds
    # Clone beside the workdir, then move the files in: the workdir may already exist.
    staging = Path(tempfile.mkdtemp(prefix=".clone-", dir=workdir.parent))
    try:
        clone = staging / "repo"
        _git(settings, ["clone", "--quiet", "--no-checkout", "--", url, str(clone)], None, deadline, beat)
        commit = _resolve(settings, clone, ref, deadline, beat)
        _git(settings, ["checkout", "--quiet", "--detach", commit], clone, deadline, beat)
        if (clone / ".gitmodules").exists():
            _git(settings, ["submodule", "update", "--init", "--recursive", "--quiet"], clone, deadline, beat)
        entries = list(clone.iterdir())
        clashes = sorted(entry.name for entry in entries if (workdir / entry.name).exists())
        if clashes:
            raise SourceError(f"the workdir already holds {', '.join(clashes)}; it must start empty")
        for entry in entries:
            entry.rename(workdir / entry.name)
        files = len(entries)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SourceInfo(kind="git", resolved_commit=commit, git_url=url, git_ref=ref, files=files)


def resolve_commit(settings: Settings, url: str, ref: str,
                   heartbeat: Callable[[str], None] | None = None) -> str:
    """The commit `ref` (a branch, tag or commit) names in the repository at `url` now: what a
    revision pins (README.md "Revisions and updates"). Asks the remote for its refs; a ref it does
    not list (an abbreviated commit) is resolved in a clone. Raises SourceError."""
    if not url or not ref:
        raise SourceError("a git source needs both a URL and a ref")
    if problem := git_url_error(url, settings.allow_file_git):
        raise SourceError(f"the git URL is refused: {problem}")
    if problem := git_ref_error(ref):
        raise SourceError(f"the git ref is refused: {problem}")
    beat = _Throttled(heartbeat)
    deadline = time.monotonic() + settings.model_git_timeout_seconds
    if len(ref) == 40 and all(c in "0123456789abcdef" for c in ref.lower()):
        return ref.lower()
    listed = _git(settings, ["ls-remote", "--", url, ref], None, deadline, beat)
    found: dict[str, str] = {}
    for line in listed.splitlines():
        commit, _, name = line.partition("\t")
        found[name.strip()] = commit.strip()
    # An annotated tag's commit is its peeled line (^{}); a branch wins over a tag of the same name.
    for name in (f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", ref):
        if name in found:
            return found[name]
    staging = Path(tempfile.mkdtemp(prefix=".resolve-"))
    try:
        clone = staging / "repo"
        _git(settings, ["clone", "--quiet", "--no-checkout", "--", url, str(clone)], None, deadline, beat)
        return _resolve(settings, clone, ref, deadline, beat)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
