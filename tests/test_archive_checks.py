"""Archives are checked in full at upload (common/archives.py): damaged data, compression we cannot
extract, encryption, newer zip versions and zip bombs are a 400 with the reason then, never a
provision that fails later."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from common.archives import ArchiveError, extract_archive, inspect_archive
from tests.conftest import web_app
from tests.test_registry import upload
from tests.test_sources import arith_files, make_tar, make_zip

MIB = 1024 * 1024


@pytest.fixture
def app(tmp_path):
    yield from web_app(tmp_path)  # the default limits: 2 GiB archives, 8 GiB unpacked


@pytest.fixture
def model(client):
    assert client.post("/api/v1/models", json={"name": "arith"}).status_code == 201


def _patch_local_header(path: Path, offset: int, fmt: str, value: int, central_offset: int | None = None) -> Path:
    """Overwrite a field of the first member's local header (and of its central directory
    entry), as a hostile or broken zip tool would write it."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    if central_offset is not None:
        central = data.rfind(b"PK\x01\x02")
        struct.pack_into(fmt, data, central + central_offset, value)
    path.write_bytes(bytes(data))
    return path


def bad_crc_zip(tmp: Path) -> Path:
    path = make_zip(tmp / "crc.zip", {"arith.py": b"def add(a, b):\n    return a + b\n" * 50})
    return _patch_local_header(path, 14, "<I", 0xDEADBEEF, central_offset=16)


def unknown_method_zip(tmp: Path) -> Path:
    return _patch_local_header(make_zip(tmp / "method.zip", arith_files()), 8, "<H", 99, central_offset=10)


def newer_version_zip(tmp: Path) -> Path:
    return _patch_local_header(make_zip(tmp / "version.zip", arith_files()), 4, "<H", 99, central_offset=6)


def encrypted_zip(tmp: Path) -> Path:
    path = make_zip(tmp / "enc.zip", arith_files())
    flags = struct.unpack_from("<H", path.read_bytes(), 6)[0]
    return _patch_local_header(path, 6, "<H", flags | 0x1, central_offset=8)


def zip_bomb(tmp: Path) -> Path:
    """~200 KiB that unpacks to 200 MiB, like the one in the issue."""
    path = tmp / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("zeros.bin", "w") as member:
            block = b"\0" * MIB
            for _ in range(200):
                member.write(block)
    return path


def truncated_tar(tmp: Path) -> Path:
    path = make_tar(tmp / "cut.tar.gz", {**arith_files(), "big.bin": bytes(range(256)) * 4096})
    path.write_bytes(path.read_bytes()[:-200])
    return path


def corrupt_gzip_data(tmp: Path) -> Path:
    path = make_tar(tmp / "flip.tar.gz", {**arith_files(), "big.bin": bytes(range(256)) * 4096})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("build, fragment", [
    (bad_crc_zip, "damaged"),
    (unknown_method_zip, "compression method 99"),
    (newer_version_zip, "newer extractor"),
    (encrypted_zip, "encrypted"),
    (zip_bomb, "zip bomb"),
    (truncated_tar, "damaged"),
    (corrupt_gzip_data, "damaged"),
])
def test_bad_archives_are_a_400_at_upload(app, client, model, tmp_path, build, fragment):
    response = upload(client, build(tmp_path))
    assert response.status_code == 400, response.get_data()[:300]
    assert fragment in response.get_json()["errors"]["archive"], response.get_json()
    assert client.get("/api/v1/models/arith").get_json()["versions"] == []
    models_dir = app.extensions["standby_settings"].models_dir / "arith"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


def test_a_good_archive_still_uploads_and_extracts(app, client, model, tmp_path):
    response = upload(client, make_zip(tmp_path / "ok.zip", arith_files()))
    assert response.status_code == 201, response.get_json()
    info = inspect_archive(tmp_path / "ok.zip", "zip", 10 * MIB)
    assert info.unpacked_bytes == sum(len(data) for data in arith_files().values())


def test_the_real_unpacked_size_counts_not_the_header(tmp_path):
    """A member whose header understates its size: reading it through finds the truth."""
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.bin", b"x" * 5000)
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 10)  # uncompressed size in the central directory
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError):
        inspect_archive(path, "zip", 1000)


def test_extraction_refuses_damage_too(tmp_path):
    """An archive placed on disk without the upload check: the worker's extraction refuses it."""
    with pytest.raises(ArchiveError, match="damaged"):
        extract_archive(bad_crc_zip(tmp_path), "zip", tmp_path / "out", 10 * MIB)
    with pytest.raises(ArchiveError, match="newer extractor"):
        extract_archive(newer_version_zip(tmp_path), "zip", tmp_path / "out2", 10 * MIB)


def test_inspect_reads_every_member(tmp_path):
    seen: list[str] = []
    path = make_tar(tmp_path / "m.tar.gz", {"a.py": b"1", "d/b.py": b"22"})
    inspect_archive(path, "tar.gz", MIB, on_progress=seen.append)
    assert seen == ["a.py", "d/b.py"]
