"""Endpoint API keys on the proxy: `Authorization: Bearer <key>`, compared by SHA-256 hash.

Keys are stored hashed (sha256 hex of the full key, `ApiKey.key_hash`); the routing view holds
the active hashes per endpoint, so checking a key costs one hash and one set lookup.
"""
from __future__ import annotations

import hashlib

from proxy.routing_view import EndpointView


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_key(view: EndpointView, authorization: str | None) -> tuple[bool, bool]:
    """(allowed, strip_header): strip the header when it carried this endpoint's key."""
    if not view.key_hashes:
        return True, False
    token = bearer_token(authorization)
    if token is None or hash_key(token) not in view.key_hashes:
        return False, False
    return True, True
