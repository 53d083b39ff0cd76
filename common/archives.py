"""Safe model archives: the checks shared by the registry (at upload) and the worker (at provision).

An uploaded archive is untrusted. It is refused, with a message saying why, when a member would
land outside the target directory (`..`, an absolute path), is a link or a device, or when the
archive or its unpacked contents are larger than configured. The worker re-checks at extraction
so an archive placed on disk by other means gets the same treatment.
"""
from __future__ import annotations

import hashlib
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
_COPY_CHUNK = 1024 * 1024


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
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArchiveError(f"the file is not a readable {kind} archive: {exc}") from None


def inspect_archive(path: Path, kind: str, max_unpacked_bytes: int) -> ArchiveInfo:
    """Check every member without extracting anything; ArchiveError says what is wrong."""
    with _open(path, kind) as archive:
        try:
            if kind == "tar.gz":
                members = _tar_members(archive)
                unpacked = sum(info.size for _, info in members)
            else:
                members = _zip_members(archive)
                unpacked = sum(info.file_size for _, info in members)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ArchiveError(f"the {kind} archive is damaged: {exc}") from None
    if unpacked > max_unpacked_bytes:
        raise ArchiveError(f"the archive unpacks to {human_size(unpacked)}, more than the limit of {human_size(max_unpacked_bytes)}")
    if not members:
        raise ArchiveError("the archive is empty")
    return ArchiveInfo(kind=kind, members=len(members), unpacked_bytes=unpacked)


def extract_archive(path: Path, kind: str, target: Path, max_unpacked_bytes: int,
                    on_member: Callable[[str], None] | None = None) -> ArchiveInfo:
    """Extract into `target` after `inspect_archive`, writing member by member under our control
    (no tarfile.extractall): only regular files and folders, never outside `target`, and never
    more bytes than the limit even if the headers lied about sizes."""
    info = inspect_archive(path, kind, max_unpacked_bytes)
    target = target.resolve()
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    with _open(path, kind) as archive:
        members = _tar_members(archive) if kind == "tar.gz" else _zip_members(archive)
        for rel, member in members:
            if on_member is not None:
                on_member(str(rel))
            dest = (target / rel).resolve()
            if dest != target and target not in dest.parents:
                raise ArchiveError(f"archive member {rel} escapes the target directory")
            is_dir = member.isdir() if kind == "tar.gz" else member.is_dir()
            if is_dir:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member) if kind == "tar.gz" else archive.open(member)
            with source, open(dest, "wb") as out:
                while chunk := source.read(_COPY_CHUNK):
                    written += len(chunk)
                    if written > max_unpacked_bytes:
                        raise ArchiveError(f"the archive unpacks to more than the limit of {human_size(max_unpacked_bytes)}")
                    out.write(chunk)
            mode = member.mode if kind == "tar.gz" else (member.external_attr >> 16)
            if mode & 0o111:
                dest.chmod(0o755)  # keep scripts executable; drop setuid and friends
    return info


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
