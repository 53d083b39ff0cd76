"""Start the proxy under gunicorn (`python app.py proxy`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from common.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def gunicorn_argv(settings: Settings | None = None) -> list[str]:
    """The command line; bind address and worker count come from the environment via the config."""
    return [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "proxy" / "gunicorn_conf.py"), "proxy.app:application"]


def run(settings: Settings | None = None) -> None:
    """Replace this process with gunicorn (it handles signals and workers itself)."""
    os.chdir(ROOT)
    argv = gunicorn_argv(settings)
    os.execv(argv[0], argv)
