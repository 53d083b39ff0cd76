"""WTForms for the UI. They render fields and carry the CSRF token; the rules live in spec.py.

Fields are plain text so that every rule (types included) is checked once, by
`validate_spec`, and its messages are shown beside the matching field. The UI speaks minutes
for idle retention and startup timeout; the spec stores seconds.
"""
from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import BooleanField, HiddenField, SelectField, StringField, TextAreaField
from wtforms.fields.choices import SelectChoice

from webapp.spec import BALANCING, ENVIRONMENTS
from webapp.views_common import SECRET_MASK

# Spec error keys that belong to a differently named form field.
SPEC_TO_FORM = {
    "idle_retention_seconds": "idle_retention_minutes",
    "startup_timeout_seconds": "startup_timeout_minutes",
    "env": "env_plain",
}
PLAIN_FIELDS = (
    "name", "description", "environment", "start_command", "image", "port", "source_dir",
    "gpu_type", "gpu_count", "cpu_cores", "memory_gb", "disk_gb", "min_instances",
    "max_instances", "health_path", "health_interval_seconds", "max_concurrency",
    "balancing", "hold_queue_size",
)


class EndpointForm(FlaskForm):
    name = StringField("Name", description="Lowercase letters, digits and '-'; part of the URL; cannot be changed later.")
    description = TextAreaField("Description")
    environment = SelectField("Environment", choices=[SelectChoice(e, e) for e in ENVIRONMENTS], validate_choice=False)
    start_command = StringField("Start command", description="Shell command; $PORT / {port} is the port to listen on.")
    image = StringField("Container image", description="Only for the docker backend; leave empty for the process backend.")
    port = StringField("Port", default="8080", description="Port inside a container; the process backend assigns one via $PORT.")
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
    health_path = StringField("Health path", default="/ping")
    health_interval_seconds = StringField("Health-check interval (seconds)", default="10")
    max_concurrency = StringField("Max concurrent requests per instance", default="0", description="0 = unlimited.")
    balancing = SelectField("Load balancing", choices=[SelectChoice(b, b.replace("_", " ")) for b in BALANCING], validate_choice=False)
    sticky_sessions = BooleanField("Sticky sessions")
    hold_queue_size = StringField("Hold queue size", default="100", description="Requests held during a cold start.")
    draft = HiddenField()

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
                minutes = float(raw)
            except ValueError:
                errors[form_field] = f"{getattr(self, form_field).label.text} must be a number of minutes, got {raw!r}"
                continue
            if minutes <= 0:
                errors[form_field] = f"{getattr(self, form_field).label.text} must be more than 0 minutes"
                continue
            data[spec_field] = max(1, round(minutes * 60))
        env, env_errors = self._env()
        errors.update(env_errors)
        data["env"] = env
        return data, errors

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
        self.idle_retention_minutes.data = _plain(spec.get("idle_retention_seconds", 600) / 60)
        self.startup_timeout_minutes.data = _plain(spec.get("startup_timeout_seconds", 1200) / 60)
        env = spec.get("env") or []
        self.env_plain.data = "\n".join(f"{i['key']}={i.get('value', '')}" for i in env if not i.get("secret"))
        self.env_secret.data = "\n".join(f"{i['key']}={SECRET_MASK}" for i in env if i.get("secret"))

    def apply_spec_errors(self, errors: dict[str, str]) -> list[str]:
        """Attach spec errors to their fields; returns those with no field (shown on top)."""
        general = []
        for key, message in errors.items():
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
