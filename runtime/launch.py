"""How the worker starts the built-in runtime for a "routes" endpoint instance."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from common.routes import normalize_routes, validate_routes

# Inside the instance's workdir; a dot-folder so it does not clash with the model's own files.
ROUTES_FILE = Path(".standby") / "routes.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def write_routes_file(routes: list[dict], workdir: str | Path) -> Path:
    errors = validate_routes(routes)
    if errors:
        raise ValueError("invalid routes: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    path = Path(workdir) / ROUTES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(normalize_routes(routes), indent=2))
    return path


def build_start(routes: list[dict], workdir: str | Path, python: str = sys.executable) -> str:
    """Write `<workdir>/.standby/routes.json` and return the shell start command for the process
    backend (which substitutes `$PORT`).

    `cd` to the project root so `-m runtime.server` resolves without setting PYTHONPATH, which
    would leak into the model's own subprocesses; the runtime then changes into the workdir and
    puts it first on sys.path. `exec` keeps the backend's pid the runtime's pid.
    """
    routes_file = write_routes_file(routes, workdir)
    workdir = Path(workdir).resolve()
    return (f"cd {shlex.quote(str(PROJECT_ROOT))} && exec {shlex.quote(python)} -m runtime.server"
            f" --source-dir {shlex.quote(str(workdir))}"
            f" --routes-file {shlex.quote(str(routes_file.resolve()))} --port $PORT")
