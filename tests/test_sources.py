"""populate_routes_source: archives (with the safety checks) and git repositories into a workdir."""
from __future__ import annotations

import io
import json
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from common.archives import ArchiveError, archive_kind, inspect_archive, sha256_of
from common.config import load_settings
from workers.sources import SourceError, populate_routes_source

ARITH = Path(__file__).resolve().parent.parent / "examples" / "arith"


# ---- archive builders, shared with the registry tests -------------------------------------------


def make_tar(path: Path, files: dict[str, bytes], extra=None) -> Path:
    """A .tar.gz of `files`; `extra(tar)` may add hostile members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return path


def make_zip(path: Path, files: dict[str, bytes], symlink: tuple[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, symlink[1])
    return path


def tar_symlink(name: str, target: str):
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        tar.addfile(info)
    return add


def tar_hardlink(name: str, target: str):
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.LNKTYPE
        info.linkname = target
        tar.addfile(info)
    return add


def tar_device(name: str):
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
        tar.addfile(info)
    return add


def arith_files() -> dict[str, bytes]:
    return {"arith.py": (ARITH / "arith.py").read_bytes(), "README.md": b"model\n"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
                               "HOME": str(cwd), "PATH": "/usr/bin:/bin:/usr/local/bin"}).stdout.strip()


def make_git_repo(path: Path) -> dict[str, str]:
    """A repository with two commits on main, a tag on the first and a branch `dev`."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch", "main")
    (path / "arith.py").write_text((ARITH / "arith.py").read_text())
    git(path, "add", ".")
    git(path, "commit", "--quiet", "-m", "first")
    first = git(path, "rev-parse", "HEAD")
    git(path, "tag", "v1")
    git(path, "branch", "dev")
    (path / "VERSION").write_text("2\n")
    git(path, "add", ".")
    git(path, "commit", "--quiet", "-m", "second")
    return {"first": first, "second": git(path, "rev-parse", "HEAD")}


# ---- tests ------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path):
    return load_settings({"STANDBY_DATA_DIR": str(tmp_path / "data"), "STANDBY_MODEL_MAX_UNPACKED_BYTES": "100000",
                          "STANDBY_ALLOW_FILE_GIT": "1"})


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "instances" / "abc" / "work"
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("maker, name", [(make_tar, "model.tar.gz"), (make_zip, "model.zip")])
def test_archive_version_is_extracted(settings, workdir, tmp_path, maker, name):
    archive = maker(tmp_path / name, {**arith_files(), "pkg/util.py": b"X = 1\n", "run.sh": b"#!/bin/sh\n"})
    version = {"kind": "archive", "archive_path": str(archive), "archive_sha256": sha256_of(archive)}
    info = populate_routes_source(settings, version, workdir)
    assert info.kind == "archive" and info.resolved_commit == "" and info.files == 4
    assert (workdir / "arith.py").read_bytes() == (ARITH / "arith.py").read_bytes()
    assert (workdir / "pkg" / "util.py").read_text() == "X = 1\n"


def test_archive_path_relative_to_models_dir(settings, workdir):
    stored = settings.models_dir / "m" / "1" / "archive.tar.gz"
    stored.parent.mkdir(parents=True)
    make_tar(stored, arith_files())
    populate_routes_source(settings, {"kind": "archive", "archive_path": "m/1/archive.tar.gz"}, workdir)
    assert (workdir / "arith.py").exists()


def test_archive_with_wrong_checksum_is_refused(settings, workdir, tmp_path):
    archive = make_tar(tmp_path / "m.tar.gz", arith_files())
    with pytest.raises(SourceError, match="does not match its recorded SHA-256"):
        populate_routes_source(settings, {"kind": "archive", "archive_path": str(archive), "archive_sha256": "0" * 64},
                               workdir)


def test_missing_archive(settings, workdir, tmp_path):
    with pytest.raises(SourceError, match="is missing on this host"):
        populate_routes_source(settings, {"kind": "archive", "archive_path": str(tmp_path / "gone.zip")}, workdir)


@pytest.mark.parametrize("build, fragment", [
    (lambda p: make_tar(p / "a.tar.gz", {"../evil.py": b"x"}), "escapes the target directory"),
    (lambda p: make_tar(p / "a.tar.gz", {"ok/../../evil.py": b"x"}), "escapes the target directory"),
    (lambda p: make_tar(p / "a.tar.gz", {"/etc/evil.py": b"x"}), "absolute path"),
    (lambda p: make_tar(p / "a.tar.gz", {"a.py": b"x"}, tar_symlink("link", "/etc/passwd")), "is a link"),
    (lambda p: make_tar(p / "a.tar.gz", {"a.py": b"x"}, tar_hardlink("hard", "a.py")), "is a link"),
    (lambda p: make_tar(p / "a.tar.gz", {"a.py": b"x"}, tar_device("null")), "device"),
    (lambda p: make_tar(p / "a.tar.gz", {"big.bin": b"0" * 200_000}), "more than the limit"),
    (lambda p: make_zip(p / "a.zip", {"../evil.py": b"x"}), "escapes the target directory"),
    (lambda p: make_zip(p / "a.zip", {"a.py": b"x"}, symlink=("link", "/etc/passwd")), "is a link"),
    (lambda p: make_zip(p / "a.zip", {"big.bin": b"0" * 200_000}), "more than the limit"),
    (lambda p: (p / "a.zip").write_bytes(b"not a zip") and p / "a.zip", "not a readable zip"),
])
def test_unsafe_archives_are_refused_and_nothing_escapes(settings, workdir, tmp_path, build, fragment):
    archive = build(tmp_path)
    with pytest.raises(SourceError, match=fragment):
        populate_routes_source(settings, {"kind": "archive", "archive_path": str(archive)}, workdir)
    assert not (tmp_path / "evil.py").exists() and not (workdir.parent / "evil.py").exists()
    assert list(workdir.iterdir()) == []  # checked before anything was written


def test_archive_kind_by_name():
    assert archive_kind("m.TGZ") == "tar.gz" and archive_kind("m.tar.gz") == "tar.gz" and archive_kind("m.zip") == "zip"
    with pytest.raises(ArchiveError, match="upload a .tar.gz, .tgz or .zip"):
        archive_kind("m.tar.bz2")


def test_inspect_counts_unpacked_size(tmp_path):
    info = inspect_archive(make_zip(tmp_path / "a.zip", {"a": b"12345", "d/b": b"678"}), "zip", 100)
    assert (info.members, info.unpacked_bytes) == (2, 8)


def test_git_branch_tag_and_commit(settings, tmp_path):
    commits = make_git_repo(tmp_path / "repo")
    cases = [("main", commits["second"]), ("dev", commits["first"]), ("v1", commits["first"]),
             (commits["first"], commits["first"]), (commits["second"][:10], commits["second"])]
    for i, (ref, expected) in enumerate(cases):
        workdir = tmp_path / f"w{i}" / "work"
        workdir.mkdir(parents=True)
        info = populate_routes_source(settings, {"kind": "git", "git_url": str(tmp_path / "repo"), "git_ref": ref},
                                      workdir)
        assert info.resolved_commit == expected, ref
        assert (workdir / "arith.py").exists()
        assert (workdir / "VERSION").exists() == (expected == commits["second"])


def test_git_file_url_and_endpoint_like_object(settings, workdir, tmp_path):
    commits = make_git_repo(tmp_path / "repo")

    class EndpointRow:  # an Endpoint row with git fields and no model version
        git_url = f"file://{tmp_path / 'repo'}"
        git_ref = "main"

    info = populate_routes_source(settings, EndpointRow(), workdir)
    assert info.kind == "git" and info.resolved_commit == commits["second"]
    assert not list(workdir.parent.glob(".clone-*"))  # staging cleaned up


def test_git_clone_then_runtime_routes_file(settings, workdir, tmp_path):
    """The lead's provision order: populate the source, then build_start writes .standby/."""
    from runtime.launch import build_start

    make_git_repo(tmp_path / "repo")
    populate_routes_source(settings, {"kind": "git", "git_url": str(tmp_path / "repo"), "git_ref": "main"}, workdir)
    command = build_start(json.loads((ARITH / "routes.json").read_text()), workdir)
    assert (workdir / ".standby" / "routes.json").exists() and "--port $PORT" in command


@pytest.mark.parametrize("url, ref, fragment", [
    ("REPO", "no-such-branch", "git ref 'no-such-branch' was not found"),
    ("/nonexistent/repo", "main", "git clone failed"),
    ("REPO", "", "needs both a URL and a ref"),
    ("--upload-pack=touch /tmp/x", "main", "must not start with '-'"),
    ("ext::sh -c touch% /tmp/pwned", "main", "the git URL is refused"),
    ("fd::0", "main", "transport helpers"),
])
def test_git_errors_are_clear(settings, workdir, tmp_path, url, ref, fragment):
    make_git_repo(tmp_path / "repo")
    url = url.replace("REPO", str(tmp_path / "repo"))
    with pytest.raises(SourceError, match=fragment):
        populate_routes_source(settings, {"kind": "git", "git_url": url, "git_ref": ref}, workdir)
    assert list(workdir.iterdir()) == []
    assert not Path("/tmp/pwned").exists()


def test_workdir_must_not_already_hold_the_files(settings, workdir, tmp_path):
    make_git_repo(tmp_path / "repo")
    (workdir / "arith.py").write_text("old")
    with pytest.raises(SourceError, match="already holds arith.py"):
        populate_routes_source(settings, {"kind": "git", "git_url": str(tmp_path / "repo"), "git_ref": "main"}, workdir)
    shutil.rmtree(workdir)


def test_heartbeat_is_called_during_long_work(settings, workdir, tmp_path):
    beats: list[str] = []
    archive = make_tar(tmp_path / "m.tar.gz", arith_files())
    populate_routes_source(settings, {"kind": "archive", "archive_path": str(archive)}, workdir, heartbeat=beats.append)
    assert beats and beats[0].startswith("extracting ")


def test_unknown_kind(settings, workdir):
    with pytest.raises(SourceError, match="unknown model source kind 'svn'"):
        populate_routes_source(settings, {"kind": "svn"}, workdir)
