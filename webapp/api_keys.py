"""Endpoint API keys (issue 3): shown once at creation, stored as a SHA-256 hash.

The proxy checks `Authorization: Bearer <key>` by hashing the presented key and looking up
a row with that `key_hash` and no `revoked_at`.
"""
from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.models import ApiKey, Endpoint, utcnow

KEY_PREFIX = "sk-"
SHOWN_PREFIX_LENGTH = 8


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, endpoint: Endpoint, name: str = "") -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext key, which is never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        endpoint_id=endpoint.id,
        name=name,
        prefix=plaintext[:SHOWN_PREFIX_LENGTH],
        key_hash=hash_key(plaintext),
    )
    session.add(row)
    session.flush()
    return row, plaintext


def active_keys(session: Session, endpoint: Endpoint) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey)
            .where(ApiKey.endpoint_id == endpoint.id, ApiKey.revoked_at.is_(None))
            .order_by(ApiKey.created_at, ApiKey.id)
        )
    )


def revoke_key(session: Session, key: ApiKey) -> None:
    # Revoked rows are kept (revoked_at set) so the audit trail shows which key was used when.
    key.revoked_at = utcnow()


def validate_key_name(raw) -> tuple[str, str | None]:
    """Returns (name, error message or None)."""
    if raw is None:
        return "", None
    if not isinstance(raw, str):
        return "", "name must be text"
    name = raw.strip()
    if len(name) > 64:
        return "", f"name must be at most 64 characters, got {len(name)}"
    return name, None


def key_json(key: ApiKey) -> dict:
    from webapp.views_common import iso

    return {"id": key.id, "name": key.name, "prefix": key.prefix, "created_at": iso(key.created_at)}
