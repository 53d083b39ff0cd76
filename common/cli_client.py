"""`app.py apply` and `app.py get`: spec files through the running web app's JSON API (README.md
"Spec files"). The web app does all checking and writing; this reads and writes the files and
says what happened, one endpoint at a time."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO
from urllib.parse import quote

import requests

from common.spec_files import SpecFileError, dump_spec, file_spec, read_spec_file

# Long enough for an apply that restarts instances (the web app waits for Temporal, at most 30 s).
TIMEOUT_SECONDS = 120
# A diff line shows at most this much of a value (routes can be long).
SHOWN_CHARACTERS = 120


class Unreachable(Exception):
    """The web app cannot be reached, or what answers is not it; the message says what to do."""


def find_token(settings, env: dict | None = None) -> str | None:
    """The personal token the CLI sends: STANDBY_TOKEN, else the token `app.py up` wrote for its
    first admin (<data dir>/cli-token) when this user can read it; None: none."""
    from common.accounts import TOKEN_FILE

    env = os.environ if env is None else env
    if env.get("STANDBY_TOKEN", "").strip():
        return env["STANDBY_TOKEN"].strip()
    try:
        return (settings.data_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


class WebApp:
    """The JSON API under /api/v1 of a running web app, as the user of `token`."""

    def __init__(self, url: str, token: str | None = None):
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict]:
        if self.token:
            kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": f"Bearer {self.token}"}
        try:
            answer = requests.request(method, f"{self.url}/api/v1{path}", timeout=TIMEOUT_SECONDS, **kwargs)
        except requests.ConnectionError:
            raise Unreachable(f"cannot reach the Standby web app at {self.url}: start it with `./run up` (or "
                              "`python app.py up`), or give its address with --url") from None
        except requests.Timeout:
            raise Unreachable(f"the Standby web app at {self.url} did not answer within {TIMEOUT_SECONDS} s") from None
        try:
            body = answer.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Unreachable(f"{self.url} answered HTTP {answer.status_code}, not as Standby's JSON API; --url "
                              "must name the web app (STANDBY_WEB_PORT, 5000 by default), not the proxy")
        if answer.status_code == 401:
            raise Unreachable(f"the web app at {self.url} wants a personal token: {body.get('error')}; set "
                              "STANDBY_TOKEN (make one on your account page), or run this where `app.py up` "
                              "wrote <data dir>/cli-token")
        return answer.status_code, body


def cmd_apply(paths: list[str], url: str, dry_run: bool, restart: bool, out: TextIO = sys.stdout,
              token: str | None = None, project: str | None = None, strategy: str | None = None) -> int:
    """Apply every spec of every file, in order; 1 when a file cannot be read (then nothing is
    applied) or any spec is refused, else 0."""
    try:
        specs = [spec for path in paths
                 for spec in read_spec_file(path, sys.stdin.read() if path == "-" else None)]
    except SpecFileError as exc:
        print(f"standby: {exc}", file=sys.stderr)
        return 1
    web, query = WebApp(url, token), {"dry_run": "true"} if dry_run else {}
    if restart:
        query["restart"] = "true"
    if project:
        query["project"] = project
    if strategy:  # how a change to what runs rolls out (README.md "Revisions and updates")
        query["strategy"] = strategy
    refused = 0
    for position, spec in enumerate(specs, start=1):
        try:
            status, answer = web.call("POST", "/apply", json=spec, params=query)
        except Unreachable as exc:
            print(f"standby: {exc}", file=sys.stderr)
            return 1
        name = spec.get("name") if isinstance(spec.get("name"), str) else f"#{position} (no name)"
        print("\n".join(describe(name, status, answer)), file=out, flush=True)
        if status >= 300:
            refused += 1
    if refused:
        print(f"standby: {refused} of {len(specs)} specs refused or failed", file=sys.stderr)
    return 1 if refused else 0


def cmd_get(name: str, output: str, url: str, out: TextIO = sys.stdout, token: str | None = None) -> int:
    """Write an endpoint's spec as a file would hold it."""
    try:
        status, answer = WebApp(url, token).call("GET", f"/endpoints/{quote(name, safe='')}")
    except Unreachable as exc:
        print(f"standby: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"standby: {answer.get('error') or f'HTTP {status}'}", file=sys.stderr)
        return 1
    out.write(dump_spec(file_spec(answer), output))
    return 0


def cmd_scale(name: str, count: int, url: str, out: TextIO = sys.stdout, token: str | None = None) -> int:
    """Set an endpoint's number of instances (README.md "Revisions and updates", manual scale)."""
    try:
        status, answer = WebApp(url, token).call("POST", f"/endpoints/{quote(name, safe='')}/scale",
                                          json={"instance_count": count})
    except Unreachable as exc:
        print(f"standby: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"standby: {answer.get('error') or f'HTTP {status}'}", file=sys.stderr)
        return 1
    print(f"endpoint {name}: " + (f"{count} instance(s)" if count else "automatic scaling"), file=out)
    return 0


# ---- what an apply did, for people ----

_WOULD = {"created": "would be created", "updated": "would be updated", "refused": "would be refused"}


def describe(name: str, status: int, answer: dict) -> list[str]:
    """Lines saying what /apply did with one spec: the outcome, then each change as
    `field  edit-class  from -> to`, then what went wrong and what to do."""
    action = answer.get("action") or "refused"
    dry_run = bool(answer.get("dry_run"))
    head = f"endpoint {name}: {_WOULD.get(action, action) if dry_run else action}"
    if dry_run:
        head += " (dry run: nothing changed)"
    elif answer.get("restarted"):
        head += "; its running instances restart"
    lines = [head]
    changes = answer.get("changes") or []
    width = max((len(str(change.get("field"))) for change in changes), default=0)
    for change in changes:
        field = change.get("field", "")
        shown = _shown(field, change.get("to"))
        if action != "created":
            shown = f"{_shown(field, change.get('from'))} -> {shown}"
        lines.append(f"  {field:<{width}}  {change.get('edit', ''):<9}  {shown}")
    if answer.get("restart_required"):
        fields = answer["restart_required"]
        lines.append(f"  not saved: {', '.join(fields)} {'needs' if len(fields) == 1 else 'need'} a restart of the "
                     "running instances; apply with --restart to save and restart them")
    elif status >= 300:
        errors = answer.get("errors") or {}
        lines += [f"  error: {message}" for message in errors.values()] or [f"  error: {answer.get('error')}"]
    return lines


def _shown(field: str, value: Any) -> str:
    if field == "env" and value:
        # KEY=value; a secret's value is never shown (the API masks it).
        text = ", ".join(f"{item['key']}=(secret)" if item.get("secret") else f"{item['key']}={item.get('value')}"
                         for item in value)
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS - 3] + "..."
