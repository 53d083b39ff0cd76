"""Create-form drafts waiting on the review page.

A draft holds secret values, so it stays on the server (a file readable by this user only)
rather than in the signed-but-readable session cookie or hidden form fields; the page carries
only its random token. Drafts older than a day are removed when a new one is saved.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

MAX_AGE_SECONDS = 24 * 3600
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,64}$")


def _dir(data_dir: Path) -> Path:
    path = Path(data_dir) / "drafts"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def save_draft(data_dir: Path, spec: dict) -> str:
    folder = _dir(data_dir)
    now = time.time()
    for old in folder.glob("*.json"):
        try:
            if now - old.stat().st_mtime > MAX_AGE_SECONDS:
                old.unlink()
        except OSError:
            pass
    token = secrets.token_urlsafe(24)
    path = folder / f"{token}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(spec, handle)
    return token


def load_draft(data_dir: Path, token: str | None) -> dict | None:
    if not token or not _TOKEN_RE.match(token):
        return None
    path = _dir(data_dir) / f"{token}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def drop_draft(data_dir: Path, token: str) -> None:
    if token and _TOKEN_RE.match(token):
        (_dir(data_dir) / f"{token}.json").unlink(missing_ok=True)
