"""Every field of an endpoint's spec, declared once (docs/architecture.md "One spec").

A declaration says what a field is (its type and default), what it may hold (bounds, choices,
length), how the UI shows it (label, help, section, the unit a form speaks), how it may change
once the endpoint exists (its edit class) and which parts read it. Everything else derives from
this table:

- the database columns of `Endpoint` (`spec_columns`, common/models.py), so a new field is one
  declaration plus one migration (`python app.py db revision --autogenerate`);
- the validation and its messages, the same for the JSON API and the forms (webapp/spec.py);
- the create/edit form's fields and the review page (webapp/forms.py, templates);
- the OpenAPI schema of a spec (webapp/openapi_schemas.py);
- the lifecycle's `LifecycleSpec` (workflows/activity_types.py) and the proxy's `EndpointView`
  (proxy/routing_view.py): the fields their readers name.

Edit classes, as an MLOps console states them: `live` changes reach running instances' routing
and lifecycle within seconds; `restart` changes need a restart the user confirms; `immutable`
fields are fixed at creation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text

# Edit classes.
LIVE, RESTART, IMMUTABLE = "live", "restart", "immutable"
# Readers besides the web app (which reads every field).
LIFECYCLE, PROXY, WORKER = "lifecycle", "proxy", "worker"
# Kinds of value.
TEXT, INT, FLOAT, BOOL, CHOICE, ENV, ROUTES, REF = "text", "int", "float", "bool", "choice", "env", "routes", "ref"
NAMES = "names"  # a short list of names (pools)

DAY = 24 * 3600
ENVIRONMENTS = ("development", "staging", "production")
BALANCING = ("round_robin", "least_connections", "ip_hash", "random")
SOURCE_KINDS = ("server", "routes")
MAX_GPUS = 4
DEFAULT_POOL = "default"
# An endpoint spreads over at most this many pools (instances split evenly between them).
MAX_POOLS = 2


@dataclass(frozen=True)
class SpecField:
    name: str
    kind: str
    default: Any
    label: str
    help: str = ""
    edit: str = LIVE
    readers: tuple[str, ...] = ()
    section: str = "endpoint"
    # Numbers: the range, and what the top of it is (said when a value is too large).
    low: float | None = None
    high: float | None = None
    above_low: bool = False  # low itself excluded: "more than 0"
    why: str = ""
    # What a wrong type is told to be ("a whole number of seconds").
    what: str = ""
    choices: tuple[str, ...] = ()
    choice_labels: tuple[str, ...] = ()  # as shown in the UI, in the order of `choices`
    # A field of one kind of source only ("server" or "routes"): the UI shows it for that kind.
    only_for: str = ""
    # Text: its longest (the column's size where it has one), and whether it may span lines.
    max_length: int | None = None
    multiline: bool = False
    # A form may show the value in another unit: ("minutes", 60) shows seconds / 60.
    form_unit: tuple[str, int] | None = None
    # Said when an immutable field is changed: what to do instead.
    instead: str = ""
    # Why a WebSocket service (`websocket: true`) cannot have this field other than its default:
    # such a spec is refused with this reason (webapp/spec.py).
    not_for_websocket: str = ""
    # Database column: the SQLAlchemy type, and a foreign key where the value names a row.
    column: Any = None
    foreign_key: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def nullable(self) -> bool:
        return self.default is None

    def shown_in_form(self, value: Any) -> Any:
        if self.form_unit and isinstance(value, (int, float)):
            return value / self.form_unit[1]
        return value

    @property
    def form_name(self) -> str:
        """The form's field: a value shown in another unit gets that unit's name."""
        if self.form_unit:
            return self.name.removesuffix("_seconds") + "_" + self.form_unit[0]
        return self.name

    @property
    def form_label(self) -> str:
        return f"{self.label} ({self.form_unit[0]})" if self.form_unit else self.label

    def choice_label(self, value: str) -> str:
        if value in self.choices and self.choice_labels:
            return self.choice_labels[self.choices.index(value)]
        return value.replace("_", " ")


def _text(name, default, label, max_length, column=None, **kw) -> SpecField:
    return SpecField(name, TEXT, default, label, max_length=max_length,
                     column=column if column is not None else String(max_length), **kw)


def _int(name, default, label, low, high, why, **kw) -> SpecField:
    return SpecField(name, INT, default, label, low=low, high=high, why=why, column=Integer, **kw)


SPEC: tuple[SpecField, ...] = (
    # ---- the endpoint ----
    SpecField("name", TEXT, "", "Name", "Lowercase letters, digits and '-'; part of the URL; cannot be changed later.",
              edit=IMMUTABLE, readers=(LIFECYCLE, PROXY, WORKER), max_length=63, column=String(63),
              instead="create a new endpoint with the name you want", extra={"unique": True, "index": True}),
    _text("description", "", "Description", 2000, column=Text, multiline=True,
          help="What it serves, for the people who find it in the list."),
    SpecField("environment", CHOICE, "development", "Environment", "A label for the list and its filters.",
              choices=ENVIRONMENTS, column=String(32)),
    # ---- the source ----
    SpecField("source_kind", CHOICE, "server", "Source", "A server (command or image + port), or model code with "
              "typed routes served by Standby's runtime.", edit=IMMUTABLE, readers=(LIFECYCLE, PROXY, WORKER),
              section="source", choices=SOURCE_KINDS, column=String(16),
              choice_labels=("Server (command + port)", "Routes (model code)"),
              instead="create a new endpoint for another kind of source",
              not_for_websocket="Standby's routes runtime answers HTTP requests, not WebSocket; run a server "
                                "that speaks WebSocket (source_kind: server)"),
    SpecField("websocket", BOOL, False, "WebSocket service", "The server speaks WebSocket: a request with "
              "'Upgrade: websocket' is passed through to an instance, and frames flow both ways until either side "
              "closes. Cannot be changed later.", edit=IMMUTABLE, readers=(PROXY,), section="source",
              only_for="server", column=Boolean,
              instead="create a new endpoint with or without websocket"),
    _text("start_command", "", "Start command", 8192, column=Text, multiline=True, edit=RESTART, readers=(WORKER,),
          section="source", only_for="server", help="The shell command that starts your server, as its tutorial writes it, "
                                 "e.g. python -m http.server 8080."),
    _text("image", "", "Container image", 255, edit=RESTART, readers=(WORKER,), section="source", only_for="server",
          help="Only for the docker backend; leave empty for the process backend."),
    _int("port", 8080, "Port", 1, 65535, "a TCP port", edit=RESTART, readers=(WORKER,), section="source",
         only_for="server",
         what="a port number", help="The port your server listens on. Each instance gets its own network "
                                    "namespace, so many can use the same port; or write $PORT in the command to "
                                    "get a free port instead."),
    _text("source_dir", "", "Source directory", 4096, column=Text, edit=RESTART, readers=(WORKER,),
          section="source", only_for="server", help="Optional; copied once when its revision is made, and from "
                                                    "that copy into each instance's working directory."),
    SpecField("env", ENV, [], "Environment variables", "KEY=value pairs given to every instance; secret ones "
              "are never shown again.", edit=RESTART, readers=(WORKER,), section="source", column=JSON),
    SpecField("model_version_id", REF, None, "Model version", "A version from the model registry, or leave this "
              "and give a git URL. Changing it deploys a new revision.", edit=RESTART, readers=(WORKER,),
              section="source", only_for="routes", low=1, high=2**31 - 1,
              why="the range of an id", what="an id", column=Integer, foreign_key="model_versions.id"),
    _text("git_url", "", "Git URL", 2048, column=Text, edit=RESTART, readers=(WORKER,), section="source",
          only_for="routes",
          help="Instead of a model version: its ref is resolved to a commit when its revision is made."),
    _text("git_ref", "", "Git ref", 255, edit=RESTART, readers=(WORKER,), section="source", only_for="routes",
          help="Branch, tag or commit, e.g. main."),
    SpecField("routes", ROUTES, [], "Routes", "HTTP verb + path -> file + function, with typed parameters.",
              edit=RESTART, readers=(PROXY, WORKER), section="routes", only_for="routes", column=JSON),
    # ---- resources ----
    _text("gpu_type", "", "GPU type", 64, edit=RESTART, readers=(LIFECYCLE, WORKER), section="resources",
          help="e.g. T4 or A100 (any case; stored as the host names it); empty for CPU only."),
    _int("gpu_count", 0, "GPU count", 0, MAX_GPUS, "GPUs per instance", edit=RESTART, readers=(LIFECYCLE, WORKER),
         section="resources"),
    SpecField("cpu_cores", FLOAT, 1.0, "CPU cores", edit=RESTART, readers=(LIFECYCLE, WORKER), section="resources",
              low=0, high=1024, above_low=True, why="cores of one host", column=Float),
    SpecField("memory_gb", FLOAT, 1.0, "Memory (GB)", edit=RESTART, readers=(LIFECYCLE, WORKER),
              section="resources",
              low=0, high=4096, above_low=True, why="4 TB, memory of one host", column=Float),
    _int("disk_gb", 10, "Disk (GB)", 1, 65536, "64 TB", edit=IMMUTABLE, readers=(LIFECYCLE, WORKER),
         section="resources",
         help="Cannot be changed later.", instead="create a new endpoint for another disk size"),
    SpecField("pools", NAMES, [DEFAULT_POOL], "Pools", "The resource pool (group of GPU hosts) its instances run "
              "in; empty: the default pool. Two pools, comma-separated, split the instances evenly between them, "
              "so one pool's failure leaves the endpoint serving.", edit=RESTART, readers=(LIFECYCLE,), section="resources",
              high=MAX_POOLS, max_length=63, column=JSON),
    # ---- scaling ----
    _int("min_instances", 0, "Min instances", 0, 100, "instances per endpoint", readers=(LIFECYCLE,),
         section="scaling", help="Kept running even when idle."),
    _int("max_instances", 1, "Max instances", 1, 100, "instances per endpoint", readers=(LIFECYCLE, PROXY),
         section="scaling"),
    _int("instance_count", 0, "Instance count (manual scale)", 0, 100, "instances per endpoint", readers=(LIFECYCLE,),
         section="scaling", help="How many instances to keep running, from min to max instances; 0 = automatic "
                                 "(min instances, more on demand up to max). Set by Scale; fewer stops the extra "
                                 "ones at once."),
    _int("idle_retention_seconds", 600, "Idle retention", 1, 30 * DAY, "30 days", readers=(LIFECYCLE,),
         section="scaling", what="a whole number of seconds", form_unit=("minutes", 60),
         help="How long an instance is kept after its last request."),
    _int("startup_timeout_seconds", 1200, "Startup timeout", 1, DAY, "1 day; the settings narrow it further",
         readers=(LIFECYCLE, PROXY), section="scaling", what="a whole number of seconds", form_unit=("minutes", 60),
         help="How long an instance may take to become ready."),
    # ---- autoscaling (workflows/autoscale.py; README.md "Autoscaling") ----
    SpecField("autoscaling", BOOL, False, "Enable auto-scaling", "Scale between min and max instances on the "
              "targets below. Off: an instance starts on a request to a sleeping endpoint, a scale-out, or when "
              "every instance is at max concurrency.", readers=(LIFECYCLE,), section="autoscaling", column=Boolean),
    _int("target_concurrency", 0, "Target in-flight requests per instance", 0, 100_000,
         "requests in flight per instance", readers=(LIFECYCLE,), section="autoscaling",
         help="Instances = ceil(average in-flight requests / this), as Knative does; 0: not by concurrency."),
    _int("target_cpu_percent", 0, "Target CPU %", 0, 100, "percent of the instance's CPU cores",
         readers=(LIFECYCLE,), section="autoscaling",
         help="Of the instance's CPU cores; instances = ceil(current x usage / target), as Kubernetes' HPA does. "
              "0: not by CPU."),
    _int("target_memory_percent", 0, "Target memory %", 0, 100, "percent of the instance's memory",
         readers=(LIFECYCLE,), section="autoscaling", help="Of the instance's memory; 0: not by memory."),
    _int("target_gpu_percent", 0, "Target GPU %", 0, 100, "percent GPU utilisation", readers=(LIFECYCLE,),
         section="autoscaling", help="GPU utilisation (nvidia-smi) of the instance's GPUs; 0: not by GPU."),
    _int("autoscale_window_seconds", 60, "Autoscale window (seconds)", 6, 3600, "1 hour", readers=(LIFECYCLE,),
         section="autoscaling", what="a whole number of seconds",
         help="Load is averaged over this window; a burst asking for twice the instances within its last "
              "tenth (the panic window) scales up at once."),
    _int("scale_down_delay_seconds", 30, "Scale-down delay (seconds)", 0, 3600, "1 hour", readers=(LIFECYCLE,),
         section="autoscaling", what="a whole number of seconds",
         help="Instances are removed only once fewer were enough for this long. The last instance stays for "
              "the idle retention."),
    _text("warm_windows", "", "Warm windows", 2000, column=Text, multiline=True, readers=(LIFECYCLE,),
          section="autoscaling",
          help="Instances kept running at set times, one window a line: DAYS HH:MM-HH:MM [TIME ZONE]: INSTANCES, "
               "e.g. weekdays 09:00-18:00 Europe/Paris: 2. Days: daily, weekdays, weekends, Mon-Fri, Sat,Sun; "
               "no time zone: UTC."),
    # ---- health ----
    _text("health_path", "", "Health path", 255, readers=(LIFECYCLE,), section="health",
          help="Empty: ready when the port answers HTTP (any status below 500). Set: ready when this path "
               "answers 200, e.g. /health."),
    _int("health_interval_seconds", 10, "Health-check interval (seconds)", 1, DAY, "1 day", readers=(LIFECYCLE,),
         section="health", what="a whole number of seconds"),
    # ---- traffic ----
    SpecField("balancing", CHOICE, "round_robin", "Load balancing", readers=(PROXY,), section="traffic",
              choices=BALANCING, column=String(32)),
    _int("max_concurrency", 0, "Max concurrent requests per instance", 0, 100_000,
         "requests in flight per instance; 0 means unlimited", readers=(PROXY,), section="traffic",
         help="0 = unlimited."),
    _int("hold_queue_size", 100, "Hold queue size", 1, 100_000, "requests held during a cold start",
         readers=(PROXY,), section="traffic", help="Requests held during a cold start."),
    _int("max_websockets", 1000, "Max open WebSockets per instance", 1, 100_000, "open sockets per instance",
         readers=(PROXY,), section="traffic", only_for="server",
         help="WebSocket services only. Past it a new socket goes to another instance, or to a new one "
              "(up to max instances), else it is refused with 503."),
    SpecField("sticky_sessions", BOOL, False, "Sticky sessions", "Pins a client to an instance with a cookie.",
              readers=(PROXY,), section="traffic", column=Boolean),
)

BY_NAME: dict[str, SpecField] = {f.name: f for f in SPEC}
SPEC_FIELDS: tuple[str, ...] = tuple(f.name for f in SPEC)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in SPEC if f.name != "name"}
EDIT_CLASSES = (LIVE, RESTART, IMMUTABLE)
SECTIONS = ("endpoint", "source", "routes", "resources", "scaling", "autoscaling", "health", "traffic")


def read_by(reader: str) -> tuple[SpecField, ...]:
    return tuple(f for f in SPEC if reader in f.readers)


def fields_of(edit: str) -> tuple[str, ...]:
    return tuple(f.name for f in SPEC if f.edit == edit)


def python_type(spec_field: SpecField) -> type:
    return {TEXT: str, CHOICE: str, INT: int, FLOAT: float, BOOL: bool, ENV: list, ROUTES: list, NAMES: list}.get(
        spec_field.kind, object) if spec_field.kind != REF else int


def _fresh_list(items: list):
    """A column default that gives each row its own copy of a list."""
    def make() -> list:
        return list(items)

    return make


def spec_columns() -> dict[str, Any]:
    """The `Endpoint` model's spec columns, by field name (a mixin's namespace)."""
    from sqlalchemy.orm import declared_attr, mapped_column

    columns: dict[str, Any] = {}
    for f in SPEC:
        default = f.default
        options = dict(nullable=f.nullable, **f.extra)
        if default is not None:
            options["default"] = _fresh_list(default) if isinstance(default, list) else default
        if f.foreign_key:
            # A foreign key on a mixin must be made per mapped class.
            columns[f.name] = declared_attr(
                lambda cls, f=f, options=options: mapped_column(f.column, ForeignKey(f.foreign_key), **options))
        else:
            columns[f.name] = mapped_column(f.column, **options)
    return columns
