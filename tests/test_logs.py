"""Instance logs: rotation bounds a chatty instance (workers/log_rotation.py), downloads join the
parts (webapp/logs_export.py), and the endpoint's archive holds every instance's."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone

from sqlalchemy import select

from common.models import Endpoint, Instance
from webapp.extensions import db
from workers.log_rotation import log_parts, rotate_if_large, rotate_logs


def test_a_chatty_instance_stays_within_its_bound(tmp_path):
    """A real process writing a line every half millisecond (megabytes a second), as an instance
    writes its stdout: to a file opened for appending, through a descriptor that outlives whoever
    opened it. Looked at every 0.1 s, its files stay within max x (keep + 1) plus one look's worth,
    whatever it writes in all."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "chattyaa.log"
    chatty = "import sys, time\nwhile True:\n    sys.stdout.write('x' * 999 + '\\n'); sys.stdout.flush(); time.sleep(0.0005)"
    with open(path, "ab") as out:
        writer = subprocess.Popen([sys.executable, "-c", chatty], stdout=out)
    written, largest = 0, 0
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            size = path.stat().st_size
            if rotate_logs(logs, max_bytes=200_000, keep=2):
                written += size
            largest = max(largest, sum(p.stat().st_size for p in logs.iterdir()))
            time.sleep(0.1)
    finally:
        writer.kill()
        writer.wait()
    assert sorted(p.name for p in logs.iterdir()) == ["chattyaa.log", "chattyaa.log.1", "chattyaa.log.2"]
    assert written > 4 * 200_000, written  # it wrote more than the bound ...
    assert largest < 3 * (200_000 + 400_000), largest  # ... and the disk held a bounded part of it


def test_rotation_shifts_the_older_parts_and_downloads_read_them_in_order(tmp_path):
    path = tmp_path / "abcdefgh.log"
    for n in range(4):
        with open(path, "ab") as out:
            out.write(f"part {n}\n".encode() * 10)
        assert rotate_if_large(path, max_bytes=10, keep=2)
    path.write_bytes(b"live\n")
    assert [p.name for p in log_parts(path)] == ["abcdefgh.log.2", "abcdefgh.log.1", "abcdefgh.log"]
    assert b"".join(p.read_bytes() for p in log_parts(path)).split(b"\n")[0] == b"part 2"
    assert not rotate_if_large(path, max_bytes=1000, keep=2)
    assert not rotate_if_large(tmp_path / "missing.log", 1, 2)


def test_download_one_log_and_the_archive_of_all(app, client, tmp_path):
    client.post("/api/v1/endpoints", json={"name": "tts", "start_command": "python -m http.server $PORT"})
    old, new = tmp_path / "aaaaaaaa.log", tmp_path / "bbbbbbbb.log"
    old.write_text("old 1\n")
    (tmp_path / "aaaaaaaa.log.1").write_text("older 0\n")
    new.write_text("new 1\nnew 2\n")
    with app.app_context():
        endpoint = db.session.scalar(select(Endpoint))
        db.session.add_all([
            Instance(id="aaaaaaaa", endpoint_id=endpoint.id, status="stopped", log_path=str(old),
                     created_at=datetime(2030, 1, 1, tzinfo=timezone.utc)),
            Instance(id="bbbbbbbb", endpoint_id=endpoint.id, status="ready", log_path=str(new),
                     created_at=datetime(2030, 1, 2, tzinfo=timezone.utc)),
        ])
        db.session.commit()
    one = client.get("/api/v1/endpoints/tts/logs/aaaaaaaa.log")
    assert one.status_code == 200 and one.mimetype == "text/plain"
    assert one.get_data(as_text=True) == "older 0\nold 1\n"  # rotated part first
    assert 'filename="tts-aaaaaaaa.log"' in one.headers["Content-Disposition"]
    assert client.get("/api/v1/endpoints/tts/logs/zzzzzzzz.log").status_code == 404

    archive = client.get("/api/v1/endpoints/tts/logs.tar.gz")
    assert archive.status_code == 200 and archive.mimetype == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive.get_data()), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert members["tts-logs/aaaaaaaa.log"] == "older 0\nold 1\n"
    assert members["tts-logs/bbbbbbbb.log"] == "new 1\nnew 2\n"
    assert "bbbbbbbb\tready" in members["tts-logs/instances.tsv"]
    page = client.get("/endpoints/tts").get_data(as_text=True)
    assert "/api/v1/endpoints/tts/logs.tar.gz" in page and "/api/v1/endpoints/tts/logs/bbbbbbbb.log" in page
    assert "/api/v1/endpoints/tts/logs.tar.gz" in client.get("/endpoints/tts/terminate").get_data(as_text=True)
