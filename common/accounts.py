"""Users, projects and personal tokens, without Flask: what the web app (webapp/auth.py,
webapp/projects.py) and the operator's commands (`app.py create-user`, `app.py up`'s first admin)
share. README.md "Accounts and projects".
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from common.account_models import (
    ADMIN,
    DEFAULT_MAX_ENDPOINTS,
    DEFAULT_PROJECT,
    DEVELOPER,
    ROLES,
    ApiToken,
    AuditEntry,
    Membership,
    Project,
    User,
)
from common.models import utcnow

USER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
PROJECT_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TOKEN_PREFIX = "sbt_"  # endpoint keys (for the proxy) start with "sk-"
SHOWN_PREFIX_LENGTH = 10
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
# What `app.py up` calls the first admin, and the file it writes that admin's CLI token to.
FIRST_ADMIN = "admin"
TOKEN_FILE = "cli-token"


class AccountError(ValueError):
    """A name or password that cannot be used; the message says what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.errors = {field: message}


# ---- checks ----


def user_name_error(name: str) -> str | None:
    if not isinstance(name, str) or not USER_NAME_RE.match(name):
        return "a user name is 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def project_name_error(name: str) -> str | None:
    if not isinstance(name, str) or not PROJECT_NAME_RE.match(name):
        return "a project name is 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
    return None


def password_error(password: str) -> str | None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        return f"a password has at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"a password has at most {MAX_PASSWORD_LENGTH} characters"
    return None


def role_error(role: str) -> str | None:
    if role not in ROLES:
        return f"role must be one of {', '.join(ROLES)}"
    return None


# ---- passwords ----


def hash_password(password: str) -> str:
    return generate_password_hash(password)  # werkzeug's default: scrypt, salted


def password_matches(user: User | None, password: str) -> bool:
    if user is None:
        # Spend the same time on an unknown name, so timing does not tell which names exist.
        check_password_hash(_dummy_hash(), password)
        return False
    return check_password_hash(user.password_hash, password)


@functools.cache
def _dummy_hash() -> str:
    return generate_password_hash(secrets.token_hex(8))


def generate_password() -> str:
    """A password for a new account, to be printed once: 20 characters, about 120 bits."""
    return secrets.token_urlsafe(15)


# ---- users and projects ----


def get_user(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def get_project(session: Session, name: str) -> Project | None:
    return session.scalar(select(Project).where(Project.name == name))


def ensure_project(session: Session, name: str, max_endpoints: int = DEFAULT_MAX_ENDPOINTS) -> Project:
    project = get_project(session, name)
    if project is None:
        if problem := project_name_error(name):
            raise AccountError("project", problem)
        project = Project(name=name, max_endpoints=max_endpoints)
        session.add(project)
        session.flush()
    return project


def set_role(session: Session, user: User, project: Project, role: str) -> Membership:
    if problem := role_error(role):
        raise AccountError("role", problem)
    membership = session.scalar(select(Membership).where(Membership.user_id == user.id,
                                                         Membership.project_id == project.id))
    if membership is None:
        membership = Membership(user_id=user.id, project_id=project.id, role=role)
        session.add(membership)
    else:
        membership.role = role
    session.flush()
    return membership


def create_user(session: Session, name: str, password: str, *, is_admin: bool = False,
                project: str | None = DEFAULT_PROJECT, role: str = DEVELOPER) -> User:
    """A new user, a member of `project` (made if missing) with `role`; not committed."""
    name = (name or "").strip()
    if problem := user_name_error(name):
        raise AccountError("name", problem)
    if get_user(session, name) is not None:
        raise AccountError("name", f"a user named {name!r} exists; choose another name "
                                   f"(or reset the password: python app.py reset-password {name})")
    if problem := password_error(password):
        raise AccountError("password", problem)
    if problem := role_error(role):
        raise AccountError("role", problem)
    user = User(name=name, password_hash=hash_password(password), is_admin=is_admin)
    session.add(user)
    session.flush()
    if project:
        set_role(session, user, ensure_project(session, project), role)
    return user


# ---- personal tokens ----


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, user: User, name: str = "") -> tuple[ApiToken, str]:
    """A new token; returns its row and the token itself, which is never stored."""
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name, prefix=plaintext[:SHOWN_PREFIX_LENGTH], token_hash=hash_token(plaintext))
    session.add(row)
    session.flush()
    return row, plaintext


def find_token(session: Session, plaintext: str) -> ApiToken | None:
    """The active token row of `plaintext`, or None (unknown or revoked)."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(plaintext)))
    if row is None or row.revoked_at is not None:
        return None
    return row


# ---- the first admin ----


@dataclass
class FirstAdmin:
    name: str
    password: str
    token_file: Path


def write_private(path: Path, text: str) -> None:
    """A file only this user can read (0600), replaced whole."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def bootstrap_first_admin(session: Session, data_dir: Path) -> FirstAdmin | None:
    """On an installation without users: the user `admin` (a site admin, admin of the project
    `default`) with a generated password, and a token for the CLI and the README's curl commands
    written to `<data dir>/cli-token`. None when a user exists (nothing is changed then)."""
    if session.scalar(select(func.count()).select_from(User)):
        return None
    password = generate_password()
    user = create_user(session, FIRST_ADMIN, password, is_admin=True, project=DEFAULT_PROJECT, role=ADMIN)
    _, token = create_token(session, user, "cli (written by app.py up)")
    record_cli_action(session, "user.create", target=user.name, detail="the first admin, made by app.py up")
    session.commit()
    path = Path(data_dir) / TOKEN_FILE
    write_private(path, token + "\n")
    return FirstAdmin(user.name, password, path)


def record_cli_action(session: Session, action: str, target: str = "", detail: str = "",
                      project: Project | None = None) -> None:
    """An audit entry for an operator's command on this machine (app.py)."""
    who = os.environ.get("SUDO_USER") or os.environ.get("USER") or ""
    session.add(AuditEntry(at=utcnow(), user_name=f"operator {who}".strip()[:63], via="cli", remote_addr="local",
                           action=action, target=target[:255], detail=detail,
                           project_id=project.id if project else None, project_name=project.name if project else ""))


def reset_password(session: Session, name: str, password: str | None = None) -> str:
    """A new password for `name` (generated unless given); signs out its sessions. Returns it."""
    user = get_user(session, name)
    if user is None:
        raise AccountError("name", f"no user named {name!r}; create one with python app.py create-user {name}")
    password = password or generate_password()
    if problem := password_error(password):
        raise AccountError("password", problem)
    user.password_hash = hash_password(password)
    record_cli_action(session, "user.reset_password", target=name)
    session.commit()
    return password
