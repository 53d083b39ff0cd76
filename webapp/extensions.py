"""Shared objects of the web app: the Flask-SQLAlchemy handle and accessors for app.extensions."""
from __future__ import annotations

from flask import current_app
from flask_sqlalchemy import SQLAlchemy

from common.config import Settings
from common.models import Base
from workers.gpus import Inventory, load_inventory

# Flask-SQLAlchemy 3.1 cannot take `Base` as model_class (Base carries a type_annotation_map,
# which SQLAlchemy refuses on the subclass FSA derives). Sharing the metadata is enough: the
# models stay plain SQLAlchemy classes (usable by the worker and proxy), and `db.session` and the
# engine options come from Flask-SQLAlchemy. The tables come from the migrations, never from
# here (common/schema.py).
db = SQLAlchemy(metadata=Base.metadata)


def settings() -> Settings:
    return current_app.extensions["standby_settings"]


def bridge():
    """The TemporalBridge shared by all requests of this app."""
    return current_app.extensions["temporal_bridge"]


def gpu_inventory() -> Inventory:
    """GPU inventory for the fit check at creation.

    Loaded once per app: `nvidia-smi` is too slow to run on every form submit.
    """
    cache = current_app.extensions.setdefault("gpu_inventory", {})
    if "value" not in cache:
        cache["value"] = load_inventory(settings())
    return cache["value"]
