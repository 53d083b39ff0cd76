"""The GPUs a worker host offers: found with nvidia-smi, or declared as STANDBY_GPUS.

An inventory maps a short GPU type ("A100", "T4") to the device indices of that type, which
is what CUDA_VISIBLE_DEVICES and Docker's device requests want.
"""
from __future__ import annotations

import re
import shutil
import subprocess

from common.config import Settings
from common.spec_fields import MAX_GPUS as MAX_GPUS_PER_INSTANCE

Inventory = dict[str, list[int]]

_TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Words in marketing names that say nothing about which GPU it is.
_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO"}


def parse_gpu_config(raw: str) -> Inventory:
    """"A100:2,T4:4" -> {"A100": [0, 1], "T4": [2, 3, 4, 5]}: indices in declaration order."""
    inventory: Inventory = {}
    seen: dict[str, str] = {}
    next_index = 0
    for position, entry in enumerate((raw or "").split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        gpu_type, sep, count_text = (part.strip() for part in entry.partition(":"))
        if not sep or not gpu_type or not count_text:
            raise ValueError(f"STANDBY_GPUS entry {position} ({entry!r}) must look like TYPE:COUNT, e.g. A100:2")
        if not _TYPE_NAME.match(gpu_type):
            raise ValueError(f"STANDBY_GPUS entry {entry!r}: GPU type {gpu_type!r} may only use "
                             "letters, digits, '_', '.' and '-'")
        try:
            count = int(count_text)
        except ValueError:
            raise ValueError(f"STANDBY_GPUS entry {entry!r}: count {count_text!r} is not a whole number") from None
        if count < 0:
            raise ValueError(f"STANDBY_GPUS entry {entry!r}: count must be 0 or more")
        if gpu_type.upper() in seen:
            raise ValueError(f"STANDBY_GPUS declares {gpu_type!r} twice (also as {seen[gpu_type.upper()]!r}); "
                             "give each type once with its total count")
        seen[gpu_type.upper()] = gpu_type
        inventory[gpu_type] = list(range(next_index, next_index + count))
        next_index += count
    return inventory


def normalize_gpu_name(name: str) -> str:
    """A short type from nvidia-smi's name: "NVIDIA A100-SXM4-80GB" -> "A100",
    "Tesla T4" -> "T4", "NVIDIA GeForce RTX 4090" -> "RTX4090", "NVIDIA RTX A6000" -> "A6000"."""
    words = [w for w in re.split(r"\s+", name.strip()) if w and w.upper() not in _VENDOR_WORDS]
    if not words:
        return name.strip() or "unknown"
    first = words[0]
    if first.upper() in ("RTX", "GTX") and len(words) > 1:
        model = words[1].split("-")[0]
        # Workstation cards ("RTX A6000") are known by the model alone; consumer cards
        # ("RTX 4090") by the family and number.
        return model if model[:1].isalpha() else first.upper() + model
    return first.split("-")[0]


def parse_nvidia_smi(output: str) -> Inventory:
    """Parse `nvidia-smi --query-gpu=index,name --format=csv,noheader`."""
    inventory: Inventory = {}
    for line in output.splitlines():
        line = line.strip()
        if not line:
            continue
        index_text, sep, name = line.partition(",")
        if not sep or not index_text.strip().isdigit():
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        inventory.setdefault(normalize_gpu_name(name), []).append(int(index_text))
    for indices in inventory.values():
        indices.sort()
    return inventory


def detect_nvidia_smi(timeout: float = 10.0) -> Inventory | None:
    """The host's GPUs, or None when nvidia-smi is absent or fails (no driver)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        result = subprocess.run([binary, "--query-gpu=index,name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    try:
        return parse_nvidia_smi(result.stdout)
    except ValueError:
        return None


def gpu_details(settings: Settings, inventory: Inventory) -> list[dict]:
    """Each GPU of the host: its type, index and memory (MB, from nvidia-smi where it answers;
    None for GPUs only declared with STANDBY_GPUS)."""
    memory: dict[int, int] = {}
    binary = shutil.which("nvidia-smi")
    if binary is not None and not settings.gpus.strip():
        try:
            result = subprocess.run([binary, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                                    capture_output=True, text=True, timeout=10.0, check=False)
            for line in result.stdout.splitlines():
                index, _, total = line.partition(",")
                if index.strip().isdigit() and total.strip().isdigit():
                    memory[int(index)] = int(total)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return [{"type": kind, "index": index, "memory_mb": memory.get(index)}
            for kind, indices in inventory.items() for index in indices]


def load_inventory(settings: Settings) -> Inventory:
    """An explicit STANDBY_GPUS wins (an operator who sets it means it; tests rely on it);
    otherwise what nvidia-smi reports; otherwise no GPUs (CPU-only endpoints still run)."""
    if settings.gpus.strip():
        return parse_gpu_config(settings.gpus)
    return detect_nvidia_smi() or {}


def describe_inventory(inventory: Inventory) -> str:
    return ", ".join(f"{t}:{len(ix)}" for t, ix in inventory.items()) or "no GPUs"


def check_request_fits(inventory: Inventory, gpu_type: str | None, gpu_count: int) -> str | None:
    """A user-facing message when a request can never be met by this pool, else None.

    A request that fits the pool but not what is free right now is not an error: it waits.
    """
    if gpu_count is None or gpu_count == 0:
        return None
    if gpu_count < 0:
        return "gpu_count must be 0 (CPU only) or more"
    if gpu_count > MAX_GPUS_PER_INSTANCE:
        return f"gpu_count must be at most {MAX_GPUS_PER_INSTANCE} per instance, got {gpu_count}"
    available = [t for t, ix in inventory.items() if ix]
    if not available:
        return ("this deployment has no GPUs: set gpu_count to 0, or declare GPUs with "
                "STANDBY_GPUS (e.g. A100:2,T4:4)")
    listing = ", ".join(f"{t} ({len(inventory[t])})" for t in available)
    if not gpu_type:
        return f"choose a gpu_type for {gpu_count} GPU(s); available: {listing}"
    matched = _match_type(inventory, gpu_type)
    if matched is None or not inventory[matched]:
        return f"no {gpu_type} GPUs here; available: {listing}"
    if gpu_count > len(inventory[matched]):
        return (f"{gpu_count} x {matched} requested but the pool has only "
                f"{len(inventory[matched])}; lower gpu_count or choose another type ({listing})")
    return None


def canonical_gpu_type(inventory: Inventory, gpu_type: str) -> str:
    """The inventory's own spelling of a type given in any case ("t4" -> "T4"); unknown types
    are returned as given (check_request_fits says what is available)."""
    return _match_type(inventory, gpu_type) or gpu_type.strip()


def _match_type(inventory: Inventory, gpu_type: str) -> str | None:
    wanted = gpu_type.strip().upper()
    for name in inventory:
        if name.upper() == wanted:
            return name
    return None
