"""One typed configuration object, loaded from the environment, shared by every process.

The variable names are a contract with ops scripts (docs/architecture.md "Configuration"): add
names, rename none.
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path


def _int(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from exc


def _float(env: dict, name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def _bool(env: dict, name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def _names(env: dict, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _choice(env: dict, name: str, choices: tuple[str, ...], default: str) -> str:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    web_port: int = 5000
    proxy_port: int = 8000
    temporal_port: int = 7233
    # Unset means "start the embedded dev server"; set means "use that server".
    temporal_address: str | None = None
    temporal_namespace: str = "default"
    database_url: str = ""
    backend: str = "process"
    # Raw inventory declaration such as "A100:2,T4:4"; empty means nvidia-smi, else none.
    gpus: str = ""
    purge_after_seconds: int = 14 * 24 * 3600
    task_queue: str = "standby"
    host: str = field(default_factory=socket.gethostname)
    bind: str = "127.0.0.1"
    # The resource pool this worker's host joins, and the pool of endpoints that name none.
    pool: str = "default"
    # A worker heart-beats this often; a host silent for host_down_after_seconds is down (its
    # instances are lost and replaced elsewhere).
    host_heartbeat_seconds: float = 2.0
    host_down_after_seconds: float = 15.0
    # How much CPU a host may grant per core (time-shared), and memory and disk per GB.
    cpu_overcommit: float = 8.0
    memory_overcommit: float = 1.0
    disk_overcommit: float = 1.0
    # Process backend: limit each instance's CPU, memory and processes with cgroups ("auto": where
    # the host offers them; "off": never), and check its disk use against disk_gb this often
    # (README.md "Resources are enforced").
    cgroups: str = "auto"
    disk_check_seconds: float = 10.0
    # Where the proxy and the health probes reach this host's instances (an IP or a name), and
    # the local address instance ports are published on. One host: loopback for both. A worker
    # on another machine than the proxy advertises an address the proxy can reach.
    advertise_address: str = "127.0.0.1"
    instance_bind: str = "127.0.0.1"
    # Bounds for startup_timeout_seconds accepted from users (the 3-120 minutes);
    # tests lower the minimum so a readiness timeout takes seconds, not minutes.
    min_startup_timeout_seconds: int = 180
    max_startup_timeout_seconds: int = 7200
    # SIGTERM -> SIGKILL grace when an instance is stopped.
    stop_grace_seconds: float = 10.0
    # How often the proxy refreshes its routing view, and debounces traffic signals.
    proxy_refresh_seconds: float = 1.0
    traffic_debounce_seconds: float = 1.0
    proxy_max_body_bytes: int = 1024 * 1024 * 1024
    proxy_hold_queue_size: int = 100
    # One process: every figure the proxy decides by (in-flight per instance, round-robin turn,
    # the hold queue) is then one truth for the whole endpoint (docs/architecture.md, "The proxy
    # contract").
    proxy_workers: int = 1
    # A client that stops sending its request body for this long gets 408.
    proxy_body_timeout_seconds: float = 60.0
    # A held request waits this long through Temporal being unreachable (a restart) before 503.
    proxy_lifecycle_outage_seconds: float = 60.0
    secret_key: str = ""
    public_proxy_url: str = ""
    # Workflow histories continue-as-new after this many events.
    continue_as_new_events: int = 2000
    # Model registry (issue 4): upload limits, and how long a git clone at provision may take.
    model_max_archive_bytes: int = 2 * 1024**3
    model_max_unpacked_bytes: int = 8 * 1024**3
    model_git_timeout_seconds: float = 600.0
    # Proxy (issue 3): periodic traffic report while requests are in flight, SSE keep-alive
    # comments for held clients, and how long connecting to an instance may take.
    traffic_periodic_seconds: float = 10.0
    proxy_sse_keepalive_seconds: float = 15.0
    proxy_connect_timeout_seconds: float = 5.0
    # On shutdown, streaming requests get this long; idle keep-alive connections hold no longer.
    proxy_graceful_seconds: int = 10
    # An open WebSocket on an instance that stops or drains gets a 1001 close after this long.
    proxy_websocket_grace_seconds: float = 10.0
    # Host names the web app answers to (any port); "*" for any. A request naming another host
    # (DNS rebinding, a misrouted name) is refused with 400.
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    # Whether model code may come from file:// URLs and local paths (tests, a single machine);
    # off by default: a registered path would read any repository on the worker's disk.
    allow_file_git: bool = False
    # The login form (README.md "Accounts and projects"): after this many wrong passwords for a
    # name from one address, attempts wait login_lock_seconds, doubling up to the maximum.
    login_max_failures: int = 5
    login_lock_seconds: float = 30.0
    login_max_lock_seconds: float = 900.0
    # Fernet keys for secret environment values at rest, newest first (comma-separated); empty:
    # the key file in the data dir (common/secrets.py).
    secrets_keys: str = ""
    # Instances of the process backend run each as a uid of its own from this range (workers/
    # isolation.py); "off": as the worker's own user.
    instance_uids: str = "200000-299999"
    # Cost (README.md "Cost"): prices per hour, "T4=0.35,A100=2.93,cpu=0.05" (per GPU of a type,
    # and per CPU-only instance), and the currency they are in.
    prices: str = ""
    currency: str = "USD"
    # Metrics (README.md "Metrics"): the charts' store in the app database (common/metrics_store.py),
    # how often each process writes to it, how long its rows are kept; how often a worker samples
    # its instances' CPU, memory and GPU use; where a worker serves its Prometheus /metrics.
    metrics_step_seconds: float = 10.0
    metrics_raw_retention_seconds: float = 7200.0
    metrics_retention_seconds: float = 8 * 24 * 3600.0
    usage_sample_seconds: float = 10.0
    worker_metrics_port: int = 9464
    # Instance logs: rotated past this size, this many rotated files kept (workers/log_rotation.py).
    log_max_bytes: int = 64 * 1024 * 1024
    log_keep: int = 3

    @functools.cached_property
    def price_list(self):
        from common.cost import parse_prices

        return parse_prices(self.prices, self.currency)
    # Updates (README.md "Revisions and updates"), unless an update says otherwise: how long each
    # new instance serves before the next step, the error rate of new instances that rolls an
    # update back, how long blue-green keeps the old set, and a canary's pause between steps.
    rollout_settle_seconds: float = 10.0
    rollout_error_rate: float = 0.05
    blue_green_window_seconds: float = 300.0
    canary_pause_seconds: float = 60.0

    @property
    def temporal_target(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    @property
    def temporal_ui_port(self) -> int:
        return self.temporal_port + 1000

    @property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def revisions_dir(self) -> Path:
        """Pinned source directories of revisions (README.md "Revisions and updates")."""
        return self.data_dir / "revisions"

    @property
    def proxy_url(self) -> str:
        return self.public_proxy_url or f"http://127.0.0.1:{self.proxy_port}"

    @property
    def host_task_queue(self) -> str:
        """Activities that touch one host's processes (health, stop) run on its own queue."""
        return f"{self.task_queue}-host-{self.host}"


def _default_instance_bind(advertise: str) -> str:
    """Publish instance ports on the advertised address itself (a name is resolved by the
    backends): reachable where the proxy looks, and on no other interface."""
    return advertise


def load_settings(env: dict | None = None) -> Settings:
    env = os.environ if env is None else env
    data_dir = Path(env.get("STANDBY_DATA_DIR") or "./data").resolve()
    database_url = env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'standby.db'}"
    secret_key = env.get("STANDBY_SECRET_KEY", "")
    advertise = env.get("STANDBY_ADVERTISE_ADDRESS") or "127.0.0.1"
    return Settings(
        data_dir=data_dir,
        web_port=_int(env, "STANDBY_WEB_PORT", 5000),
        proxy_port=_int(env, "STANDBY_PROXY_PORT", 8000),
        temporal_port=_int(env, "STANDBY_TEMPORAL_PORT", 7233),
        temporal_address=env.get("TEMPORAL_ADDRESS") or None,
        temporal_namespace=env.get("STANDBY_TEMPORAL_NAMESPACE") or "default",
        database_url=database_url,
        backend=env.get("STANDBY_BACKEND") or "process",
        gpus=env.get("STANDBY_GPUS", ""),
        purge_after_seconds=_int(env, "STANDBY_PURGE_AFTER_SECONDS", 14 * 24 * 3600),
        task_queue=env.get("STANDBY_TASK_QUEUE") or "standby",
        host=env.get("STANDBY_HOST") or socket.gethostname(),
        bind=env.get("STANDBY_BIND") or "127.0.0.1",
        pool=env.get("STANDBY_POOL") or "default",
        host_heartbeat_seconds=_float(env, "STANDBY_HOST_HEARTBEAT_SECONDS", 2.0),
        host_down_after_seconds=_float(env, "STANDBY_HOST_DOWN_AFTER_SECONDS", 15.0),
        cpu_overcommit=_float(env, "STANDBY_CPU_OVERCOMMIT", 8.0),
        memory_overcommit=_float(env, "STANDBY_MEMORY_OVERCOMMIT", 1.0),
        disk_overcommit=_float(env, "STANDBY_DISK_OVERCOMMIT", 1.0),
        cgroups=_choice(env, "STANDBY_CGROUPS", ("auto", "off"), "auto"),
        disk_check_seconds=_float(env, "STANDBY_DISK_CHECK_SECONDS", 10.0),
        advertise_address=advertise,
        instance_bind=env.get("STANDBY_INSTANCE_BIND") or _default_instance_bind(advertise),
        min_startup_timeout_seconds=_int(env, "STANDBY_MIN_STARTUP_TIMEOUT_SECONDS", 180),
        max_startup_timeout_seconds=_int(env, "STANDBY_MAX_STARTUP_TIMEOUT_SECONDS", 7200),
        stop_grace_seconds=_float(env, "STANDBY_STOP_GRACE_SECONDS", 10.0),
        proxy_refresh_seconds=_float(env, "STANDBY_PROXY_REFRESH_SECONDS", 1.0),
        traffic_debounce_seconds=_float(env, "STANDBY_TRAFFIC_DEBOUNCE_SECONDS", 1.0),
        proxy_max_body_bytes=_int(env, "STANDBY_PROXY_MAX_BODY_BYTES", 1024 * 1024 * 1024),
        proxy_hold_queue_size=_int(env, "STANDBY_PROXY_HOLD_QUEUE_SIZE", 100),
        proxy_workers=_int(env, "STANDBY_PROXY_WORKERS", 1),
        proxy_body_timeout_seconds=_float(env, "STANDBY_PROXY_BODY_TIMEOUT_SECONDS", 60.0),
        proxy_lifecycle_outage_seconds=_float(env, "STANDBY_PROXY_LIFECYCLE_OUTAGE_SECONDS", 60.0),
        secret_key=secret_key,
        public_proxy_url=env.get("STANDBY_PUBLIC_PROXY_URL", ""),
        continue_as_new_events=_int(env, "STANDBY_CONTINUE_AS_NEW_EVENTS", 2000),
        model_max_archive_bytes=_int(env, "STANDBY_MODEL_MAX_ARCHIVE_BYTES", 2 * 1024**3),
        model_max_unpacked_bytes=_int(env, "STANDBY_MODEL_MAX_UNPACKED_BYTES", 8 * 1024**3),
        model_git_timeout_seconds=_float(env, "STANDBY_MODEL_GIT_TIMEOUT_SECONDS", 600.0),
        traffic_periodic_seconds=_float(env, "STANDBY_TRAFFIC_PERIODIC_SECONDS", 10.0),
        proxy_sse_keepalive_seconds=_float(env, "STANDBY_PROXY_SSE_KEEPALIVE_SECONDS", 15.0),
        proxy_connect_timeout_seconds=_float(env, "STANDBY_PROXY_CONNECT_TIMEOUT_SECONDS", 5.0),
        proxy_graceful_seconds=_int(env, "STANDBY_PROXY_GRACEFUL_SECONDS", 10),
        proxy_websocket_grace_seconds=_float(env, "STANDBY_PROXY_WEBSOCKET_GRACE_SECONDS", 10.0),
        allowed_hosts=_names(env, "STANDBY_ALLOWED_HOSTS", DEFAULT_ALLOWED_HOSTS),
        allow_file_git=_bool(env, "STANDBY_ALLOW_FILE_GIT", False),
        login_max_failures=_int(env, "STANDBY_LOGIN_MAX_FAILURES", 5),
        login_lock_seconds=_float(env, "STANDBY_LOGIN_LOCK_SECONDS", 30.0),
        login_max_lock_seconds=_float(env, "STANDBY_LOGIN_MAX_LOCK_SECONDS", 900.0),
        secrets_keys=env.get("STANDBY_SECRETS_KEYS", ""),
        instance_uids=env.get("STANDBY_INSTANCE_UIDS") or "200000-299999",
        prices=_prices(env),
        metrics_step_seconds=_float(env, "STANDBY_METRICS_STEP_SECONDS", 10.0),
        metrics_raw_retention_seconds=_float(env, "STANDBY_METRICS_RAW_RETENTION_SECONDS", 7200.0),
        metrics_retention_seconds=_float(env, "STANDBY_METRICS_RETENTION_SECONDS", 8 * 24 * 3600.0),
        usage_sample_seconds=_float(env, "STANDBY_USAGE_SAMPLE_SECONDS", 10.0),
        worker_metrics_port=_int(env, "STANDBY_WORKER_METRICS_PORT", 9464),
        log_max_bytes=_int(env, "STANDBY_LOG_MAX_BYTES", 64 * 1024 * 1024),
        log_keep=_int(env, "STANDBY_LOG_KEEP", 3),
        currency=env.get("STANDBY_CURRENCY") or "USD",
        rollout_settle_seconds=_float(env, "STANDBY_ROLLOUT_SETTLE_SECONDS", 10.0),
        rollout_error_rate=_float(env, "STANDBY_ROLLOUT_ERROR_RATE", 0.05),
        blue_green_window_seconds=_float(env, "STANDBY_BLUE_GREEN_WINDOW_SECONDS", 300.0),
        canary_pause_seconds=_float(env, "STANDBY_CANARY_PAUSE_SECONDS", 60.0),
    )


def _prices(env: dict) -> str:
    from common.cost import parse_prices

    raw = env.get("STANDBY_PRICES", "")
    parse_prices(raw)  # a mistake is said at start, naming the variable
    return raw
