"""WTForms for the UI. They render fields and carry the CSRF token; the rules live in spec.py.

The endpoint form's fields are made from the spec's declarations (common/spec_fields.py): one
per field, with its label, help text, default and choices, so the form and the API never drift.
Fields are plain text so that every rule (types included) is checked once, by `validate_spec`,
and its messages are shown beside the matching field. A field declared with a form unit (idle
retention and startup timeout: minutes) is shown in that unit and stored in the spec's. A routes
source's templates travel as JSON in one textarea (`routes_json`), written by the routes editor
script or by hand, so the form works without JavaScript; environment variables are two
textareas, plain and secret.
"""
from __future__ import annotations

import math

from flask_wtf import FlaskForm
from wtforms import BooleanField, HiddenField, SelectField, StringField, TextAreaField
from wtforms.fields.choices import SelectChoice

from common import strict_json
from common.spec_fields import (
    BOOL,
    CHOICE,
    ENV,
    IMMUTABLE,
    NAMES,
    REF,
    RESTART,
    ROUTES,
    SECTIONS,
    SPEC,
    SpecField,
)
from webapp.registry import version_choices
from webapp.views_common import SECRET_MASK

# The form fields whose text goes to validate_spec as it is (the spec's own name and unit).
PLAIN_FIELDS = tuple(f.name for f in SPEC if f.kind not in (ENV, ROUTES, BOOL) and not f.form_unit)
SECTION_TITLES = {"endpoint": "Endpoint", "source": "Source", "routes": "Routes", "resources": "Resources",
                  "scaling": "Scaling", "autoscaling": "Auto-scaling", "health": "Health check",
                  "traffic": "Traffic"}
# Spec error keys that belong to a differently named form field.
SPEC_TO_FORM = {**{f.name: f.form_name for f in SPEC if f.form_unit}, "env": "env_plain", "routes": "routes_json"}


def _form_field(f: SpecField):
    if f.kind == BOOL:
        return BooleanField(f.form_label, default=f.default, description=f.help)
    if f.kind == CHOICE:
        return SelectField(f.form_label, choices=[SelectChoice(c, f.choice_label(c)) for c in f.choices],
                           default=f.default, validate_choice=False, description=f.help)
    if f.kind == REF:  # choices: the registered versions, filled per request
        return SelectField(f.form_label, validate_choice=False, description=f.help)
    # A list of names left empty means the installation's own default (the pool of STANDBY_POOL).
    default = "" if f.default is None or f.kind == NAMES else _shown(f, f.default)
    if f.multiline:
        return TextAreaField(f.form_label, default=default, description=f.help)
    return StringField(f.form_label, default=default, description=f.help)


class _EndpointFormBase(FlaskForm):
    env_plain = TextAreaField("Environment variables", description="One KEY=value per line.")
    env_secret = TextAreaField(
        "Secret environment variables",
        description=f"One KEY=value per line; never shown again. Leave {SECRET_MASK} to keep a stored value.",
    )
    routes_json = TextAreaField(
        "Routes (JSON)",
        description='A JSON list, e.g. [{"method": "POST", "path": "/predict", "file": "predict.py", '
                    '"function": "predict", "call": "keyword", "params": [{"name": "text", "type": "str"}]}]',
    )
    draft = HiddenField()
    project = SelectField("Project", validate_choice=False,
                          description="The project the endpoint belongs to; its members see it, others do not.")

    def __init__(self, *args, **kwargs):
        from webapp.auth import DEVELOPER, projects_where

        super().__init__(*args, **kwargs)
        self.project.choices = [SelectChoice(p.name, p.name) for p in projects_where(DEVELOPER)]
        self.model_version_id.choices = [SelectChoice("", "— none: use the git URL below —")] + [
            SelectChoice(str(version_id), label) for version_id, label in version_choices()
        ]
        # Spec errors under routes[...] have no form field; the routes editor places them.
        self.route_errors: dict[str, str] = {}

    # ---- layout, from the declarations ----
    def sections(self) -> list[tuple[str, str, list[tuple[SpecField, object]]]]:
        """(section, title, [(declaration, form field)]) in declaration order."""
        out = []
        for section in SECTIONS:
            fields = [(f, getattr(self, f.form_name)) for f in SPEC if f.section == section
                      and f.kind not in (ENV, ROUTES)]
            if section == "source":
                fields.append((None, self.env_plain))
                fields.append((None, self.env_secret))
            if fields or section == "routes":
                out.append((section, SECTION_TITLES[section], fields))
        return out

    @staticmethod
    def edit_note(spec_field: SpecField | None, editing: bool) -> str:
        """What the edit form says beside a field that does not change live."""
        if not editing or spec_field is None:
            return ""
        if spec_field.edit == IMMUTABLE:
            return f"Cannot be changed: {spec_field.instead}."
        if spec_field.edit == RESTART:
            return "Changing this restarts the endpoint's instances (you confirm it)."
        return ""

    # ---- form <-> spec ----
    def to_spec(self, editing: bool = False) -> tuple[dict, dict[str, str]]:
        """Form values as spec input for validate_spec, plus errors only the form can find."""
        errors: dict[str, str] = {}
        data = {name: (getattr(self, name).data or "").strip() for name in PLAIN_FIELDS}
        for f in SPEC:
            if f.kind == BOOL:
                data[f.name] = bool(getattr(self, f.name).data)
            elif f.form_unit:
                unit, scale = f.form_unit
                raw = (getattr(self, f.form_name).data or "").strip()
                try:
                    shown = float(raw) if len(raw) <= 32 else math.nan
                except ValueError:
                    shown = math.nan
                if not math.isfinite(shown * scale):
                    errors[f.form_name] = f"{f.form_label} must be a number of {unit}, got {raw[:40]!r}"
                    continue
                data[f.name] = round(shown * scale)
        if editing:
            # Immutable after creation: the disabled inputs are not submitted.
            for f in SPEC:
                if f.edit == IMMUTABLE:
                    data.pop(f.name, None)
        env, env_errors = self._env()
        errors.update(env_errors)
        data["env"] = env
        if data.get("source_kind", "server") == "routes" or (editing and "source_kind" not in data
                                                             and self.source_kind.data == "routes"):
            errors.update(self._routes(data))
        else:
            # A server endpoint keeps no leftovers of a routes source the user typed and left.
            data.update(git_url="", git_ref="", routes=[])
            if not editing:
                data["model_version_id"] = None
        return data, errors

    def _routes(self, data: dict) -> dict[str, str]:
        errors: dict[str, str] = {}
        raw = (self.routes_json.data or "").strip()
        try:
            data["routes"] = strict_json.loads(raw) if raw else []
        except ValueError as exc:
            errors["routes_json"] = f"Routes are not valid JSON ({exc}); fix the text or use the routes editor."
            data["routes"] = []
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
                    errors[field.name] = f"line {number}: write KEY=value, got {line[:60]!r}"
                else:
                    env.append({"key": key, "value": value, "secret": secret})
        return env, errors

    def fill_from_spec(self, spec: dict) -> None:
        """Prefill from a stored spec or a draft; secret values become the mask."""
        for f in SPEC:
            if f.kind in (ENV, ROUTES):
                continue
            value = spec.get(f.name, f.default)
            if f.kind == BOOL:
                getattr(self, f.form_name).data = bool(value)
            else:
                getattr(self, f.form_name).data = "" if value is None else _shown(f, value)
        self.routes_json.data = strict_json.dumps(spec.get("routes") or [], indent=2)
        env = spec.get("env") or []
        self.env_plain.data = "\n".join(f"{i['key']}={i.get('value', '')}" for i in env if not i.get("secret"))
        self.env_secret.data = "\n".join(f"{i['key']}={SECRET_MASK}" for i in env if i.get("secret"))

    def keep_immutable(self, spec: dict) -> None:
        """Show the stored values of the fields that cannot change (their inputs are disabled, so
        a submitted edit form does not carry them)."""
        for f in SPEC:
            if f.edit == IMMUTABLE and f.kind not in (ENV, ROUTES):
                value = spec.get(f.name)
                getattr(self, f.form_name).data = "" if value is None else _shown(f, value)

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


def _shown(f: SpecField, value) -> str:
    """A spec value as the form's text: in the form's unit, a list of names comma-separated."""
    if f.kind == NAMES:
        return ", ".join(value or ())
    return _plain(f.shown_in_form(value))


def _plain(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


EndpointForm = type("EndpointForm", (_EndpointFormBase,), {f.form_name: _form_field(f) for f in SPEC
                                                            if f.kind not in (ENV, ROUTES)})
