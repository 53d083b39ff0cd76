"""Spec files (README.md "Spec files"): reading YAML and JSON specs with messages that say where and
what to change, and writing an endpoint back so that reading it gives the same spec."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.spec_fields import SPEC
from common.spec_files import SpecFileError, dump_spec, file_spec, read_spec_file, read_specs
from tests.conftest import ROOT


# ---------------------------------------------------------------- reading
def test_one_spec_a_list_and_several_documents_are_read_in_order():
    text = "name: a\nport: 9000\n---\n- name: b\n- name: c\n---\n"
    assert read_specs(text, "x.yaml") == [{"name": "a", "port": 9000}, {"name": "b"}, {"name": "c"}]


def test_a_json_file_is_read_as_strict_json():
    assert read_specs('[{"name": "a"}, {"name": "b"}]', "x.json", as_json=True) == [{"name": "a"}, {"name": "b"}]
    with pytest.raises(SpecFileError, match=r"^x.json: NaN is not a JSON number"):
        read_specs('{"name": "a", "cpu_cores": NaN}', "x.json", as_json=True)
    with pytest.raises(SpecFileError, match=r"^x.json: line 1, column 14: Expecting .* \(not valid JSON\)"):
        read_specs('{"name": "a",}', "x.json", as_json=True)


@pytest.mark.parametrize("text, message", [
    ("name: [a\n", r"^x.yaml: line 2, column 1: while parsing a flow sequence, expected ',' or '\]'"),
    ("name: a\n  port: 1\n", r"^x.yaml: line 2, column 7: mapping values are not allowed here \(not valid YAML\)"),
    ("name: a\nport: 1\nname: b\n", r"^x.yaml: line 3, column 1: while reading a mapping, 'name' is given twice"),
    ("name: a\ncpu_cores: .nan\n", r"^x.yaml: cpu_cores is NaN or Infinity; write a finite number$"),
    ("name: a\nroutes:\n- params:\n  - default: -.inf\n", r"^x.yaml: routes\[0\].params\[0\].default is NaN or Inf"),
    ("name: a\ndescription: 2024-01-01\n", r"^x.yaml: description is read as a date \(2024-01-01\); quote it"),
    ("name: a\n1: x\n", r"^x.yaml: the spec has the key 1, which is not text; quote it$"),
    ("- name: a\n- 7\n", r"^x.yaml \(item 2\): a spec is a mapping of fields .*, not a number$"),
    ("name: a\n---\njust text\n", r"^x.yaml \(document 2\): a spec is a mapping of fields .*, not text$"),
    ("", r"^x.yaml: holds no endpoint spec"),
    ("---\n---\n", r"^x.yaml: holds no endpoint spec"),
    ("name: " + "[" * 40 + "]" * 40 + "\n", r"^x.yaml: the JSON nests deeper than 32 levels"),
])
def test_a_bad_file_is_refused_saying_where_and_what_to_change(text, message):
    with pytest.raises(SpecFileError, match=message):
        read_specs(text, "x.yaml")


def test_a_merge_key_may_be_overridden():
    text = "base: &base {port: 1}\n---\n<<: {name: a, port: 2}\nport: 3\n"
    assert read_specs(text, "x.yaml")[1] == {"name": "a", "port": 3}


def test_a_relative_source_dir_is_relative_to_the_file(tmp_path):
    (tmp_path / "model").mkdir()
    path = tmp_path / "spec.yaml"
    path.write_text("name: a\nsource_dir: model\n---\nname: b\nsource_dir: /srv/m\n")
    assert [s["source_dir"] for s in read_spec_file(str(path))] == [str(tmp_path / "model"), "/srv/m"]


def test_a_missing_or_undecodable_file_is_named(tmp_path):
    with pytest.raises(SpecFileError, match=r"nope.yaml: no such file$"):
        read_spec_file(str(tmp_path / "nope.yaml"))
    (tmp_path / "latin.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecFileError, match=r"latin.yaml: is not UTF-8 text"):
        read_spec_file(str(tmp_path / "latin.yaml"))


def test_standard_input_is_read_as_yaml():
    assert read_spec_file("-", stdin_text='{"name": "a"}') == [{"name": "a"}]


# ---------------------------------------------------------------- writing
ENDPOINT_ANSWER = {  # as GET /api/v1/endpoints/<name> answers (webapp/views_common.py endpoint_json)
    "name": "tts", "description": "Speech\nin two lines", "environment": "production", "source_kind": "server",
    "start_command": "python serve.py --port 8080", "image": "", "port": 8080, "source_dir": "",
    "env": [{"key": "MODE", "value": "fast", "secret": False}, {"key": "TOKEN", "value": None, "secret": True}],
    "model_version_id": None, "git_url": "", "git_ref": "", "routes": [], "gpu_type": "T4", "gpu_count": 1,
    "cpu_cores": 2.0, "memory_gb": 1.5, "disk_gb": 10, "min_instances": 0, "max_instances": 2,
    "idle_retention_seconds": 600, "startup_timeout_seconds": 1200, "health_path": "/health",
    "health_interval_seconds": 10, "balancing": "round_robin", "max_concurrency": 0, "hold_queue_size": 100,
    "sticky_sessions": False,
    "status": "running", "status_reason": "", "url": "http://127.0.0.1:8000/e/tts/", "instances": [{"id": "x"}],
    "created_at": "2024-01-01T00:00:00+00:00", "usage": {"gpu_seconds": 3.0},
}


def test_a_file_holds_the_spec_fields_only_and_no_secret_value():
    spec = file_spec(ENDPOINT_ANSWER)
    assert list(spec) == [f.name for f in SPEC if f.only_for != "routes"]
    assert spec["env"] == [{"key": "MODE", "value": "fast"}, {"key": "TOKEN", "secret": True}]
    assert "status" not in spec and "instances" not in spec and "url" not in spec


def test_the_fields_of_the_other_kind_of_source_are_left_out_only_at_their_default():
    routes = {**ENDPOINT_ANSWER, "source_kind": "routes", "start_command": "", "model_version_id": 3,
              "routes": [{"method": "GET", "path": "/info", "file": "m.py", "function": "info"}]}
    spec = file_spec(routes)
    assert not {"start_command", "image", "port", "source_dir"} & set(spec)
    assert spec["model_version_id"] == 3 and spec["git_url"] == "" and spec["routes"] == routes["routes"]
    assert file_spec({**routes, "port": 9000})["port"] == 9000


@pytest.mark.parametrize("output", ["yaml", "json"])
def test_a_written_spec_reads_back_the_same(output, tmp_path):
    spec = file_spec(ENDPOINT_ANSWER)
    text = dump_spec(spec, output)
    path = tmp_path / f"spec.{output}"
    path.write_text(text)
    assert read_spec_file(str(path)) == [spec]


def test_yaml_writes_text_spanning_lines_as_a_block():
    text = dump_spec(file_spec(ENDPOINT_ANSWER), "yaml")
    assert "description: |-\n  Speech\n  in two lines\n" in text
    assert "start_command: python serve.py --port 8080\n" in text
    assert json.loads(dump_spec(file_spec(ENDPOINT_ANSWER), "json"))["gpu_count"] == 1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_any_text_reads_back_exactly(value):
    spec = {"name": "a", "description": value, "start_command": " " + value + "\n"}
    assert read_specs(dump_spec(spec, "yaml"), "x.yaml") == [spec]


# ---------------------------------------------------------------- the examples
def test_the_embeddings_example_declares_the_routes_of_its_model():
    from common.routes import normalize_routes

    [spec] = read_spec_file(str(ROOT / "examples" / "specs" / "embeddings.yaml"))
    routes = json.loads((ROOT / "examples" / "embeddings" / "routes.json").read_text())
    assert normalize_routes(spec["routes"]) == normalize_routes(routes)


# ---------------------------------------------------------------- what `apply` prints
def test_a_long_value_is_cut_and_a_change_saved_but_not_told_says_so():
    from common.cli_client import SHOWN_CHARACTERS, describe

    routes = [{"method": "POST", "path": f"/r{i}", "file": "m.py", "function": "f"} for i in range(9)]
    unnotified = "saved, but the endpoint's workflow was not told (Temporal is not reachable); any later action tells it"
    answer = {"action": "updated", "dry_run": False, "endpoint": {}, "saved": True, "restarted": False,
              "restart_required": [], "changes": [{"field": "routes", "edit": "restart", "from": [], "to": routes}],
              "warning": unnotified, "error": unnotified, "errors": {}}  # as /apply answers it: a 503
    head, change, error = describe("m", 503, answer)
    assert head == "endpoint m: updated" and change.startswith("  routes  restart    [] -> [{\"method\": ")
    assert change.endswith("...") and len(change) == len("  routes  restart    [] -> ") + SHOWN_CHARACTERS
    assert error == f"  error: {unnotified}"
