"""Request headers for the instance: the client's minus hop-by-hop ones, plus X-Forwarded-*."""
from __future__ import annotations

from proxy.forward import HOP_BY_HOP, connection_tokens

# Headers only the proxy reads; the instance never sees them.
PROXY_ONLY = frozenset({"deploy-route-rule"})


def _header_name(environ_key: str) -> str:
    return environ_key[5:].replace("_", "-").title()


def forward_headers(environ: dict, request_id: str, strip_authorization: bool, upgrade: bool = False) -> dict[str, str]:
    """`upgrade`: a WebSocket handshake, whose `Upgrade` and `Connection: Upgrade` go on."""
    drop = HOP_BY_HOP | PROXY_ONLY | connection_tokens(environ.get("HTTP_CONNECTION"))
    if strip_authorization:
        drop = drop | {"authorization"}
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = _header_name(key)
            if name.lower() not in drop:
                headers[name] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["Content-Type"] = content_type
    client = environ.get("REMOTE_ADDR", "")
    prior = environ.get("HTTP_X_FORWARDED_FOR")
    headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
    headers["X-Forwarded-Proto"] = environ.get("HTTP_X_FORWARDED_PROTO") or environ.get("wsgi.url_scheme", "http")
    headers["X-Forwarded-Host"] = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
    headers["X-Request-Id"] = request_id
    # Host names the instance; the client's stays in X-Forwarded-Host.
    headers.pop("Host", None)
    if upgrade:
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = environ.get("HTTP_UPGRADE", "websocket")
    return headers


def wants_event_stream(environ: dict) -> bool:
    return "text/event-stream" in environ.get("HTTP_ACCEPT", "")


def cookie_value(environ: dict, name: str) -> str | None:
    raw = environ.get("HTTP_COOKIE")
    if not raw:
        return None
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip().strip('"') or None
    return None
