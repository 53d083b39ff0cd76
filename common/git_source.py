"""The one validation of git URLs and refs for model code: the model registry, the endpoint API and
form (webapp/spec.py, webapp/forms.py) and the worker's clone (workers/sources.py) all call it.

Allowed: `https://host/path`, `ssh://[user@]host[:port]/path` and scp-style `user@host:path`;
`file://` URLs and absolute local paths only where settings allow them (`STANDBY_ALLOW_FILE_GIT`,
off by default: a registered local path would let any user read any repository on the worker's
disk). Refused with a message saying what to use instead: transport helpers (`ext::`, `fd::`,
which run commands or read descriptors), `http://` and `git://` (unauthenticated, so a network
attacker chooses the code that runs), and anything git could read as an option (a leading `-`).
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
MAX_REF_LENGTH = 255
# `<transport>::<address>` makes git run `git-remote-<transport>` (ext:: runs any command).
_HELPER_RE = re.compile(r"^[A-Za-z0-9+.-]+::")
_SCP_LIKE_RE = re.compile(r"^[A-Za-z0-9._-]+@([A-Za-z0-9.-]+):([^\s]+)$")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)$")
_BAD_REF_RE = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{|//")


def allowed_protocols(allow_file: bool) -> str:
    """The value of GIT_ALLOW_PROTOCOL for a clone: git itself then refuses every other transport,
    for the URL and for submodules and redirects alike."""
    return "https:ssh:file" if allow_file else "https:ssh"


def _what_to_use(allow_file: bool) -> str:
    local = ("file:// URL or an absolute local path" if allow_file
             else "file:// or a local path only where STANDBY_ALLOW_FILE_GIT=1 is set on the web app and worker")
    return f"use an https:// or ssh:// URL or user@host:path (a {local})"


def _host_error(host: str | None) -> str | None:
    if not host or host.startswith("-") or not _HOST_RE.match(host):
        return "the URL needs a host name such as github.com (not starting with '-')"
    return None


def git_url_error(url: str, allow_file: bool = False) -> str | None:
    """Why `url` may not be cloned, or None when it may."""
    if not url:
        return "give the repository URL, e.g. https://github.com/org/model.git"
    if len(url) > MAX_URL_LENGTH:
        return f"the URL must be at most {MAX_URL_LENGTH} characters"
    if url.startswith("-") or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "the URL must not start with '-' or contain spaces or control characters"
    if _HELPER_RE.match(url):
        return f"transport helpers such as ext:: and fd:: are not allowed; {_what_to_use(allow_file)}"
    lowered = url.lower()
    if lowered.startswith(("https://", "ssh://")):
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            return f"the URL is malformed; {_what_to_use(allow_file)}"
        if host is not None and parts.netloc.rsplit("@", 1)[-1].startswith("["):
            host = f"[{host}]"
        return _host_error(host)
    if lowered.startswith("file://") or url.startswith("/"):
        if not allow_file:
            return f"local repositories are not allowed here; {_what_to_use(allow_file)}"
        return None if url.startswith("/") or url[len("file://"):].startswith("/") else \
            "a file:// URL needs an absolute path, e.g. file:///srv/model.git"
    scp = _SCP_LIKE_RE.match(url)
    if scp:
        return _host_error(scp.group(1))
    return _what_to_use(allow_file)


def git_ref_error(ref: str) -> str | None:
    """Why `ref` is not a branch, tag or commit git may be given, or None."""
    if not ref:
        return "give a branch, tag or commit, e.g. main"
    if (len(ref) > MAX_REF_LENGTH or ref.startswith(("-", "/")) or ref.endswith(("/", ".", ".lock"))
            or _BAD_REF_RE.search(ref)):
        return ("not a valid git ref: use a branch, tag or commit hash without a leading '-', spaces, "
                "control characters, '..' or ~^:?*[")
    return None
