"""Request headers for the instance: the client's minus hop-by-hop ones, plus X-Forwarded-*."""
from __future__ import annotations

from proxy.forward import HOP_BY_HOP, connection_tokens

# Headers only the proxy reads; the instance never sees them.
PROXY_ONLY = frozenset({"deploy-route-rule"})


def _header_name(environ_key: str) -> str:
    return environ_key[5:].replace("_", "-").title()


# Never passed on as the client sent them: hop-by-hop, the proxy's own, and what the proxy sets.
_DROPPED = HOP_BY_HOP | PROXY_ONLY | frozenset({"host", "content-length", "x-forwarded-for", "x-forwarded-proto",
                                                "x-forwarded-host", "x-request-id"})
_PLAIN_CONNECTION = frozenset({"", "keep-alive", "close", "upgrade"})


def client_headers(environ: dict) -> list[tuple[str, str]]:
    """The request's headers as the client sent them: the server's list (proxy/http1.py keeps
    it), else rebuilt from the environ (any other WSGI server)."""
    raw = environ.get("standby.headers")
    if raw is not None:
        return raw
    headers = [(_header_name(key), value) for key, value in environ.items() if key.startswith("HTTP_")]
    if environ.get("CONTENT_TYPE"):
        headers.append(("Content-Type", environ["CONTENT_TYPE"]))
    return headers


def forward_headers(environ: dict, request_id: str, strip_authorization: bool,
                    upgrade: bool = False) -> list[tuple[str, str]]:
    """The request headers for the instance: the client's, in its order and spelling, minus
    hop-by-hop ones (and those its `Connection` names), plus X-Forwarded-* and X-Request-Id.
    `upgrade`: a WebSocket handshake, whose `Upgrade` and `Connection: Upgrade` go on."""
    drop = _DROPPED
    connection = environ.get("HTTP_CONNECTION")
    if connection and connection.lower() not in _PLAIN_CONNECTION:
        drop = drop | connection_tokens(connection)
    if strip_authorization:
        drop = drop | {"authorization"}
    headers = [(name, value) for name, value in client_headers(environ) if name.lower() not in drop]
    client = environ.get("REMOTE_ADDR", "")
    prior = environ.get("HTTP_X_FORWARDED_FOR")
    headers.append(("X-Forwarded-For", f"{prior}, {client}" if prior else client))
    headers.append(("X-Forwarded-Proto",
                    environ.get("HTTP_X_FORWARDED_PROTO") or environ.get("wsgi.url_scheme", "http")))
    # Host names the instance; the client's stays in X-Forwarded-Host.
    headers.append(("X-Forwarded-Host", environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")))
    headers.append(("X-Request-Id", request_id))
    if upgrade:
        headers.append(("Connection", "Upgrade"))
        headers.append(("Upgrade", environ.get("HTTP_UPGRADE", "websocket")))
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
