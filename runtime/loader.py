"""Import the model's route files once and find each route's function, or say exactly why not."""
from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from common.routes import call_style, is_required, route_method


class LoadError(Exception):
    """Why the runtime cannot serve; printed to the instance log before exiting non-zero."""


@dataclass
class LoadedRoute:
    route: dict
    function: Callable


def _module_name(relative: str) -> str:
    dotted = relative[: -len(".py")].replace("/", ".")
    # A file named like a module that is already imported (json.py, common/...) must not replace
    # it for the whole process: give it a private name instead.
    if dotted in sys.modules or dotted.split(".")[0] in sys.modules:
        return "_standby_route_" + dotted.replace(".", "_")
    return dotted


def _import_file(source_dir: Path, relative: str) -> ModuleType:
    path = (source_dir / relative).resolve()
    if source_dir not in path.parents:
        raise LoadError(f"route file {relative} is outside the source directory")
    if not path.is_file():
        raise LoadError(f"route file {relative} was not found in the source ({source_dir})")
    name = _module_name(relative)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"route file {relative} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so dataclasses, pickling and self-imports see the module.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        detail = "".join(traceback.format_exception(exc))
        raise LoadError(f"importing {relative} failed: {type(exc).__name__}: {exc}\n{detail}") from None
    return module


def _check_signature(route: dict, function: Callable) -> None:
    """Fail at start, not on the first request, when the template cannot call the function."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # builtins without a signature: the first call will tell
    params = route.get("params") or []
    label = f"{route_method(route)} {route.get('path')} -> {route.get('file')}:{route.get('function')}"
    try:
        if call_style(route) == "positional":
            signature.bind(*[None] * len(params))
        else:
            signature.bind(**{p["name"]: None for p in params if is_required(p)})
            signature.bind(**{p["name"]: None for p in params})
    except TypeError as exc:
        names = ", ".join(p["name"] for p in params) or "no arguments"
        raise LoadError(f"{label}: the function{signature} cannot be called with the route's "
                        f"{call_style(route)} parameters ({names}): {exc}") from None


def load_routes(routes: list[dict], source_dir: Path) -> list[LoadedRoute]:
    """Import each route file once (in template order) and resolve every function."""
    source_dir = source_dir.resolve()
    if str(source_dir) not in sys.path:
        sys.path.insert(0, str(source_dir))  # the model's own modules import each other
    modules: dict[str, ModuleType] = {}
    loaded = []
    for route in routes:
        relative = route["file"]
        if relative not in modules:
            modules[relative] = _import_file(source_dir, relative)
        function = getattr(modules[relative], route["function"], None)
        if function is None:
            raise LoadError(f"function {route['function']} was not found in {relative} "
                            f"(route {route_method(route)} {route['path']})")
        if not callable(function):
            raise LoadError(f"{route['function']} in {relative} is not a function")
        _check_signature(route, function)
        loaded.append(LoadedRoute(route=route, function=function))
    return loaded
