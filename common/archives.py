"""Safe model archives: the checks shared by the registry (at upload) and the worker (at provision).

An uploaded archive is untrusted. It is refused, with a message saying why, when a member would
land outside the target directory (`..`, an absolute path), is a link or a device, or when the
archive or its unpacked contents are larger than configured. At upload every member is read
through once (`inspect_archive`): damaged data (a bad CRC, a truncated gzip stream), a zip
compression method or format version we cannot extract, encryption, and a zip bomb are all
refused then, as a 400 with the reason, never later as a provision that fails and retries. The
worker re-checks the headers and counts the bytes it writes at extraction, so an archive placed
on disk by other means gets the same treatment.
"""
from __future__ import annotations

import hashlib
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
_COPY_CHUNK = 1024 * 1024
# The zip compression methods Python's zipfile (the worker's extractor) reads.
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate",
                zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
# Past this size, unpacking to more than MAX_RATIO times the archive's size is a zip bomb (real
# code and weights compress 1.1-10x; deflate's ceiling is ~1000x, reached only by repeated bytes).
RATIO_FLOOR_BYTES = 64 * 1024 * 1024
MAX_RATIO = 200
# What reading a damaged member can raise: zlib/bz2/lzma errors, a bad CRC (BadZipFile), a
# truncated stream (EOFError), a bad gzip header (OSError), an unsupported feature.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError,
                NotImplementedError, RuntimeError)


class ArchiveError(ValueError):
    """A refused archive; the message is shown to the user as is."""


@dataclass
class ArchiveInfo:
    kind: str  # "tar.gz" | "zip"
    members: int
    unpacked_bytes: int


@dataclass
class StoredFile:
    size: int
    sha256: str


def archive_kind(filename: str) -> str:
    """'tar.gz' or 'zip' from the file name; ArchiveError for anything else."""
    lowered = (filename or "").lower()
    if lowered.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lowered.endswith(".zip"):
        return "zip"
    raise ArchiveError(f"unsupported archive {filename!r}: upload a .tar.gz, .tgz or .zip file")


def copy_limited(source: BinaryIO, dest: Path, max_bytes: int) -> StoredFile:
    """Stream `source` to `dest`, hashing as it goes; refuse (and delete) past `max_bytes`."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(dest, "wb") as out:
            while chunk := source.read(_COPY_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise ArchiveError(f"the archive is larger than the limit of {human_size(max_bytes)}")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return StoredFile(size=size, sha256=digest.hexdigest())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _safe_member_path(name: str) -> PurePosixPath:
    """The member's path relative to the target, or ArchiveError if it could escape it."""
    if "\\" in name:
        name = name.replace("\\", "/")  # zips made on Windows; treat both as separators
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"archive member {name!r} has an absolute path; archives must hold relative paths only")
    if ".." in path.parts:
        raise ArchiveError(f"archive member {name!r} escapes the target directory ('..'); remove it and upload again")
    return path


def _tar_members(archive: tarfile.TarFile) -> list[tuple[PurePosixPath, tarfile.TarInfo]]:
    members = []
    for info in archive.getmembers():
        path = _safe_member_path(info.name)
        if info.issym() or info.islnk():
            raise ArchiveError(f"archive member {info.name!r} is a link; links are not allowed, archive the file itself")
        if not (info.isfile() or info.isdir()):
            raise ArchiveError(f"archive member {info.name!r} is a device, FIFO or other special file; only files and folders are allowed")
        members.append((path, info))
    return members


def _zip_members(archive: zipfile.ZipFile) -> list[tuple[PurePosixPath, zipfile.ZipInfo]]:
    members = []
    for info in archive.infolist():
        path = _safe_member_path(info.filename)
        if info.flag_bits & 0x1:
            raise ArchiveError(f"archive member {info.filename!r} is encrypted; upload an archive without a password")
        if info.compress_type not in _ZIP_METHODS:
            raise ArchiveError(f"archive member {info.filename!r} uses zip compression method {info.compress_type}, "
                               f"which cannot be extracted; re-create the zip with {' or '.join(_ZIP_METHODS.values())} "
                               "(e.g. `zip -r model.zip .`)")
        file_type = stat.S_IFMT(info.external_attr >> 16)
        # Unix zips record the file type in the high bits (others leave them 0); a symlink's
        # "content" is its target path.
        if file_type == stat.S_IFLNK:
            raise ArchiveError(f"archive member {info.filename!r} is a link; links are not allowed, archive the file itself")
        if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"archive member {info.filename!r} is a special file; only files and folders are allowed")
        members.append((path, info))
    return members


def _open(path: Path, kind: str):
    try:
        return tarfile.open(path, "r:gz") if kind == "tar.gz" else zipfile.ZipFile(path)
    except NotImplementedError as exc:  # e.g. "zip file version 9.9": made by a newer zip tool
        raise ArchiveError(f"the {kind} archive needs a newer extractor than ours ({exc}); "
                           "re-create it with a standard zip or tar tool") from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ArchiveError(f"the file is not a readable {kind} archive: {exc}") from None


def _check_headers(archive, kind: str, max_unpacked_bytes: int) -> tuple[list, int]:
    """Members and their declared unpacked size, refused on what the headers alone show."""
    try:
        if kind == "tar.gz":
            members = _tar_members(archive)
            unpacked = sum(info.size for _, info in members)
        else:
            members = _zip_members(archive)
            unpacked = sum(info.file_size for _, info in members)
    except ArchiveError:
        raise
    except _READ_ERRORS as exc:
        raise ArchiveError(f"the {kind} archive is damaged: {exc}") from None
    if unpacked > max_unpacked_bytes:
        raise ArchiveError(f"the archive unpacks to {human_size(unpacked)}, more than the limit of {human_size(max_unpacked_bytes)}")
    if not members:
        raise ArchiveError("the archive is empty")
    return members, unpacked


def _member_stream(archive, kind: str, member):
    return archive.extractfile(member) if kind == "tar.gz" else archive.open(member)


def _is_dir(kind: str, member) -> bool:
    return member.isdir() if kind == "tar.gz" else member.is_dir()


def _check_ratio(unpacked: int, archive_bytes: int) -> None:
    if unpacked > RATIO_FLOOR_BYTES and unpacked > MAX_RATIO * max(archive_bytes, 1):
        raise ArchiveError(f"the archive unpacks to {human_size(unpacked)} from {human_size(archive_bytes)}, more "
                           f"than {MAX_RATIO} times its size: refused as a zip bomb; upload the files less compressed")


def inspect_archive(path: Path, kind: str, max_unpacked_bytes: int,
                    on_progress: Callable[[str], None] | None = None) -> ArchiveInfo:
    """Check every member by reading it through once, without writing anything: the headers
    (paths, types, declared sizes), then the data itself (CRCs, compression, the real unpacked
    size, the compression ratio). ArchiveError says what is wrong."""
    archive_bytes = Path(path).stat().st_size
    with _open(path, kind) as archive:
        members, declared = _check_headers(archive, kind, max_unpacked_bytes)
        _check_ratio(declared, archive_bytes)
        unpacked = 0
        for rel, member in members:
            if _is_dir(kind, member):
                continue
            if on_progress is not None:
                on_progress(str(rel))
            try:
                with _member_stream(archive, kind, member) as source:
                    while chunk := source.read(_COPY_CHUNK):
                        unpacked += len(chunk)
                        if unpacked > max_unpacked_bytes:
                            raise ArchiveError(f"the archive unpacks to more than the limit of "
                                               f"{human_size(max_unpacked_bytes)}")
                        _check_ratio(unpacked, archive_bytes)
            except ArchiveError:
                raise
            except _READ_ERRORS as exc:
                raise ArchiveError(f"archive member {str(rel)!r} cannot be read, the archive is damaged "
                                   f"({exc}); create it again and upload it") from None
    return ArchiveInfo(kind=kind, members=len(members), unpacked_bytes=unpacked)


def extract_archive(path: Path, kind: str, target: Path, max_unpacked_bytes: int,
                    on_member: Callable[[str], None] | None = None) -> ArchiveInfo:
    """Extract into `target` after checking the headers, writing member by member under our
    control (no tarfile.extractall): only regular files and folders, never outside `target`, and
    never more bytes than the limit even if the headers lied about sizes. The data was read
    through at upload (`inspect_archive`); damage found now is still an ArchiveError."""
    target = target.resolve()
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    with _open(path, kind) as archive:
        members, _declared = _check_headers(archive, kind, max_unpacked_bytes)
        for rel, member in members:
            if on_member is not None:
                on_member(str(rel))
            dest = (target / rel).resolve()
            if dest != target and target not in dest.parents:
                raise ArchiveError(f"archive member {rel} escapes the target directory")
            if _is_dir(kind, member):
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with _member_stream(archive, kind, member) as source, open(dest, "wb") as out:
                    while chunk := source.read(_COPY_CHUNK):
                        written += len(chunk)
                        if written > max_unpacked_bytes:
                            raise ArchiveError(f"the archive unpacks to more than the limit of {human_size(max_unpacked_bytes)}")
                        out.write(chunk)
            except ArchiveError:
                raise
            except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
                    RuntimeError) as exc:
                raise ArchiveError(f"archive member {str(rel)!r} cannot be read, the archive is damaged ({exc})") from None
            mode = member.mode if kind == "tar.gz" else (member.external_attr >> 16)
            if mode & 0o111:
                dest.chmod(0o755)  # keep scripts executable; drop setuid and friends
    return ArchiveInfo(kind=kind, members=len(members), unpacked_bytes=written)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
