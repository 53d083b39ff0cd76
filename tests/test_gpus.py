"""GPU inventory: configuration parsing, nvidia-smi parsing, and request checks."""
from __future__ import annotations

import os
import stat

import pytest

from common.config import Settings
from workers.gpus import (
    check_request_fits,
    detect_nvidia_smi,
    load_inventory,
    normalize_gpu_name,
    parse_gpu_config,
    parse_nvidia_smi,
)


def test_parse_gpu_config_assigns_indices_in_declaration_order():
    assert parse_gpu_config("A100:2,T4:4") == {"A100": [0, 1], "T4": [2, 3, 4, 5]}
    assert parse_gpu_config(" T4 : 1 , A100:0,") == {"T4": [0], "A100": []}
    assert parse_gpu_config("") == {}


@pytest.mark.parametrize("raw,message", [
    ("A100", "must look like TYPE:COUNT"),
    ("A100:", "must look like TYPE:COUNT"),
    (":2", "must look like TYPE:COUNT"),
    ("A100:two", "'two' is not a whole number"),
    ("A100:-1", "count must be 0 or more"),
    ("A100:1,a100:2", "declares 'a100' twice"),
    ("A 100:1", "may only use letters"),
])
def test_parse_gpu_config_rejects_malformed_entries(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_gpu_config(raw)


@pytest.mark.parametrize("name,short", [
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("Tesla T4", "T4"),
    ("Tesla V100-SXM2-16GB", "V100"),
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA GeForce RTX 4090", "RTX4090"),
    ("NVIDIA GeForce RTX 3090 Ti", "RTX3090"),
    ("NVIDIA RTX A6000", "A6000"),
    ("Quadro RTX 8000", "RTX8000"),
])
def test_normalize_gpu_name(name, short):
    assert normalize_gpu_name(name) == short


def test_parse_nvidia_smi_output():
    output = ("0, NVIDIA A100-SXM4-80GB\n1, NVIDIA A100-SXM4-80GB\n"
              "2, Tesla T4\n3, NVIDIA A100-SXM4-80GB\n\n")
    assert parse_nvidia_smi(output) == {"A100": [0, 1, 3], "T4": [2]}
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi("No devices were found")


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """A real executable named nvidia-smi on PATH that prints canned output."""
    def install(output: str, exit_code: int = 0):
        script = tmp_path / "bin" / "nvidia-smi"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"#!/bin/sh\n/bin/cat <<'OUT'\n{output}\nOUT\nexit {exit_code}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return install


def test_detect_and_load_inventory(fake_nvidia_smi, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect_nvidia_smi() is None
    assert load_inventory(Settings(data_dir=tmp_path)) == {}
    assert load_inventory(Settings(data_dir=tmp_path, gpus="T4:2")) == {"T4": [0, 1]}

    fake_nvidia_smi("0, Tesla T4\n1, NVIDIA L4")
    assert detect_nvidia_smi() == {"T4": [0], "L4": [1]}
    assert load_inventory(Settings(data_dir=tmp_path)) == {"T4": [0], "L4": [1]}
    # An explicit declaration wins over detection.
    assert load_inventory(Settings(data_dir=tmp_path, gpus="A100:1")) == {"A100": [0]}


def test_failing_nvidia_smi_means_no_gpus(fake_nvidia_smi, tmp_path):
    fake_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver", 9)
    assert detect_nvidia_smi() is None
    assert load_inventory(Settings(data_dir=tmp_path)) == {}


INVENTORY = {"A100": [0, 1], "T4": [2, 3, 4, 5], "H100": []}


@pytest.mark.parametrize("gpu_type,count", [("A100", 2), ("t4", 4), ("T4", 1), ("", 0), ("A100", 0)])
def test_requests_that_fit(gpu_type, count):
    assert check_request_fits(INVENTORY, gpu_type, count) is None


@pytest.mark.parametrize("gpu_type,count,message", [
    ("T4", 5, "at most 4 per instance"),
    ("A100", 3, "3 x A100 requested but the pool has only 2"),
    ("V100", 1, "no V100 GPUs here; available: A100 (2), T4 (4)"),
    ("H100", 1, "no H100 GPUs here"),
    ("", 1, "choose a gpu_type"),
    ("T4", -1, "0 (CPU only) or more"),
])
def test_requests_that_never_fit(gpu_type, count, message):
    assert message in check_request_fits(INVENTORY, gpu_type, count)


def test_request_on_a_host_without_gpus():
    assert "has no GPUs" in check_request_fits({}, "T4", 1)
    assert check_request_fits({}, "", 0) is None
