"""Put a "routes" endpoint's model code into an instance's fresh workdir (at provision).

Two kinds of source: a registered archive version (extracted with the same safety checks as the
upload), or a git URL + ref (cloned, the ref checked out, the resolved commit returned so the
caller can record it). Every failure raises `SourceError` with a message fit for the instance's
failure reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.archives import ArchiveError, archive_kind, extract_archive, sha256_of
from common.config import Settings


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


def _git(args: list[str], cwd: Path | None, timeout: float, beat: _Throttled) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    # ext:: would run an arbitrary command taken from the URL.
    command = ["git", "-c", "protocol.ext.allow=never", *args]
    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise SourceError("git is not installed on this worker host") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = process.communicate(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                process.kill()
                process.communicate()
                raise SourceError(f"git {args[0]} took longer than {timeout:g} s") from None
            beat(f"git {args[0]}")
    if process.returncode != 0:
        detail = (err or out).strip().splitlines()
        raise SourceError(f"git {args[0]} failed: {' '.join(detail[-3:]) or f'exit {process.returncode}'}")
    return out.strip()


def _resolve(clone: Path, ref: str, timeout: float, beat: _Throttled) -> str:
    # A branch exists only as origin/<ref> in a fresh clone; tags and commits resolve as given.
    for candidate in (f"origin/{ref}", ref):
        try:
            return _git(["rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"], clone, timeout, beat)
        except SourceError:
            continue
    raise SourceError(f"git ref {ref!r} was not found in the repository (branch, tag or commit)")


def _from_git(settings: Settings, url: str, ref: str, workdir: Path, beat: _Throttled) -> SourceInfo:
    if not url or not ref:
        raise SourceError("a git source needs both a URL and a ref")
    if url.startswith("-") or ref.startswith("-"):
        raise SourceError("the git URL and ref must not start with '-'")
    timeout = settings.model_git_timeout_seconds
    # Clone beside the workdir, then move the files in: the workdir may already exist.
    staging = Path(tempfile.mkdtemp(prefix=".clone-", dir=workdir.parent))
    try:
        clone = staging / "repo"
        _git(["clone", "--quiet", "--no-checkout", "--", url, str(clone)], None, timeout, beat)
        commit = _resolve(clone, ref, timeout, beat)
        _git(["checkout", "--quiet", "--detach", commit], clone, timeout, beat)
        if (clone / ".gitmodules").exists():
            _git(["submodule", "update", "--init", "--recursive", "--quiet"], clone, timeout, beat)
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
