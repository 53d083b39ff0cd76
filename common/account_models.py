"""Accounts, projects and the audit log (README.md "Accounts and projects").

Users sign in to the UI (Flask-Login sessions) or call the API with personal tokens; every
endpoint, model (and, through its endpoint, every endpoint key) belongs to a project whose
members have a role. Written by the web app and by `app.py create-user` only.
"""
from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from common.models import DEFAULT_PROJECT_ID, Base, utcnow  # noqa: F401  (re-exported)

# Roles in a project, weakest first: a viewer reads, a developer also creates and acts on
# endpoints, models and keys, an admin also manages the project's members.
VIEWER, DEVELOPER, ADMIN = "viewer", "developer", "admin"
ROLES = (VIEWER, DEVELOPER, ADMIN)
DEFAULT_PROJECT = "default"
DEFAULT_MAX_ENDPOINTS = 20


def role_at_least(role: str | None, needed: str) -> bool:
    return role is not None and ROLES.index(role) >= ROLES.index(needed)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True, index=True)
    # werkzeug's scrypt hash (werkzeug.security.generate_password_hash).
    password_hash: Mapped[str] = mapped_column(String(255))
    # A site admin sees and may do everything, in every project.
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(nullable=True)

    memberships: Mapped[list["Membership"]] = relationship(back_populates="user", cascade="all, delete-orphan")

    # What Flask-Login asks of a user (webapp/auth.py).
    is_active = True
    is_authenticated = True
    is_anonymous = False

    def get_id(self) -> str:
        """The session's user id, bound to the password: changing it signs out every session."""
        return f"{self.id}:{hashlib.sha256(self.password_hash.encode()).hexdigest()[:16]}"


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True, index=True)
    # Endpoints it may have at once, stopped and failed ones included (terminated ones not).
    max_endpoints: Mapped[int] = mapped_column(Integer, default=DEFAULT_MAX_ENDPOINTS)
    # GPUs its instances may hold at once; None: no limit. Past it, instances wait in the pool's
    # queue, which says why.
    max_gpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    memberships: Mapped[list["Membership"]] = relationship(back_populates="project", cascade="all, delete-orphan")


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("user_id", "project_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16), default="developer")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User] = relationship(back_populates="memberships")
    project: Mapped[Project] = relationship(back_populates="memberships")


class ApiToken(Base):
    """A personal token for the JSON API and the CLI (`Authorization: Bearer`): shown once, stored
    as its SHA-256 (it is 256 random bits, so a slow hash would add nothing), revoked rows kept
    for the audit log. Not an endpoint key: those are for calling endpoints through the proxy."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Written at most once a minute per token, so a busy script costs no write per call.
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)

    user: Mapped[User] = relationship()


class AuditEntry(Base):
    """One mutating action: who (user, and how they signed in), what, when, from where. Names are
    copied, not referenced, so an entry outlives the user, endpoint or project it names."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    user_name: Mapped[str] = mapped_column(String(63), default="")
    # "session", "token <prefix>…", or "cli" for app.py's operator commands.
    via: Mapped[str] = mapped_column(String(64), default="")
    remote_addr: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    project_name: Mapped[str] = mapped_column(String(63), default="")
    endpoint_name: Mapped[str] = mapped_column(String(63), default="", index=True)
    target: Mapped[str] = mapped_column(String(255), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
