"""Reaping on worker start, with real processes and a real database."""
from __future__ import annotations

import sys

from common.config import load_settings
from common.db import Database
from common.schema import upgrade
from common.models import Endpoint, Event, Instance
from workers.backends import make_backend
from workers.backends.base import LaunchSpec
from workers.reaper import reap
from workers.workdir import log_path_for, prepare_workdir


def launch(settings, backend, iid):
    workdir = prepare_workdir(settings, iid, None)
    return backend.launch(LaunchSpec(
        instance_id=iid, endpoint_name="reap", port=0, image="", workdir=str(workdir),
        log_path=str(log_path_for(settings, iid)),
        start_command=f"{sys.executable} -m http.server $PORT --bind 127.0.0.1"))


def test_reap_stops_unwanted_and_notes_missing(tmp_path):
    settings = load_settings({"STANDBY_DATA_DIR": str(tmp_path), "STANDBY_HOST": "reaphost",
                              "STANDBY_STOP_GRACE_SECONDS": "1"})
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    backend = make_backend(settings)
    with db.session() as s:
        e = Endpoint(name="reap", status="running")
        s.add(e)
        s.flush()
        # wanted: recorded ready, process running
        s.add(Instance(id="wantedaa", endpoint_id=e.id, status="ready", host="reaphost"))
        # unwanted: the instance was stopped meanwhile, but its process survived a worker crash
        s.add(Instance(id="stoppedb", endpoint_id=e.id, status="stopped", host="reaphost"))
        # gone: recorded ready, no process
        s.add(Instance(id="goneccc", endpoint_id=e.id, status="ready", host="reaphost"))
    try:
        launch(settings, backend, "wantedaa")
        launch(settings, backend, "stoppedb")
        launch(settings, backend, "unknownd")  # no row at all
        report = reap(settings, db, backend)
        assert sorted(report.stopped) == ["stoppedb", "unknownd"]
        assert report.gone == ["goneccc"]
        assert backend.running_instance_ids() == ["wantedaa"]
        with db.session() as s:
            kinds = sorted(ev.kind for ev in s.query(Event))
        assert kinds == ["process_gone", "reaped"]
    finally:
        backend.stop_all(1.0)
