"""Checks every request passes before a view runs: the Host it names, the length of its URL, and,
for state-changing JSON API calls, that it is not a cross-site request a browser was tricked into.

A page on any site can make a visitor's browser POST a form (`application/x-www-form-urlencoded`,
`multipart/form-data`, `text/plain`) or a `fetch(..., {mode: "no-cors"})` without a body to any
URL, and the browser sends it without asking our server first. The JSON API acts on what it is
sent (stop, terminate, create keys), it takes the UI's session cookie as well as tokens (the
pages poll it; webapp/auth.py; the cookie is `SameSite=Lax`, so browsers leave it off another
site's POSTs anyway), and Standby listens on loopback where such a page can reach it. So a
mutating API request must

- carry no body, or a JSON body (`Content-Type: application/json`, which a cross-site page can
  only send after a CORS preflight that we never approve), or multipart where a view accepts an
  upload (`allows_upload`); and
- come from our own origin when a browser says where it comes from (`Origin`, `Sec-Fetch-Site`).
  curl and scripts send neither header and keep working.

The UI's forms are protected by their CSRF tokens (Flask-WTF) instead.
"""
from __future__ import annotations

import re
from typing import Callable
from urllib.parse import urlsplit

from flask import Flask, current_app, request

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# gunicorn's default request-line limit is 4094 bytes; the app answers the same limit with a JSON
# 414 when gunicorn is not in front (tests, `flask run`) or is configured with a larger one.
MAX_URL_LENGTH = 4094
# What a browser sets on a request from a page of our own origin, or one the user typed.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?$")


def allows_upload(view: Callable) -> Callable:
    """Mark an API view that takes `multipart/form-data` (a file upload) besides JSON."""
    view.allows_upload = True
    return view


def _split_host(value: str) -> tuple[str, str] | None:
    """('name', 'port') of a Host header or an Origin's netloc, lower-cased; None if malformed."""
    match = _HOST_RE.match(value or "")
    if not match:
        return None
    return match.group(1).lower(), match.group(2) or ""


def host_allowed(host_header: str, allowed: tuple[str, ...]) -> bool:
    """Whether `host_header` names one of `allowed`: exact names (any port), `.example.com` for a
    domain and its subdomains, `*` for any host. `[::1]` and `::1` are the same entry."""
    if "*" in allowed:
        return True
    parsed = _split_host(host_header)
    if parsed is None:
        return False
    name = parsed[0]
    for entry in allowed:
        entry = entry.strip().lower()
        if entry.startswith("."):
            if name == entry[1:] or name.endswith(entry):
                return True
            continue
        if ":" in entry and not entry.startswith("["):
            entry = f"[{entry}]"  # a bare IPv6 address
        if name == entry:
            return True
    return False


def _origin_is_ours(origin: str, host_header: str) -> bool:
    """Whether a browser's `Origin` names the host and port this request was sent to."""
    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
        return False  # includes "null" (sandboxed frames, file: pages, some redirects)
    theirs, ours = _split_host(parts.netloc), _split_host(host_header)
    if theirs is None or ours is None:
        return False
    if theirs[0] != ours[0]:
        return False
    if not ours[1]:
        # A Host without a port was sent to the scheme's default port; behind a TLS-terminating
        # proxy our scheme may differ from the Origin's (http inside, https outside).
        return not theirs[1] or theirs[1] == _DEFAULT_PORTS[parts.scheme]
    return (theirs[1] or _DEFAULT_PORTS[parts.scheme]) == ours[1]


def cross_site_refusal() -> str | None:
    """Why this mutating API request is refused as cross-site, or None when it may act."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.lower() not in _OWN_FETCH_SITES:
        return (f"cross-site request refused (Sec-Fetch-Site: {fetch_site}); the API acts only on "
                "requests from its own pages or from clients such as curl and scripts")
    origin = request.headers.get("Origin")
    if origin is not None and not _origin_is_ours(origin, request.headers.get("Host", "")):
        return (f"cross-origin request refused (Origin: {origin[:100]}); the API acts only on "
                "requests from its own origin or from clients such as curl and scripts")
    return None


def _has_body() -> bool:
    return bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def content_type_refusal(view: Callable | None) -> str | None:
    """Why the body of this mutating API request is refused, or None."""
    mimetype = request.mimetype
    if mimetype == "application/json":
        return None
    if mimetype == "multipart/form-data" and getattr(view, "allows_upload", False):
        return None
    if not mimetype and not _has_body():
        return None  # e.g. `curl -X POST .../stop`: nothing to interpret
    accepted = "application/json or multipart/form-data" if getattr(view, "allows_upload", False) else "application/json"
    shown = request.headers.get("Content-Type") or "none"
    return f"send the body as {accepted}; got Content-Type {shown[:100]}"


def install(app: Flask, json_error: Callable[[int, str], object]) -> None:
    """Register the checks on `app`; `json_error(status, message)` builds the API's error answer."""

    @app.before_request
    def _guard():
        settings = current_app.extensions["standby_settings"]
        api = request.path.startswith("/api/")
        if not host_allowed(request.headers.get("Host", ""), settings.allowed_hosts):
            message = (f"host {request.headers.get('Host', '')[:100]!r} is not served here; "
                       "add it to STANDBY_ALLOWED_HOSTS")
            return json_error(400, message) if api else (message, 400, {"Content-Type": "text/plain; charset=utf-8"})
        if len(request.full_path) > MAX_URL_LENGTH:
            message = f"the URL is longer than {MAX_URL_LENGTH} characters; send large values in a JSON body"
            return json_error(414, message) if api else (message, 414, {"Content-Type": "text/plain; charset=utf-8"})
        if not api or request.method not in MUTATING_METHODS:
            return None
        if request.routing_exception is not None:
            return None  # no such path or method: its 404 / 405 says more than a check of the body
        refusal = cross_site_refusal()
        if refusal:
            return json_error(403, refusal)
        view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
        refusal = content_type_refusal(view)
        if refusal:
            return json_error(415, refusal)
        return None
