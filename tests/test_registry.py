"""Model registry: JSON API and UI pages through Flask's test client on a real SQLite file."""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from common.models import ModelVersion
from tests.test_sources import (
    arith_files,
    make_git_repo,
    make_tar,
    make_zip,
    tar_device,
    tar_hardlink,
    tar_symlink,
)
from tests.conftest import web_app
from webapp.extensions import db
from workers.sources import populate_routes_source, source_snapshot

MAX_ARCHIVE = 64 * 1024


@pytest.fixture
def app(tmp_path):
    # Local repositories (file://, paths) are how these tests make git sources: allowed here only.
    yield from web_app(tmp_path, STANDBY_MODEL_MAX_ARCHIVE_BYTES=str(MAX_ARCHIVE),
                       STANDBY_MODEL_MAX_UNPACKED_BYTES=str(4 * MAX_ARCHIVE), STANDBY_ALLOW_FILE_GIT="1")


@pytest.fixture
def model(client):
    response = client.post("/api/v1/models", json={"name": "arith", "description": "adds numbers"})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def upload(client, path: Path, name: str | None = None, model_name: str = "arith"):
    with open(path, "rb") as handle:
        return client.post(f"/api/v1/models/{model_name}/versions",
                           data={"archive": (handle, name or path.name)}, content_type="multipart/form-data")


def csrf_token(page: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)


# ---- API ------------------------------------------------------------------------------------------


def test_create_list_and_get_model(client, model):
    assert model["name"] == "arith" and model["versions"] == [] and model["latest_version"] is None
    assert [m["name"] for m in client.get("/api/v1/models").get_json()["models"]] == ["arith"]
    assert client.get("/api/v1/models/arith").get_json()["description"] == "adds numbers"
    response = client.get("/api/v1/models/nope")
    assert response.status_code == 404 and "no model named 'nope'" in response.get_json()["error"]


@pytest.mark.parametrize("body, fragment", [
    ({"name": "Bad Name"}, "lowercase letters"),
    ({"name": ""}, "give the model a name"),
    ({"name": "x" * 64}, "1-63"),
    ({"name": "arith"}, "already exists"),
])
def test_model_name_errors(client, model, body, fragment):
    response = client.post("/api/v1/models", json=body)
    assert response.status_code == 400 and fragment in response.get_json()["errors"]["name"]


def test_model_needs_json_object(client):
    # A body in another type than JSON is refused before the view (webapp/request_guard.py).
    assert client.post("/api/v1/models", data="x", content_type="text/plain").status_code == 415


@pytest.mark.parametrize("maker, name", [(make_tar, "model.tar.gz"), (make_tar, "model.tgz"), (make_zip, "model.zip")])
def test_upload_records_size_and_sha256_and_stores_the_archive(app, client, model, tmp_path, maker, name):
    archive = maker(tmp_path / name, arith_files())
    data = archive.read_bytes()
    response = upload(client, archive)
    assert response.status_code == 201, response.get_json()
    version = response.get_json()
    assert version["number"] == 1 and version["kind"] == "archive"
    assert version["archive_size"] == len(data)
    assert version["archive_sha256"] == hashlib.sha256(data).hexdigest()
    settings = app.extensions["standby_settings"]
    stored = settings.models_dir / version["archive_path"]
    assert stored.parent == settings.models_dir / "arith" / "1" and stored.read_bytes() == data
    assert not list((settings.models_dir / "arith").glob(".upload-*"))
    assert client.get("/api/v1/models/arith/versions/1").get_json() == version


def test_versions_number_up_and_are_immutable(client, model, tmp_path):
    archive = make_tar(tmp_path / "m.tar.gz", arith_files())
    assert upload(client, archive).get_json()["number"] == 1
    assert client.post("/api/v1/models/arith/versions", json={"git_url": "https://example.com/m.git",
                                                              "git_ref": "main"}).get_json()["number"] == 2
    assert upload(client, archive).get_json()["number"] == 3
    assert client.get("/api/v1/models/arith").get_json()["latest_version"] == 3
    for method in ("put", "patch", "delete"):
        assert getattr(client, method)("/api/v1/models/arith/versions/1").status_code == 405
    assert client.get("/api/v1/models/arith/versions/9").status_code == 404


def _assert_refused(app, client, archive, fragment, name=None):
    response = upload(client, archive, name)
    assert response.status_code == 400, response.get_json()
    assert fragment in response.get_json()["errors"]["archive"]
    models_dir = app.extensions["standby_settings"].models_dir / "arith"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []  # nothing kept
    assert client.get("/api/v1/models/arith").get_json()["versions"] == []


@pytest.mark.parametrize("build, fragment", [
    (lambda p: make_tar(p / "a.tar.gz", {"../evil.py": b"x"}), "escapes the target directory"),
    (lambda p: make_tar(p / "a.tar.gz", {"/abs/evil.py": b"x"}), "absolute path"),
    (lambda p: make_tar(p / "a.tar.gz", {"a.py": b"x"}, tar_symlink("link", "/etc/passwd")), "is a link"),
    (lambda p: make_tar(p / "a.tar.gz", {"a.py": b"x"}, tar_hardlink("h", "a.py")), "is a link"),
    (lambda p: make_tar(p / "a.tar.gz", {"a.py": b"x"}, tar_device("dev")), "device"),
    (lambda p: make_zip(p / "a.zip", {"../../evil.py": b"x"}), "escapes the target directory"),
    (lambda p: make_zip(p / "a.zip", {"a.py": b"x"}, symlink=("l", "/etc")), "is a link"),
    (lambda p: make_zip(p / "a.zip", {"zeros.bin": b"\0" * (5 * MAX_ARCHIVE)}), "unpacks to"),  # a zip bomb
])
def test_unsafe_archives_are_refused(app, client, model, tmp_path, build, fragment):
    _assert_refused(app, client, build(tmp_path), fragment)


def test_oversize_archive_is_refused(app, client, model, tmp_path):
    big = tmp_path / "big.tar.gz"
    big.write_bytes(bytes(range(256)) * (2 * MAX_ARCHIVE // 256))
    _assert_refused(app, client, big, "larger than the limit of 64.0 KiB")


def test_oversize_refused_from_content_length_before_reading(app, client, model, tmp_path):
    """Far past the limit, werkzeug refuses from the Content-Length alone; still a clear 400."""
    big = tmp_path / "huge.tar.gz"
    big.write_bytes(b"\0" * (MAX_ARCHIVE + 2 * 1024 * 1024))
    _assert_refused(app, client, big, "larger than the limit of 64.0 KiB")
    token = csrf_token(client.get("/models/arith").get_data(as_text=True))
    with open(big, "rb") as handle:
        response = client.post("/models/arith/versions/upload", data={"archive": (handle, "huge.tar.gz"),
                                                                       "csrf_token": token},
                               content_type="multipart/form-data")
    assert response.status_code == 400 and "larger than the limit of 64.0 KiB" in response.get_data(as_text=True)


def test_oversize_refused_while_streaming_without_content_length(app, client, model):
    """A chunked upload carries no Content-Length: the copy itself stops at the limit."""
    from common.archives import ArchiveError, copy_limited

    with pytest.raises(ArchiveError, match="larger than the limit"):
        copy_limited(io.BytesIO(b"x" * 101), app.extensions["standby_settings"].data_dir / "f", 100)
    assert not (app.extensions["standby_settings"].data_dir / "f").exists()


@pytest.mark.parametrize("name, fragment", [("model.rar", "upload a .tar.gz, .tgz or .zip"),
                                            ("model.zip", "not a readable zip")])
def test_wrong_kind_or_corrupt(app, client, model, tmp_path, name, fragment):
    path = tmp_path / "payload"
    path.write_bytes(b"definitely not an archive")
    _assert_refused(app, client, path, fragment, name=name)


def test_version_needs_archive_or_git(client, model):
    response = client.post("/api/v1/models/arith/versions", data="x", content_type="text/plain")
    assert response.status_code == 415 and "multipart/form-data" in response.get_json()["error"]
    response = client.post("/api/v1/models/arith/versions", data={}, content_type="multipart/form-data")
    assert response.status_code == 400 and "choose a .tar.gz" in response.get_json()["errors"]["archive"]
    assert client.post("/api/v1/models/nope/versions", json={}).status_code == 404


def test_git_registration(client, model, tmp_path):
    make_git_repo(tmp_path / "repo")
    response = client.post("/api/v1/models/arith/versions", json={"git_url": str(tmp_path / "repo"), "git_ref": "v1"})
    assert response.status_code == 201
    version = response.get_json()
    assert version["kind"] == "git" and version["git_ref"] == "v1" and version["resolved_commit"] == ""


@pytest.mark.parametrize("body, field, fragment", [
    ({"git_url": "", "git_ref": "main"}, "git_url", "give the repository URL"),
    ({"git_url": "--upload-pack=x", "git_ref": "main"}, "git_url", "must not start with '-'"),
    ({"git_url": "ext::sh -c x", "git_ref": "main"}, "git_url", "spaces"),
    ({"git_url": "ext::sh", "git_ref": "main"}, "git_url", "transport helpers"),
    ({"git_url": "ftp://host/repo", "git_ref": "main"}, "git_url", "use an https://"),
    ({"git_url": "relative/repo", "git_ref": "main"}, "git_url", "absolute local path"),
    ({"git_url": "https://example.com/m.git", "git_ref": ""}, "git_ref", "give a branch, tag or commit"),
    ({"git_url": "https://example.com/m.git", "git_ref": "-x"}, "git_ref", "not a valid git ref"),
    ({"git_url": "https://example.com/m.git", "git_ref": "a..b"}, "git_ref", "not a valid git ref"),
    ({"git_url": "https://example.com/m.git", "git_ref": "has space"}, "git_ref", "not a valid git ref"),
])
def test_git_registration_errors(client, model, body, field, fragment):
    response = client.post("/api/v1/models/arith/versions", json=body)
    assert response.status_code == 400
    assert fragment in response.get_json()["errors"][field]


@pytest.mark.parametrize("url", ["https://github.com/org/m.git", "ssh://git@host/m.git", "git@host:org/m.git",
                                 "file:///srv/m.git", "/srv/m"])
def test_git_url_forms_accepted(client, model, url):
    assert client.post("/api/v1/models/arith/versions", json={"git_url": url, "git_ref": "main"}).status_code == 201


def test_registered_versions_populate_a_workdir(app, client, model, tmp_path):
    """Both kinds of registered version, as the worker reads them at provision."""
    upload(client, make_zip(tmp_path / "m.zip", arith_files()))
    commits = make_git_repo(tmp_path / "repo")
    client.post("/api/v1/models/arith/versions", json={"git_url": str(tmp_path / "repo"), "git_ref": "main"})
    settings = app.extensions["standby_settings"]
    with app.app_context():
        versions = db.session.scalars(select(ModelVersion).order_by(ModelVersion.number)).all()
        snapshots = [source_snapshot(version) for version in versions]
        info = populate_routes_source(settings, versions[0], tmp_path / "from-row")  # a row works as well
        assert info.kind == "archive" and (tmp_path / "from-row" / "arith.py").exists()
    infos = [populate_routes_source(settings, snapshot, tmp_path / f"work{i}") for i, snapshot in enumerate(snapshots)]
    assert [i.kind for i in infos] == ["archive", "git"] and infos[1].resolved_commit == commits["second"]
    assert all((tmp_path / f"work{i}" / "arith.py").exists() for i in range(2))


# ---- UI -------------------------------------------------------------------------------------------


def test_ui_create_model_upload_and_register(client, tmp_path):
    page = client.get("/models").get_data(as_text=True)
    assert "No models yet" in page
    form = client.get("/models/new").get_data(as_text=True)
    response = client.post("/models/new", data={"name": "embed", "description": "d", "csrf_token": csrf_token(form)})
    assert response.status_code == 302 and response.headers["Location"].endswith("/models/embed")

    model_page = client.get("/models/embed").get_data(as_text=True)
    token = csrf_token(model_page)
    archive = make_tar(tmp_path / "m.tar.gz", arith_files())
    with open(archive, "rb") as handle:
        response = client.post("/models/embed/versions/upload", data={"archive": (handle, "m.tar.gz"), "csrf_token": token},
                               content_type="multipart/form-data")
    assert response.status_code == 302
    response = client.post("/models/embed/versions/git", data={"git_url": "https://example.com/m.git",
                                                                "git_ref": "v2", "csrf_token": token})
    assert response.status_code == 302
    page = client.get("/models/embed").get_data(as_text=True)
    assert hashlib.sha256(archive.read_bytes()).hexdigest() in page and "v2" in page
    listing = client.get("/models").get_data(as_text=True)
    assert "v1" in listing and "v2" in listing


def test_ui_forms_need_csrf(client, model):
    assert client.post("/models/new", data={"name": "x"}).status_code == 400
    assert client.post("/models/arith/versions/git", data={"git_url": "https://e.com/m.git", "git_ref": "m"}).status_code == 400
    assert client.get("/api/v1/models/arith").get_json()["versions"] == []


def test_ui_shows_clear_errors(client, model, tmp_path):
    token = csrf_token(client.get("/models/arith").get_data(as_text=True))
    archive = make_tar(tmp_path / "a.tar.gz", {"../evil.py": b"x"})
    with open(archive, "rb") as handle:
        response = client.post("/models/arith/versions/upload", data={"archive": (handle, "a.tar.gz"), "csrf_token": token},
                               content_type="multipart/form-data")
    assert response.status_code == 400 and "escapes the target directory" in response.get_data(as_text=True)
    response = client.post("/models/arith/versions/git", data={"git_url": "ftp://x/y", "git_ref": "main",
                                                                "csrf_token": token})
    assert response.status_code == 400 and "use an https://" in response.get_data(as_text=True)
    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (2 * MAX_ARCHIVE))
    with open(big, "rb") as handle:
        response = client.post("/models/arith/versions/upload", data={"archive": (handle, "big.zip"), "csrf_token": token},
                               content_type="multipart/form-data")
    assert response.status_code == 400 and "larger than the limit" in response.get_data(as_text=True)
    page = client.post("/models/new", data={"name": "arith", "csrf_token": token})
    assert page.status_code == 400 and "already exists" in page.get_data(as_text=True)
