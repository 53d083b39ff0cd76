"""The OpenAPI parts of accounts, projects and the audit log (README.md "Accounts and projects"):
their schemas and operations, merged into the document by webapp/openapi.py."""
from __future__ import annotations

from common.account_models import ROLES
from webapp.openapi_schemas import TIMESTAMP, array, obj, ref

JSON = "application/json"
PROJECT_NAME = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"}
USER_NAME = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"}
ROLE = {"type": "string", "enum": list(ROLES)}
COUNT = {"type": "integer", "minimum": 0}

SECURITY_SCHEMES = {
    "token": {"type": "http", "scheme": "bearer",
              "description": "A personal token (sbt_...), made on the account page or with POST /api/v1/tokens; "
                             "`app.py up` writes one for its first admin to <data dir>/cli-token."},
    "session": {"type": "apiKey", "in": "cookie", "name": "session",
                "description": "The UI's session after signing in at /login (the pages poll the API with it)."},
}
SECURITY = [{"token": []}, {"session": []}]


def quota_schema() -> dict:
    return obj({"used": COUNT, "limit": COUNT, "stopped": COUNT, "failed": COUNT},
               description="Endpoints that count against the quota: all but terminated ones.")


def schemas() -> dict[str, dict]:
    token = {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 64}, "prefix": {"type": "string"},
             "created_at": TIMESTAMP, "last_used_at": TIMESTAMP}
    quotas = obj({"endpoints": quota_schema(),
                  "gpus": obj({"held": COUNT, "limit": {"type": ["integer", "null"], "minimum": 0,
                                                        "description": "null: no limit"}})})
    project = {"name": PROJECT_NAME, "role": {**ROLE, "type": ["string", "null"]},
               "max_endpoints": COUNT, "max_gpus": {"type": ["integer", "null"], "minimum": 0},
               "quota": quotas, "created_at": TIMESTAMP}
    member = obj({"user": USER_NAME, "role": ROLE})
    user = obj({"name": USER_NAME, "is_admin": {"type": "boolean"}, "created_at": TIMESTAMP,
                "last_login_at": TIMESTAMP, "projects": array(obj({"name": PROJECT_NAME, "role": ROLE}))})
    entry = obj({"id": {"type": "integer"}, "at": TIMESTAMP, "user": {"type": "string"},
                 "via": {"type": "string", "description": "session, token <prefix>…, login form, or cli"},
                 "remote_addr": {"type": "string"}, "action": {"type": "string"},
                 "project": {"type": ["string", "null"]}, "endpoint": {"type": ["string", "null"]},
                 "target": {"type": "string"}, "detail": {"type": "string"}})
    change = obj({"from": {"type": ["integer", "null"]}, "to": {"type": ["integer", "null"]}})
    return {
        "Me": obj({"name": USER_NAME, "is_admin": {"type": "boolean"}, "via": {"type": "string"},
                   "projects": array(obj({"name": PROJECT_NAME, "role": ROLE}))}),
        "Token": obj(token),
        "NewToken": obj({**token, "token": {"type": "string", "description": "Shown in this answer only."}}),
        "TokenList": obj({"tokens": array(ref("Token"))}),
        "TokenRequest": obj({"name": {"type": ["string", "null"], "maxLength": 64}}, required=(), additional=True,
                            example={"name": "laptop"}),
        "EndpointQuota": quota_schema(),
        "Project": obj(project),
        "ProjectDetail": obj({**project, "members": array(member)}),
        "ProjectUpdated": obj({**project, "members": array(member),
                               "changes": {"type": "object", "additionalProperties": change}}),
        "ProjectList": obj({"projects": array(ref("Project"))}),
        "NewProject": obj({"name": PROJECT_NAME, "max_endpoints": {**COUNT, "default": 20},
                           "max_gpus": {"type": ["integer", "null"], "minimum": 0, "default": None}},
                          required=("name",), additional=True, example={"name": "ml-team", "max_endpoints": 20}),
        "ProjectQuotaChange": obj({"max_endpoints": COUNT, "max_gpus": {"type": ["integer", "null"], "minimum": 0}},
                                  required=(), example={"max_endpoints": 30, "max_gpus": 4}),
        "MemberRequest": obj({"role": ROLE}, additional=True, example={"role": "developer"}),
        "Member": obj({"project": PROJECT_NAME, "user": USER_NAME, "role": ROLE}),
        "MemberRemoved": obj({"project": PROJECT_NAME, "removed": {"type": "string"}}),
        "User": user,
        "UserList": obj({"users": array(ref("User"))}),
        "NewUser": obj({"name": USER_NAME, "password": {"type": "string", "minLength": 10},
                        "is_admin": {"type": "boolean", "default": False},
                        "project": {"type": ["string", "null"], "default": "default"},
                        "role": {**ROLE, "default": "developer"}}, required=("name",), additional=True,
                       example={"name": "ana", "project": "ml-team", "role": "developer"}),
        "UserCreated": obj({**user["properties"], "password": {"type": "string",
                                                               "description": "Shown in this answer only."}}),
        "AuditEntry": entry,
        "AuditLog": obj({"entries": array(ref("AuditEntry"))}),
    }


def operations(Operation, query, flag) -> dict:
    """The operations of accounts and projects, as webapp/openapi.py's `Operation`s."""
    limit = query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 200}, "Entries, at most.")
    return {
        "auth_api.me": Operation("Who you are", "accounts", {200: ("Your name and projects.", ref("Me"))}),
        "auth_api.list_tokens": Operation("List your personal tokens", "accounts",
                                          {200: ("Never the tokens themselves.", ref("TokenList"))}),
        "auth_api.create_token": Operation(
            "Create a personal token", "accounts", {201: ("The token, shown this once.", ref("NewToken"))},
            body={JSON: ref("TokenRequest")}, body_required=False),
        "auth_api.revoke_token": Operation(
            "Revoke a personal token", "accounts", {200: ("Revoked: refused from the next call on.", ref("Revoked"))},
            {404: "You have no active token with that id."}),
        "projects_api.api_list_projects": Operation(
            "List your projects", "accounts", {200: ("With your role and their quotas.", ref("ProjectList"))}),
        "projects_api.api_create_project": Operation(
            "Create a project (site admin)", "accounts", {201: ("Created.", ref("ProjectDetail"))},
            {403: "You are no site admin."}, body={JSON: ref("NewProject")}),
        "projects_api.api_get_project": Operation(
            "Get a project", "accounts", {200: ("Its quotas, usage and members.", ref("ProjectDetail"))},
            {404: "No project of that name, or you are no member of it."}),
        "projects_api.api_update_project": Operation(
            "Set a project's quotas (site admin)", "accounts", {200: ("Saved.", ref("ProjectUpdated"))},
            {403: "You are no site admin."}, body={JSON: ref("ProjectQuotaChange")}),
        "projects_api.api_set_member": Operation(
            "Add a member or change a role (project admin)", "accounts", {200: ("Saved.", ref("Member"))},
            {403: "You are no admin of the project.", 404: "No such project, or no user of that name."},
            body={JSON: ref("MemberRequest")}),
        "projects_api.api_remove_member": Operation(
            "Remove a member (project admin)", "accounts", {200: ("Removed.", ref("MemberRemoved"))},
            {403: "You are no admin of the project.", 404: "No such project, or the user is no member."}),
        "projects_api.api_list_users": Operation("List users (site admin)", "accounts",
                                                 {200: ("By name.", ref("UserList"))}, {403: "You are no site admin."}),
        "projects_api.api_create_user": Operation(
            "Create a user (site admin)", "accounts", {201: ("Created; the password is shown this once.",
                                                             ref("UserCreated"))},
            {403: "You are no site admin."}, body={JSON: ref("NewUser")}),
        "projects_api.api_audit": Operation(
            "The audit log (site admin)", "accounts", {200: ("Newest first.", ref("AuditLog"))},
            {403: "You are no site admin."},
            query=(query("project", {"type": "string"}, "Only this project's entries."),
                   query("endpoint", {"type": "string"}, "Only this endpoint name's entries."), limit)),
        "projects_api.api_endpoint_audit": Operation(
            "An endpoint's audit log", "endpoints", {200: ("Newest first.", ref("AuditLog"))}, query=(limit,)),
    }


PATH_PARAMETERS = {
    "project": {"schema": PROJECT_NAME, "description": "The project's name."},
    "user": {"schema": USER_NAME, "description": "The user's name."},
    "token_id": {"schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}, "description": "The token's id."},
}
