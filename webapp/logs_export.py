"""Logs to keep: one instance's whole log as a text file, or every instance's of an endpoint as a
.tar.gz (README.md "Logs"), e.g. before terminating it, which deletes them. A rotated log's parts
(workers/log_rotation.py) are joined, oldest first."""
from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from common.models import Endpoint, Instance
from workers.log_rotation import log_parts

CHUNK = 64 * 1024


def instance_log_chunks(instance: Instance) -> Iterator[bytes]:
    for part in log_parts(Path(instance.log_path)) if instance.log_path else []:
        try:
            with open(part, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
        except FileNotFoundError:  # rotated or purged meanwhile
            continue


def endpoint_archive(endpoint: Endpoint) -> tempfile.SpooledTemporaryFile:
    """A .tar.gz of `<endpoint>-logs/<instance>.log` for each instance (its parts joined), oldest
    instance first; small archives stay in memory, large ones spill to a temporary file."""
    out = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for instance in sorted(endpoint.instances, key=lambda i: (i.created_at, i.id)):
            with tempfile.TemporaryFile() as joined:
                for chunk in instance_log_chunks(instance):
                    joined.write(chunk)
                size = joined.tell()
                joined.seek(0)
                info = tarfile.TarInfo(f"{endpoint.name}-logs/{instance.id}.log")
                info.size = size
                info.mtime = int((instance.stopped_at or instance.created_at).timestamp()) if instance.created_at else 0
                info.mode = 0o644
                tar.addfile(info, joined)
        index = "".join(f"{i.id}\t{i.status}\tcreated {i.created_at}\tready {i.ready_at}\tstopped {i.stopped_at}\n"
                        for i in sorted(endpoint.instances, key=lambda i: (i.created_at, i.id))).encode()
        info = tarfile.TarInfo(f"{endpoint.name}-logs/instances.tsv")
        info.size = len(index)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(index))
    out.seek(0)
    return out


def stream_file(handle, chunk: int = CHUNK) -> Iterator[bytes]:
    try:
        while data := handle.read(chunk):
            yield data
    finally:
        handle.close()

