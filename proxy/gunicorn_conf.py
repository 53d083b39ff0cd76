"""gunicorn configuration of the proxy: `gunicorn -c proxy/gunicorn_conf.py proxy.app:application`.

Everything comes from the same environment variables as the rest of Standby (common/config.py).
gevent workers: the proxy spends its time waiting on sockets (clients, instances, cold starts),
and greenlets make a held request cost a few KB instead of a thread.
"""
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.config import load_settings  # noqa: E402

_settings = load_settings()

bind = f"{_settings.bind}:{_settings.proxy_port}"
workers = _settings.proxy_workers
# gunicorn's gevent worker serving each connection with the proxy's own HTTP/1.1 loop
# (proxy/server.py, proxy/http1.py; docs/architecture.md "The proxy's HTTP/1.1 server").
worker_class = "proxy.server.ProxyWorker"
worker_connections = 2000
keepalive = 75  # longer than common load balancers' idle timeouts (60 s), like nginx's default
timeout = 60
# On shutdown, idle keep-alive connections hold a gevent worker until this runs out, so keep it
# short; requests still streaming get this long to finish.
graceful_timeout = _settings.proxy_graceful_seconds
# No control socket: its default path in $HOME is shared by every gunicorn on the machine.
control_socket_disable = True
chdir = str(ROOT)
accesslog = None
errorlog = "-"
loglevel = os.environ.get("STANDBY_PROXY_LOG_LEVEL", "info")
proc_name = "standby-proxy"

# Prometheus multiprocess mode: set before any worker imports prometheus_client.
_metrics_dir = _settings.data_dir / "proxy-metrics"
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)
raw_env = [f"PROMETHEUS_MULTIPROC_DIR={_metrics_dir}"]


def on_starting(server):
    # Files of a previous run would add their counts to this one's.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    _metrics_dir.mkdir(parents=True, exist_ok=True)


def post_worker_init(worker):
    # Load the routing view and connect to Temporal before the first request, not during it.
    warm = getattr(worker.wsgi, "warm", None)
    if warm is not None:
        warm()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
