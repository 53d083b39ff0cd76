"""One page of the endpoint list, for the JSON API and the list page alike (README.md "JSON API").

Pages are keyset pages on the endpoint's name (names are unique and indexed): a page is the
first `limit` endpoints, in name order, whose name comes after the cursor's, so a page costs the
same wherever it is in the list and an endpoint created meanwhile never shifts the next one.
The cursor is opaque to clients (base64 of a small JSON object), so the order can grow another
key without breaking them. Filters narrow the rows before the page is cut, and every page is a
constant four queries: the endpoints, then their instances, keys and revisions (`selectinload`),
never one query per endpoint.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Mapping

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from common.account_models import Project
from common.models import ENDPOINT_STATES, Endpoint
from common.spec_fields import BY_NAME, ENVIRONMENTS
from webapp.extensions import db
from webapp.spec import NAME_RE

DEFAULT_LIMIT = 100
MAX_LIMIT = 500
# The list page shows fewer rows: each is a table row a person reads.
UI_DEFAULT_LIMIT = 50
MAX_NAME_LENGTH = BY_NAME["name"].max_length
_MAX_CURSOR_LENGTH = 200


class InvalidListQuery(ValueError):
    """A query parameter of the list that cannot be used; `errors` maps it to what to change."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


@dataclass(frozen=True)
class ListQuery:
    limit: int = DEFAULT_LIMIT
    after: str = ""  # the name the page starts after (from the cursor)
    status: str = ""
    environment: str = ""
    prefix: str = ""
    project: str = ""

    def filters(self) -> dict[str, str]:
        """The filters that are set, as query parameters."""
        return {k: v for k, v in (("status", self.status), ("environment", self.environment),
                                  ("prefix", self.prefix), ("project", self.project)) if v}

    def link(self, cursor: str | None = None) -> dict[str, str | int]:
        """Query parameters of a page of this list: the first one, or the one `cursor` starts."""
        return {**self.filters(), "limit": self.limit, **({"cursor": cursor} if cursor else {})}

    @property
    def cursor(self) -> str | None:
        """The cursor of this page (None for the first one)."""
        return encode_cursor(self.after) if self.after else None


@dataclass
class Page:
    endpoints: list[Endpoint] = field(default_factory=list)
    next_cursor: str | None = None  # None: this is the last page


def encode_cursor(after: str) -> str:
    raw = json.dumps({"after": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The name a cursor continues after; InvalidListQuery when it is not one we gave out."""
    problem = {"cursor": "cursor is not one this API gave out; use the `next` of a previous answer, "
                         "or leave it out for the first page"}
    if len(cursor) > _MAX_CURSOR_LENGTH:
        raise InvalidListQuery(problem)
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise InvalidListQuery(problem) from None
    after = data.get("after") if isinstance(data, dict) else None
    if not isinstance(after, str) or not NAME_RE.match(after) or len(after) > MAX_NAME_LENGTH:
        raise InvalidListQuery(problem)
    return after


def _choice(args: Mapping[str, str], name: str, options: tuple[str, ...], errors: dict) -> str:
    value = (args.get(name) or "").strip()
    if value and value not in options:
        errors[name] = f"{name} must be one of {', '.join(options)} (or left out for all); got {value[:40]!r}"
        return ""
    return value


def parse_list_query(args: Mapping[str, str], default_limit: int = DEFAULT_LIMIT) -> ListQuery:
    """The list's query parameters; an empty one means "not set" (as a filter form submits it)."""
    errors: dict[str, str] = {}
    limit = default_limit
    raw_limit = (args.get("limit") or "").strip()
    if raw_limit:
        if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6 and 1 <= int(raw_limit) <= MAX_LIMIT:
            limit = int(raw_limit)
        else:
            errors["limit"] = f"limit must be a whole number between 1 and {MAX_LIMIT}, got {raw_limit[:40]!r}"
    after = ""
    if cursor := (args.get("cursor") or "").strip():
        try:
            after = decode_cursor(cursor)
        except InvalidListQuery as exc:
            errors.update(exc.errors)
    status = _choice(args, "status", ENDPOINT_STATES, errors)
    environment = _choice(args, "environment", ENVIRONMENTS, errors)
    prefix = (args.get("prefix") or "").strip()
    if prefix and (len(prefix) > MAX_NAME_LENGTH or not all(c.isascii() and (c.islower() or c.isdigit() or c == "-")
                                                            for c in prefix)):
        errors["prefix"] = (f"prefix must be the start of an endpoint name: at most {MAX_NAME_LENGTH} lowercase "
                            f"letters, digits or '-'; got {prefix[:40]!r}")
        prefix = ""
    project = (args.get("project") or "").strip()
    if project and (len(project) > MAX_NAME_LENGTH or not NAME_RE.match(project)):
        errors["project"] = f"project must be a project's name (lowercase letters, digits, '-'); got {project[:40]!r}"
        project = ""
    if errors:
        raise InvalidListQuery(errors)
    return ListQuery(limit=limit, after=after, status=status, environment=environment, prefix=prefix, project=project)


def endpoint_page(query: ListQuery, project_ids: set[int] | None) -> Page:
    """One page of endpoints in name order, with their instances and keys loaded, of the
    projects `project_ids` (None: all; webapp/auth.py `visible_project_ids`)."""
    statement = (select(Endpoint).order_by(Endpoint.name).limit(query.limit + 1)
                 .options(selectinload(Endpoint.instances), selectinload(Endpoint.api_keys),
                          selectinload(Endpoint.revisions)))
    if project_ids is not None:
        statement = statement.where(Endpoint.project_id.in_(project_ids))
    if query.project:
        statement = statement.where(Endpoint.project_id == select(Project.id).where(Project.name == query.project)
                                    .scalar_subquery())
    if query.after:
        statement = statement.where(Endpoint.name > query.after)
    if query.status:
        statement = statement.where(Endpoint.status == query.status)
    if query.environment:
        statement = statement.where(Endpoint.environment == query.environment)
    if query.prefix:
        statement = statement.where(Endpoint.name.startswith(query.prefix, autoescape=True))
    rows = list(db.session.scalars(statement))
    if len(rows) <= query.limit:
        return Page(rows)
    rows = rows[:query.limit]
    return Page(rows, encode_cursor(rows[-1].name))
