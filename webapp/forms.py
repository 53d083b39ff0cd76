"""WTForms for the UI. They render fields and carry the CSRF token; the rules live in spec.py.

Fields are plain text so that every rule (types included) is checked once, by
`validate_spec`, and its messages are shown beside the matching field. The UI speaks minutes
for idle retention and startup timeout; the spec stores seconds. A routes source's templates
travel as JSON in one textarea (`routes_json`), written by the routes editor script or by hand,
so the form works without JavaScript.
"""
from __future__ import annotations

import math

from flask_wtf import FlaskForm
from wtforms import BooleanField, HiddenField, SelectField, StringField, TextAreaField
from wtforms.fields.choices import SelectChoice

from common import strict_json
from webapp.registry import version_choices
from webapp.spec import BALANCING, ENVIRONMENTS, SOURCE_KINDS
from webapp.views_common import SECRET_MASK

# Spec error keys that belong to a differently named form field.
SPEC_TO_FORM = {
    "idle_retention_seconds": "idle_retention_minutes",
    "startup_timeout_seconds": "startup_timeout_minutes",
    "env": "env_plain",
}
SOURCE_LABELS = {"server": "Server (command + port)", "routes": "Routes (model code)"}
PLAIN_FIELDS = (
    "name", "description", "environment", "start_command", "image", "port", "source_dir",
    "gpu_type", "gpu_count", "cpu_cores", "memory_gb", "disk_gb", "min_instances",
    "max_instances", "health_path", "health_interval_seconds", "max_concurrency",
    "balancing", "hold_queue_size", "source_kind", "git_url", "git_ref", "model_version_id",
)


class EndpointForm(FlaskForm):
    name = StringField("Name", description="Lowercase letters, digits and '-'; part of the URL; cannot be changed later.")
    description = TextAreaField("Description")
    environment = SelectField("Environment", choices=[SelectChoice(e, e) for e in ENVIRONMENTS], validate_choice=False)
    source_kind = SelectField("Source", choices=[SelectChoice(k, SOURCE_LABELS[k]) for k in SOURCE_KINDS],
                              default="server", validate_choice=False)
    model_version_id = SelectField("Model version", validate_choice=False,
                                   description="A version from the model registry, or leave this and give a git URL.")
    git_url = StringField("Git URL", description="Instead of a model version: cloned at each start.")
    git_ref = StringField("Git ref", description="Branch, tag or commit, e.g. main.")
    routes_json = TextAreaField(
        "Routes (JSON)",
        description='A JSON list, e.g. [{"method": "POST", "path": "/predict", "file": "predict.py", '
                    '"function": "predict", "call": "keyword", "params": [{"name": "text", "type": "str"}]}]',
    )
    start_command = StringField("Start command", description="Shell command that starts your server, as its "
                                "tutorial writes it, e.g. python -m http.server 8080.")
    image = StringField("Container image", description="Only for the docker backend; leave empty for the process backend.")
    port = StringField("Port", default="8080", description="The port your server listens on. Each instance gets "
                       "its own network namespace, so many can use the same port; or write $PORT in the "
                       "command to get a free port instead.")
    source_dir = StringField("Source directory", description="Optional; copied fresh into each instance's working directory.")
    env_plain = TextAreaField("Environment variables", description="One KEY=value per line.")
    env_secret = TextAreaField(
        "Secret environment variables",
        description=f"One KEY=value per line; never shown again. Leave {SECRET_MASK} to keep a stored value.",
    )
    gpu_type = StringField("GPU type", description="e.g. T4 or A100; empty for any type.")
    gpu_count = StringField("GPU count", default="0")
    cpu_cores = StringField("CPU cores", default="1")
    memory_gb = StringField("Memory (GB)", default="1")
    disk_gb = StringField("Disk (GB)", default="10", description="Cannot be changed later.")
    min_instances = StringField("Min instances", default="0")
    max_instances = StringField("Max instances", default="1")
    idle_retention_minutes = StringField("Idle retention (minutes)", default="10")
    startup_timeout_minutes = StringField("Startup timeout (minutes)", default="20")
    health_path = StringField("Health path", default="", description="Empty: ready when the port answers HTTP "
                              "(any status below 500). Set: ready when this path answers 200, e.g. /health.")
    health_interval_seconds = StringField("Health-check interval (seconds)", default="10")
    max_concurrency = StringField("Max concurrent requests per instance", default="0", description="0 = unlimited.")
    balancing = SelectField("Load balancing", choices=[SelectChoice(b, b.replace("_", " ")) for b in BALANCING], validate_choice=False)
    sticky_sessions = BooleanField("Sticky sessions")
    hold_queue_size = StringField("Hold queue size", default="100", description="Requests held during a cold start.")
    draft = HiddenField()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_version_id.choices = [SelectChoice("", "— none: use the git URL below —")] + [
            SelectChoice(str(version_id), label) for version_id, label in version_choices()
        ]
        # Spec errors under routes[...] have no form field; the routes editor places them.
        self.route_errors: dict[str, str] = {}

    def to_spec(self, editing: bool = False) -> tuple[dict, dict[str, str]]:
        """Form values as spec input for validate_spec, plus errors only the form can find."""
        errors: dict[str, str] = {}
        data = {name: (getattr(self, name).data or "").strip() for name in PLAIN_FIELDS}
        data["sticky_sessions"] = bool(self.sticky_sessions.data)
        if editing:
            # Immutable after creation: the disabled inputs are not submitted.
            data.pop("name")
            data.pop("disk_gb")
        for form_field, spec_field in (
            ("idle_retention_minutes", "idle_retention_seconds"),
            ("startup_timeout_minutes", "startup_timeout_seconds"),
        ):
            raw = (getattr(self, form_field).data or "").strip()
            try:
                minutes = float(raw) if len(raw) <= 32 else math.nan
            except ValueError:
                minutes = math.nan
            if not math.isfinite(minutes * 60):
                errors[form_field] = f"{getattr(self, form_field).label.text} must be a number of minutes, got {raw[:40]!r}"
                continue
            if minutes <= 0:
                errors[form_field] = f"{getattr(self, form_field).label.text} must be more than 0 minutes"
                continue
            data[spec_field] = max(1, round(minutes * 60))
        env, env_errors = self._env()
        errors.update(env_errors)
        data["env"] = env
        if data["source_kind"] == "routes":
            errors.update(self._routes_source(data))
        else:
            # A server endpoint keeps no leftovers of a routes source the user typed and left.
            data.update(model_version_id=None, git_url="", git_ref="", routes=[])
        return data, errors

    def _routes_source(self, data: dict) -> dict[str, str]:
        errors: dict[str, str] = {}
        raw = (self.routes_json.data or "").strip()
        try:
            data["routes"] = strict_json.loads(raw) if raw else []
        except ValueError as exc:
            errors["routes_json"] = f"Routes are not valid JSON ({exc}); fix the text or use the routes editor."
            data["routes"] = []
        version = data["model_version_id"]
        known = {choice.value for choice in self.model_version_id.choices}
        if version and version not in known:
            errors["model_version_id"] = "No such model version; pick one from the list."
        if version and (data["git_url"] or data["git_ref"]):
            errors["git_url"] = "Give either a model version or a git URL + ref, not both."
        # The git URL and ref are checked by validate_spec, with the registry's rules.
        return errors

    def _env(self) -> tuple[list[dict], dict[str, str]]:
        env, errors = [], {}
        for field, secret in ((self.env_plain, False), (self.env_secret, True)):
            for number, line in enumerate((field.data or "").splitlines(), start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                key, sep, value = line.partition("=")
                key = key.strip()
                if secret and (not sep or value == SECRET_MASK):
                    env.append({"key": key, "value": None, "secret": True})  # keep the stored value
                elif not sep:
                    errors[field.name] = f"line {number}: write KEY=value, got {line!r}"
                else:
                    env.append({"key": key, "value": value, "secret": secret})
        return env, errors

    def fill_from_spec(self, spec: dict) -> None:
        """Prefill from a stored spec or a draft; secret values become the mask."""
        for name in PLAIN_FIELDS:
            value = spec.get(name)
            getattr(self, name).data = "" if value is None else _plain(value)
        self.sticky_sessions.data = bool(spec.get("sticky_sessions"))
        self.source_kind.data = spec.get("source_kind") or "server"
        self.routes_json.data = strict_json.dumps(spec.get("routes") or [], indent=2)
        self.idle_retention_minutes.data = _plain(spec.get("idle_retention_seconds", 600) / 60)
        self.startup_timeout_minutes.data = _plain(spec.get("startup_timeout_seconds", 1200) / 60)
        env = spec.get("env") or []
        self.env_plain.data = "\n".join(f"{i['key']}={i.get('value', '')}" for i in env if not i.get("secret"))
        self.env_secret.data = "\n".join(f"{i['key']}={SECRET_MASK}" for i in env if i.get("secret"))

    def apply_spec_errors(self, errors: dict[str, str]) -> list[str]:
        """Attach spec errors to their fields; returns those with no field (shown on top)."""
        general = []
        for key, message in errors.items():
            if key == "routes" or key.startswith("routes["):
                self.route_errors[key] = message
                continue
            field = getattr(self, SPEC_TO_FORM.get(key, key), None)
            if field is None or key in ("csrf_token", "draft"):
                general.append(message)
            else:
                field.errors = list(field.errors or []) + [message]
        return general


class ConfirmForm(FlaskForm):
    """Review page: confirm a draft."""

    draft = HiddenField()


class TerminateForm(FlaskForm):
    confirm_name = StringField("Type the endpoint's name to confirm")


class ApiKeyForm(FlaskForm):
    key_name = StringField("Key name", description="Optional, to tell keys apart.")


class ActionForm(FlaskForm):
    """Buttons (stop, restart, wake, scale-out, revoke): only the CSRF token."""


def _plain(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
