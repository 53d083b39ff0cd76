"""The built-in runtime as a real subprocess serving a copy of examples/arith on a free port."""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from runtime.launch import build_start
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
ARITH = ROOT / "examples" / "arith"


@dataclass
class Runtime:
    process: subprocess.Popen
    url: str
    port: int
    log_path: Path
    workdir: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_exit(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)


def start_runtime(workdir: Path, routes: list[dict], log_path: Path) -> Runtime:
    """Start it the way the process backend does: the shell command from build_start with $PORT."""
    port = free_port()
    command = build_start(routes, workdir)
    log = open(log_path, "wb")
    process = subprocess.Popen(command, shell=True, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PORT": str(port)}, start_new_session=True)
    log.close()
    return Runtime(process, f"http://127.0.0.1:{port}", port, log_path, workdir)


def stop_runtime(runtime: Runtime) -> None:
    if runtime.process.poll() is None:
        runtime.process.terminate()
        try:
            runtime.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            runtime.process.kill()
            runtime.process.wait(timeout=10)


def wait_ready(runtime: Runtime, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runtime.process.poll() is not None:
            raise AssertionError(f"runtime exited {runtime.process.returncode}:\n{runtime.log()}")
        try:
            if requests.get(f"{runtime.url}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"runtime not ready after {timeout}s:\n{runtime.log()}")


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("arith") / "work"
    shutil.copytree(ARITH, workdir)
    runtime = start_runtime(workdir, json.loads((ARITH / "routes.json").read_text()), workdir.parent / "instance.log")
    try:
        wait_ready(runtime)
        yield runtime
    finally:
        stop_runtime(runtime)


def test_start_command_and_routes_file(arith):
    assert json.loads((arith.workdir / ".standby" / "routes.json").read_text())[0]["path"] == "/add"
    assert "ready: POST /add" in arith.log()


def test_ping(arith):
    response = requests.get(f"{arith.url}/ping", timeout=5)
    assert response.status_code == 200 and response.json() == {"status": "ready"}


def test_keyword_call(arith):
    response = requests.post(f"{arith.url}/add", json={"a": 2, "b": 40}, timeout=5)
    assert response.status_code == 200 and response.json() == {"sum": 42}


def test_positional_call_in_template_order_with_defaults(arith):
    response = requests.post(f"{arith.url}/scale", json={"label": "twice", "x": 4}, timeout=5)
    assert response.json() == {"label": "twice", "value": 8.0}
    assert requests.post(f"{arith.url}/scale", json={"x": 1.5, "factor": 3}, timeout=5).json() == \
        {"label": "scaled", "value": 4.5}


def test_get_route_reads_the_query_string(arith):
    response = requests.get(f"{arith.url}/square", params={"x": 12}, timeout=5)
    assert response.status_code == 200 and response.json() == 144


def test_every_type_reaches_the_function_coerced(arith):
    body = {"text": "hello", "count": 2, "ratio": 1, "flag": True, "items": [1, "a"], "options": {"k": None},
            "blob": base64.b64encode(b"\x00hi").decode()}
    response = requests.post(f"{arith.url}/describe", json=body, timeout=5)
    assert response.status_code == 200, response.text
    got = response.json()
    assert {name: got[name]["type"] for name in got} == {
        "text": "str", "count": "int", "ratio": "float", "flag": "bool", "items": "list", "options": "dict",
        "blob": "bytes", "mode": "str"}
    assert got["blob"]["value"] == "\x00hi" and got["mode"]["value"] == "fast" and got["ratio"]["value"] == 1.0


def test_bad_body_is_400_with_field_errors_and_function_not_called(arith):
    response = requests.post(f"{arith.url}/add", json={"a": "1", "c": 3}, timeout=5)
    assert response.status_code == 400
    errors = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert set(errors) == {"a", "b", "c"}
    response = requests.post(f"{arith.url}/add", data=b"{oops", timeout=5)
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "body"


def test_unknown_path_404_and_wrong_verb_405(arith):
    assert requests.post(f"{arith.url}/nope", json={}, timeout=5).status_code == 404
    response = requests.post(f"{arith.url}/square", json={"x": 1}, timeout=5)
    assert response.status_code == 405 and response.headers["Allow"] == "GET"


def test_user_exception_is_500_json_with_traceback_in_log(arith):
    response = requests.post(f"{arith.url}/fail", json={"message": "kaput-1234"}, timeout=5)
    assert response.status_code == 500
    assert response.json() == {"error": "kaput-1234", "type": "RuntimeError"}
    log = arith.log()
    assert "Traceback (most recent call last)" in log and 'raise RuntimeError(message)' in log
    assert "RuntimeError: kaput-1234" in log
    assert requests.post(f"{arith.url}/add", json={"a": 1, "b": 1}, timeout=5).json() == {"sum": 2}


def test_bytes_in_and_out(arith):
    payload = bytes(range(256))
    response = requests.post(f"{arith.url}/reverse", json={"data": base64.b64encode(payload).decode()}, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.content == payload[::-1]


def test_generator_is_streamed_chunk_by_chunk(arith, tmp_path):
    """The first chunk arrives while the function is still blocked before producing the rest."""
    release = tmp_path / "release"
    connection = http.client.HTTPConnection("127.0.0.1", arith.port, timeout=10)
    try:
        connection.request("POST", "/count-until-released", body=json.dumps({"n": 3, "release_file": str(release)}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
        assert response.read1() == b"first\n"  # the generator is now waiting for `release`
        release.touch()
        assert response.read() == b"1\n2\n"
    finally:
        connection.close()


def test_generator_of_objects_streams_json_lines(arith):
    response = requests.post(f"{arith.url}/events", json={"n": 3}, timeout=5)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert [json.loads(line) for line in response.text.splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_text_stream(arith):
    response = requests.post(f"{arith.url}/count", json={"n": 3, "delay": 0}, stream=True, timeout=5)
    assert list(response.iter_lines()) == [b"0", b"1", b"2"]


def test_chunked_request_body(arith):
    def body():
        yield b'{"a": 5, '
        yield b'"b": 6}'
    response = requests.post(f"{arith.url}/add", data=body(), headers={"Content-Type": "application/json"}, timeout=5)
    assert response.json() == {"sum": 11}


def test_file_imported_once(arith):
    for _ in range(3):
        requests.post(f"{arith.url}/add", json={"a": 1, "b": 2}, timeout=5)
    assert requests.get(f"{arith.url}/imports", timeout=5).json() == {"imports": 1}


def test_keep_alive_survives_an_error_answer(arith):
    with requests.Session() as session:
        assert session.post(f"{arith.url}/nope", data=b"x" * 1000, timeout=5).status_code == 404
        assert session.post(f"{arith.url}/add", json={"a": 1, "b": 2}, timeout=5).json() == {"sum": 3}


# ---- start failures: non-zero exit with the reason in the instance log ------------------------


def _failing(tmp_path, routes, files: dict[str, str]) -> Runtime:
    workdir = tmp_path / "work"
    workdir.mkdir()
    for name, text in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    runtime = start_runtime(workdir, routes, tmp_path / "instance.log")
    try:
        code = runtime.wait_exit()
    finally:
        stop_runtime(runtime)
    assert code != 0
    return runtime


def test_missing_function_exits_non_zero_with_reason(tmp_path):
    routes = [{"path": "/predict", "file": "model.py", "function": "predict"}]
    runtime = _failing(tmp_path, routes, {"model.py": "def other():\n    return 1\n"})
    assert runtime.process.returncode == 3
    assert "function predict was not found in model.py" in runtime.log()


def test_missing_file_exits_non_zero_with_reason(tmp_path):
    routes = [{"path": "/predict", "file": "models/model.py", "function": "predict"}]
    runtime = _failing(tmp_path, routes, {})
    assert "route file models/model.py was not found" in runtime.log()


def test_import_error_exits_non_zero_with_traceback(tmp_path):
    routes = [{"path": "/predict", "file": "model.py", "function": "predict"}]
    runtime = _failing(tmp_path, routes, {"model.py": "import not_a_module_anywhere\n"})
    log = runtime.log()
    assert "importing model.py failed: ModuleNotFoundError" in log and "not_a_module_anywhere" in log


def test_signature_mismatch_fails_at_start(tmp_path):
    routes = [{"path": "/predict", "file": "model.py", "function": "predict",
               "params": [{"name": "text", "type": "str"}]}]
    runtime = _failing(tmp_path, routes, {"model.py": "def predict(prompt):\n    return prompt\n"})
    assert "cannot be called with the route's keyword parameters (text)" in runtime.log()


def test_ping_is_503_while_loading(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "slow.py").write_text(
        "import os, time\n"
        "while not os.path.exists('loaded'):\n    time.sleep(0.02)\n"
        "def hello():\n    return 'hi'\n")
    runtime = start_runtime(workdir, [{"method": "GET", "path": "/hello", "file": "slow.py", "function": "hello"}],
                            tmp_path / "instance.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = requests.get(f"{runtime.url}/ping", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, runtime.log()
                time.sleep(0.05)
        assert response.status_code == 503
        assert requests.get(f"{runtime.url}/hello", timeout=2).status_code == 503
        (workdir / "loaded").touch()
        wait_ready(runtime)
        assert requests.get(f"{runtime.url}/hello", timeout=2).json() == "hi"
    finally:
        stop_runtime(runtime)
    assert runtime.process.returncode == 0  # SIGTERM after loading is a clean stop
