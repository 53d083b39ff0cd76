"""A revision's source, pinned once (README.md "Revisions and updates"), and what an instance of a
revision starts from.

Pinning resolves a git ref to the commit it names now (an endpoint's own git URL, or a git model
version's) and copies a source directory into the data dir (`<data dir>/revisions/<row id>`), so
every later start of the revision (a restart, a scale-out, a wake weeks later) runs exactly that
code. It runs when the revision is made (the endpoint's first revision when its workflow starts,
a new one when its update starts); a revision made before revisions existed is pinned by the
first instance that starts from it. Two pins of one revision at once agree: the first written wins.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select

from common.config import Settings
from common.db import Database
from common.models import Endpoint, ModelVersion, Revision
from common.revisions import primary
from workers.sources import SourceError, resolve_commit


@dataclass
class Pin:
    commit: str = ""
    snapshot: str = ""


def find_revision(session, endpoint: Endpoint, number: int) -> Revision | None:
    """Revision `number` of the endpoint; 0 means the one serving the largest share (an instance
    started by a workflow from before revisions)."""
    if number == 0:
        split = {r.number: r.traffic for r in endpoint.revisions if r.traffic > 0}
        number = primary(split) or max((r.number for r in endpoint.revisions), default=0)
    if not number:
        return None
    return session.scalar(select(Revision).where(Revision.endpoint_id == endpoint.id, Revision.number == number))


def pin_revision(settings: Settings, db: Database, endpoint_name: str, number: int,
                 heartbeat: Callable[[str], None] | None = None) -> Pin:
    """Pin revision `number` of the endpoint (idempotent). Raises SourceError saying why not."""
    with db.session() as session:
        endpoint = session.scalar(select(Endpoint).where(Endpoint.name == endpoint_name))
        if endpoint is None:
            raise SourceError(f"endpoint {endpoint_name} does not exist")
        revision = find_revision(session, endpoint, number)
        if revision is None:
            raise SourceError(f"endpoint {endpoint_name} has no revision {number}")
        if revision.pinned_at is not None:
            return Pin(revision.source_commit, revision.source_snapshot)
        spec, kind, revision_id = dict(revision.spec or {}), endpoint.source_kind, revision.id
        version = session.get(ModelVersion, spec["model_version_id"]) if spec.get("model_version_id") else None
        git = (version.git_url, version.git_ref) if version is not None and version.kind == "git" else None
    pin = Pin()
    if kind == "routes":
        if version is None and spec.get("git_url"):
            git = (spec["git_url"], spec.get("git_ref") or "")
        if git is not None:
            pin.commit = resolve_commit(settings, git[0], git[1], heartbeat)
    elif spec.get("source_dir"):
        pin.snapshot = str(snapshot_directory(settings, revision_id, spec["source_dir"]))
    with db.session() as session:
        revision = session.get(Revision, revision_id)
        if revision.pinned_at is None:
            revision.source_commit, revision.source_snapshot = pin.commit, pin.snapshot
            revision.pinned_at = datetime.now(timezone.utc)
            return pin
        won = Pin(revision.source_commit, revision.source_snapshot)  # pinned meanwhile by another start
    return won


def snapshot_directory(settings: Settings, revision_id: int, source_dir: str) -> Path:
    """A copy of `source_dir` that stays as it is now: what every instance of the revision copies."""
    source = Path(source_dir).expanduser()
    if not source.exists():
        raise SourceError(f"source_dir {str(source)!r} does not exist on host {settings.host}")
    if not source.is_dir():
        raise SourceError(f"source_dir {str(source)!r} is not a directory")
    target = settings.revisions_dir / str(revision_id)
    if target.is_dir():
        return target
    settings.revisions_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{revision_id}-", dir=settings.revisions_dir))
    try:
        # Links are copied as links, as an instance's own copy does (workers/workdir.py).
        shutil.copytree(source, staging / "tree", symlinks=True)
        try:
            os.rename(staging / "tree", target)
        except OSError:
            if not target.is_dir():  # not a concurrent pin that got there first
                raise
    except OSError as err:
        raise SourceError(f"could not copy source_dir {str(source)!r}: {err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def remove_snapshots(settings: Settings, revision_ids: list[int]) -> None:
    for revision_id in revision_ids:
        shutil.rmtree(settings.revisions_dir / str(revision_id), ignore_errors=True)


def start_spec(session, endpoint: Endpoint, number: int) -> dict[str, Any] | None:
    """What an instance of revision `number` starts from, copied out while the session is open:
    the revision's fields with its pinned source in place of the live one. None when the endpoint
    has no revisions (it starts from its spec, as before revisions)."""
    revision = find_revision(session, endpoint, number)
    if revision is None:
        return None
    spec = dict(revision.spec or {})
    spec["revision"] = revision.number
    spec["pinned"] = revision.pinned_at is not None
    spec["source_commit"] = revision.source_commit
    if revision.source_snapshot:
        spec["source_dir"] = revision.source_snapshot
    return spec
