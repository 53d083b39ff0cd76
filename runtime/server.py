"""Standby's built-in runtime: serves a model's route functions over HTTP.

    python -m runtime.server --source-dir WORKDIR --routes-file WORKDIR/.standby/routes.json --port $PORT

It binds at once and answers `GET /ping` with 503 while it imports the route files, 200 once
every function was found. If a file or function is missing or an import fails, the reason goes
to stderr (the instance log) and the process exits with status 3, so the lifecycle marks the
instance failed with that reason. Requests are checked with `common.routes.check_request`
(the proxy already did; this is defence in depth), then the function is called:
- a JSON-serialisable result -> 200 application/json;
- bytes -> application/octet-stream;
- a generator -> a chunked response, one chunk per yielded item as soon as it is produced
  (str/bytes as is, anything else as a JSON line);
- an exception -> 500 {"error", "type"} with the traceback in the instance log.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import os
import signal
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common.routes import RUNTIME_HEALTH_PATH, check_request, normalize_routes, route_method, validate_routes
from runtime.loader import LoadedRoute, LoadError, load_routes

EXIT_BAD_TEMPLATE = 2
EXIT_LOAD_FAILED = 3
HEALTH_PATH = RUNTIME_HEALTH_PATH
_EMPTY = object()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _json_default(value):
    """Results from numeric libraries (numpy arrays and scalars, torch tensors) become lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value) -> bytes:
    return json.dumps(value, default=_json_default).encode()


class RuntimeState:
    """What the handler threads share: the routes, and whether loading finished."""

    def __init__(self, routes: list[dict], max_body_bytes: int):
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.functions: dict[tuple[str, str], LoadedRoute] = {}
        self.ready = threading.Event()

    def set_loaded(self, loaded: list[LoadedRoute]) -> None:
        self.functions = {(route_method(item.route), item.route["path"]): item for item in loaded}
        self.ready.set()


class _BodyTooLarge(Exception):
    pass


class RuntimeHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 for keep-alive and chunked streaming of generator results.
    protocol_version = "HTTP/1.1"
    server_version = "StandbyRuntime/1"
    state: RuntimeState  # set on the subclass built by make_server

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        if not self.path.startswith(HEALTH_PATH):  # health checks every few seconds are noise
            _log(f"{self.address_string()} {format % args}")

    # -- request and response plumbing --------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.state.max_body_bytes:
            raise _BodyTooLarge()
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > self.state.max_body_bytes:
                raise _BodyTooLarge()
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, value, headers: list[tuple[str, str]] = ()) -> None:
        self._send(status, to_json(value), headers=headers)

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    # -- dispatch -----------------------------------------------------------------------------

    def _handle(self) -> None:
        try:
            body = self._read_body()
        except _BodyTooLarge:
            self.close_connection = True
            self._send_json(413, {"code": 413, "msg": f"the body is larger than {self.state.max_body_bytes} bytes"})
            return
        except ValueError:
            self.close_connection = True
            self._send_json(400, {"code": 400, "msg": "malformed chunked body"})
            return
        path = self.path.split("?", 1)[0]
        if path == HEALTH_PATH and self.command in ("GET", "HEAD"):
            if self.state.ready.is_set():
                self._send_json(200, {"status": "ready"})
            else:
                self._send_json(503, {"status": "loading"}, headers=[("Retry-After", "1")])
            return
        if not self.state.ready.is_set():
            self._send_json(503, {"code": 503, "msg": "the model is still loading"}, headers=[("Retry-After", "1")])
            return
        check = check_request(self.state.routes, self.command, self.path, body, self.headers.get("Content-Type"))
        if not check.ok:
            self._send_json(check.status, check.error_body(), headers=check.error_headers())
            return
        loaded = self.state.functions[(route_method(check.route), check.route["path"])]
        args, kwargs = check.call_arguments()
        try:
            result = loaded.function(*args, **kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result))
        except Exception as exc:
            self._user_error(loaded, exc)
            return
        if inspect.isgenerator(result):
            self._stream(loaded, result)
        elif isinstance(result, (bytes, bytearray, memoryview)):
            self._send(200, bytes(result), "application/octet-stream")
        else:
            try:
                payload = to_json(result)
            except (TypeError, ValueError) as exc:
                self._user_error(loaded, TypeError(f"the result of {loaded.route['function']} cannot be sent as JSON: {exc}"))
                return
            self._send(200, payload)

    def _user_error(self, loaded: LoadedRoute, exc: BaseException) -> None:
        route = loaded.route
        _log(f"error in {route['file']}:{route['function']} ({route_method(route)} {route['path']}):\n"
             + "".join(traceback.format_exception(exc)).rstrip())
        self._send_json(500, {"error": str(exc) or type(exc).__name__, "type": type(exc).__name__})

    def _stream(self, loaded: LoadedRoute, generator) -> None:
        """Send each yielded item as its own chunk the moment the generator produces it."""
        try:
            first = next(generator, _EMPTY)
        except Exception as exc:
            self._user_error(loaded, exc)
            return
        if isinstance(first, str):
            content_type = "text/plain; charset=utf-8"
        elif isinstance(first, (bytes, bytearray)):
            content_type = "application/octet-stream"
        else:
            content_type = "application/x-ndjson"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            if first is not _EMPTY:
                self._write_chunk(_encode_item(first))
            for item in generator:
                self._write_chunk(_encode_item(item))
        except (BrokenPipeError, ConnectionResetError):
            generator.close()  # the client went away: stop the work it asked for
            self.close_connection = True
            return
        except Exception as exc:
            # Headers are gone already: log it and cut the stream without its final chunk, so
            # the client sees a broken response rather than a silently short one.
            route = loaded.route
            _log(f"error while streaming {route['file']}:{route['function']}:\n"
                 + "".join(traceback.format_exception(exc)).rstrip())
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET


async def _await(awaitable):
    return await awaitable


def _encode_item(item) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    return to_json(item) + b"\n"


def make_server(state: RuntimeState, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundRuntimeHandler", (RuntimeHandler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def read_routes(routes_file: Path) -> list[dict]:
    try:
        routes = json.loads(routes_file.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read the routes file {routes_file}: {exc}") from None
    errors = validate_routes(routes)
    if errors:
        raise LoadError("the routes template is invalid:\n" + "\n".join(f"  {k}: {v}" for k, v in errors.items()))
    return normalize_routes(routes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.server", description=__doc__.splitlines()[0])
    parser.add_argument("--routes-file", required=True, type=Path)
    parser.add_argument("--source-dir", type=Path, default=Path.cwd())
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8080))
    parser.add_argument("--host", default=os.environ.get("STANDBY_RUNTIME_HOST") or "127.0.0.1")
    parser.add_argument("--max-body-bytes", type=int, default=1024**3)
    options = parser.parse_args(argv)

    try:
        routes = read_routes(options.routes_file)
    except LoadError as exc:
        _log(f"standby runtime: {exc}")
        return EXIT_BAD_TEMPLATE
    source_dir = options.source_dir.resolve()
    os.chdir(source_dir)  # user code opens its own files by relative path
    state = RuntimeState(routes, options.max_body_bytes)
    server = make_server(state, options.host, options.port)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    _log(f"standby runtime: listening on {options.host}:{options.port}, loading {len(routes)} route(s) from {source_dir}")

    try:
        # Imported in the main thread: some libraries insist on it (signals, CUDA init).
        state.set_loaded(load_routes(routes, source_dir))
    except LoadError as exc:
        _log(f"standby runtime: cannot start: {exc}")
        server.shutdown()
        server.server_close()
        return EXIT_LOAD_FAILED
    # Until now SIGTERM kills a slow import outright; from here on it stops serving cleanly.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    _log("standby runtime: ready: " + ", ".join(f"{route_method(r)} {r['path']}" for r in routes))
    stop.wait()
    _log("standby runtime: stopping")
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
