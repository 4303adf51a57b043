"""Redis, PostgreSQL and the Celery healthchecks, run as the rendered files run them.

Servers run as a non-root user whose only extra group is the secrets group (10001), as the
containers do through group_add; the secret files keep the mode and group the project gives them.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from servers import (
    AS_ROOT,
    NOBODY,
    Processes,
    as_unprivileged,
    free_port,
    postgres_answers,
    redis_answers,
    server_root,
    wait_ready,
    wait_until,
)

from conftest import compose_model, healthcheck_argv, outside_the_image, render

pytestmark = pytest.mark.e2e

SECRETS_GID = 10001
POSTGRES_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), Path("/usr/bin"))


def as_service(command: list) -> list[str]:
    """Like the containers: a non-root user, with the secrets group as its only extra group."""
    return as_unprivileged(command, groups=[SECRETS_GID])


def copy_secret(project: Path, name: str, root: Path) -> Path:
    """The generated secret, with its owner, group and mode (as the Compose bind mount keeps them)."""
    target = root / "secrets" / name
    target.parent.mkdir(exist_ok=True)
    shutil.copy2(project / "secrets" / name, target)
    stat = (project / "secrets" / name).stat()
    if AS_ROOT:
        os.chown(target, stat.st_uid, stat.st_gid)
    return target


def redis_cli(port: int, *args: str, password: str | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", **({"REDISCLI_AUTH": password} if password else {})}
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, env=env).stdout.strip()


@dataclass
class RedisServer:
    project: Path
    root: Path
    port: int
    secret: Path  # the application's password (redis_password), as the backend and workers get it
    processes: Processes

    def start(self, command_prefix=as_service, cgroup: Path | None = None) -> subprocess.Popen:
        """start-redis.sh as the container runs it; cgroup: a directory standing in for its
        /sys/fs/cgroup (memory.max)."""
        env = {
            "PATH": "/usr/bin:/bin",
            "REDIS_PASSWORD_FILE": str(self.secret),
            "REDIS_ADMIN_PASSWORD_FILE": str(self.secret.parent / "redis_admin_password"),
            "REDIS_DATA_DIR": str(self.root / "data"),
            "REDIS_PORT": str(self.port),
            **({"CGROUP_DIR": str(cgroup)} if cgroup else {}),
        }
        return self.processes.start(command_prefix(["sh", self.root / "start-redis.sh"]), self.root / "redis.log", env=env)

    @property
    def password(self) -> str:
        return (self.project / "secrets" / "redis_password").read_text()

    def client(self, user: str | None = None, password: str | None = None) -> redis.Redis:
        """A client of the library the backend uses. Without a user it logs in as the skeleton's
        settings.py does (`redis://:password@...`: AUTH with the password alone)."""
        return redis.Redis(
            port=self.port, username=user, password=password or self.password, socket_timeout=5, decode_responses=True
        )

    def admin(self) -> redis.Redis:
        return self.client("admin", (self.project / "secrets" / "redis_admin_password").read_text())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    project = render(tmp_path / "p", services=["postgres", "redis", "celery_worker", "celery_beat"])
    processes = Processes()
    with server_root("redis") as root:
        try:
            shutil.copy(project / "redis" / "start-redis.sh", root / "start-redis.sh")
            (root / "data").mkdir()
            if AS_ROOT:
                os.chown(root / "data", NOBODY, NOBODY)
            # The secrets Compose gives the redis service, as it mounts them.
            for secret in compose_model(project, "compose.yaml")["services"]["redis"]["secrets"]:
                copy_secret(project, secret["source"], root)
            server = RedisServer(project, root, free_port(), root / "secrets" / "redis_password", processes)
            yield server
        finally:
            processes.stop_all()


def healthcheck_command(project: Path, service: str) -> list[str]:
    """The service's healthcheck from the rendered Compose model, run on this machine (files of the
    backend image are the project's: see outside_the_image)."""
    service_model = compose_model(project, "compose.yaml")["services"][service]
    return outside_the_image(healthcheck_argv(service_model), project / "backend" / "Dockerfile")


def test_redis_requires_the_secret_password_keeps_it_out_of_argv_and_persists(redis_server: RedisServer) -> None:
    r = redis_server
    process = r.start()
    wait_ready(process, lambda: redis_answers(r.port))
    assert redis_cli(r.port, "ping").startswith("NOAUTH"), "unauthenticated commands must be refused"
    assert redis_cli(r.port, "ping", password=r.password) == "PONG"

    # The rendered healthcheck succeeds, and fails with a wrong password (redis-cli exits 0 anyway).
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD_FILE": str(r.secret), "REDIS_PORT": str(r.port)}
    check = healthcheck_command(r.project, "redis")
    assert subprocess.run(as_service(check), env=env).returncode == 0
    wrong = r.root / "wrong"
    wrong.write_text("not-the-password")
    assert subprocess.run(check, env={**env, "REDIS_PASSWORD_FILE": str(wrong)}).returncode != 0

    # Neither password is in any process's argv.
    passwords = [path.read_bytes() for path in sorted((r.project / "secrets").glob("redis_*password"))]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert not any(password in cmdline.read_bytes() for password in passwords), f"password in argv of {cmdline}"
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue

    # Data written before a restart is there after it (AOF on the data volume).
    assert redis_cli(r.port, "set", "greeting", "hello", password=r.password) == "OK"
    r.processes.stop(process, signal.SIGTERM)
    process = r.start()
    wait_ready(process, lambda: redis_answers(r.port))
    assert wait_until(lambda: redis_cli(r.port, "get", "greeting", password=r.password) == "hello", timeout=10)


def test_redis_fails_closed_when_it_cannot_read_the_secret(redis_server: RedisServer) -> None:
    if not AS_ROOT:
        pytest.skip("needs root to run as a user outside the secrets group")
    # nobody without group 10001: the secret (0440, group 10001) is unreadable.
    process = redis_server.start(as_unprivileged)
    assert process.wait(timeout=10) == 1
    assert "cannot read a password" in (redis_server.root / "redis.log").read_text()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", redis_server.port), timeout=1):
        pass


def host_memory_bytes() -> int:
    kib = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    return int(kib) * 1024


def container_memory_max(project: Path, service: str) -> str:
    """What Docker writes into the service's cgroup memory.max for this project: its memory limit
    from the resolved Compose model (.env included), in bytes."""
    return str(compose_model(project, "compose.yaml")["services"][service]["deploy"]["resources"]["limits"]["memory"])


@pytest.mark.parametrize("env_file", ["", "REDIS_MEMORY=1G\n", "unlimited"])
def test_redis_maxmemory_follows_the_container_memory_limit(redis_server: RedisServer, env_file: str) -> None:
    """maxmemory is 75 % of the limit the container really has, read at start: the rendered
    default, a limit changed in .env (no re-rendering), or the host's memory when unlimited."""
    r = redis_server
    if env_file == "unlimited":
        memory_max, limit = "max", host_memory_bytes()
    else:
        (r.project / ".env").write_text(env_file)
        memory_max = container_memory_max(r.project, "redis")
        limit = int(memory_max)
    cgroup = r.root / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(memory_max + "\n")
    process = r.start(cgroup=cgroup)
    wait_ready(process, lambda: redis_answers(r.port))
    if env_file == "REDIS_MEMORY=1G\n":
        assert limit == 2**30
    assert r.admin().config_get("maxmemory") == {"maxmemory": str(limit * 3 // 4)}
    # A full broker refuses new messages rather than silently dropping queued ones.
    assert r.admin().config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


# What the application's credentials must not run: each would let a compromised backend or worker
# wipe, reconfigure, stop, copy away or spy on the whole server, or grant itself more rights.
DENIED_TO_THE_APP = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "requirepass"),
    ("CONFIG", "SET", "dir", "/tmp"),
    ("DEBUG", "SLEEP", "0"),
    ("KEYS", "*"),
    ("INFO",),
    ("MODULE", "LOAD", "/tmp/module.so"),
    ("ACL", "SETUSER", "intruder", "on", ">intruder", "+@all"),
    ("ACL", "LOG"),
    ("SAVE",),
    ("BGSAVE",),
    ("BGREWRITEAOF",),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("SLAVEOF", "127.0.0.1", "1"),
    ("MIGRATE", "127.0.0.1", "1", "survivor", "0", "1000"),
    ("CLIENT", "LIST"),
    ("CLIENT", "KILL", "ID", "1"),
    ("SWAPDB", "0", "1"),
    ("RESTORE", "restored", "0", "payload"),
    # Lua reaches the app only as EVALSHA of a script loaded with SCRIPT LOAD (kombu and the
    # result backend need them); no EVAL, and no stored functions, which persist in the AOF.
    ("EVAL", "return 1", "0"),
    ("EVAL_RO", "return 1", "0"),
    ("FUNCTION", "LOAD", "#!lua name=planted\nredis.register_function('planted', function() return 1 end)"),
    ("FUNCTION", "RESTORE", "payload"),
    ("FUNCTION", "DELETE", "planted"),
    ("FUNCTION", "FLUSH"),
    ("FCALL", "planted", "0"),
    ("FCALL_RO", "planted", "0"),
    ("SCRIPT", "FLUSH"),
    ("SCRIPT", "KILL"),
    # Last: where they are allowed, they take over the connection or stop the server.
    ("MONITOR",),
    ("SHUTDOWN", "NOSAVE"),
]


def test_redis_app_credentials_are_refused_dangerous_commands_and_admin_keeps_them(redis_server: RedisServer) -> None:
    r = redis_server
    process = r.start()
    wait_ready(process, lambda: redis_answers(r.port))
    app = r.client()
    assert app.acl_whoami() == "default"
    assert app.set("survivor", "still here") and app.ping()

    allowed = []
    for command in DENIED_TO_THE_APP:
        try:
            app.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            continue
        except redis.exceptions.ResponseError as error:
            # Redis 7 also turns DEBUG and MODULE off for every user (enable-*-command no),
            # before the ACL is consulted: ACL DRYRUN below shows the ACL refuses them too.
            if command[0] in ("DEBUG", "MODULE") and "not allowed" in str(error):
                continue
        except redis.exceptions.ConnectionError:
            pass  # SHUTDOWN was obeyed
        allowed.append(command)
    assert allowed == []
    admin = r.admin()
    assert [c for c in DENIED_TO_THE_APP if "no permissions" not in admin.acl_dryrun("default", *c)] == []
    # A Lua script runs with its caller's rights: no way around the rules.
    with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
        app.evalsha(app.script_load("return redis.call('FLUSHALL')"), 0)
    assert app.get("survivor") == "still here" and process.poll() is None

    # The operator's admin user has every right, with its own password only.
    assert admin.acl_whoami() == "admin"
    assert admin.config_get("appendonly") == {"appendonly": "yes"}
    assert {entry["object"] for entry in admin.acl_log(count=100)} >= {"flushall", "config|get", "shutdown", "keys"}
    with pytest.raises(redis.exceptions.AuthenticationError):
        r.client("admin", r.password).ping()


def celery_env(r: RedisServer, **extra: str) -> dict[str, str]:
    """The backend's environment (REDIS_* as Compose sets them) pointed at this Redis."""
    return {
        **os.environ,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(r.port),
        "REDIS_PASSWORD_FILE": str(r.secret),
        "SECRET_KEY_FILE": str(r.project / "secrets" / "app_secret_key"),
        "HOSTNAME": socket.gethostname(),
        **extra,
    }


def start_celery(r: RedisServer, log: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """A celery command run from the project's backend directory, as in its image."""
    command = [sys.executable, "-m", "celery", *args]
    return r.processes.start(command, r.root / log, cwd=r.project / "backend", env=env)


def start_beat(r: RedisServer, app: str, env: dict[str, str]) -> subprocess.Popen:
    schedule = [f"--schedule={r.root / 'celerybeat-schedule'}", f"--pidfile={r.root / 'celerybeat.pid'}"]
    return start_celery(r, "beat.log", f"--app={app}", "beat", "--loglevel=INFO", *schedule, env=env)


def healthy(r: RedisServer, command: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(command, cwd=r.project / "backend", env=env, capture_output=True, timeout=60).returncode == 0


def test_celery_worker_beat_and_a_task_round_trip_need_nothing_the_app_user_is_denied(redis_server: RedisServer) -> None:
    """Everything Celery and kombu send with the application's credentials: a worker as Compose
    runs it (prefork), beat with a schedule, a result fetched by a client, remote control (the
    worker's healthcheck), revocation and a warm shutdown that hands an unacknowledged task back.
    Redis's ACL log must record no denial; it does record one, as a control."""
    r = redis_server
    process = r.start()
    wait_ready(process, lambda: redis_answers(r.port))
    admin = r.admin()
    admin.acl_log_reset()
    # beat runs a module that adds a schedule to the skeleton's Celery app.
    # beat runs a module that adds a schedule to the skeleton's Celery app, and a task that sums a
    # chord's results (the Redis result backend counts a chord's parts with Lua scripts).
    (r.root / "scheduled.py").write_text(
        "from app.celery_app import celery\n"
        'celery.conf.beat_schedule = {"answer": {"task": "app.celery_app.add", "schedule": 1.0, "args": (40, 2)}}\n'
        "@celery.task\n"
        "def total(values: list[int]) -> int:\n"
        "    return sum(values)\n"
    )
    env = celery_env(r, PYTHONPATH=str(r.root))
    worker = start_celery(
        r,
        "worker.log",
        "--app=scheduled:celery",
        "worker",
        "--queues=default",
        "--hostname=default@%h",
        "--loglevel=INFO",
        "--concurrency=2",
        env=env,
    )
    start_beat(r, "scheduled:celery", env)
    worker_log = r.root / "worker.log"
    assert wait_until(lambda: healthy(r, healthcheck_command(r.project, "worker_default"), env), timeout=60), (
        worker_log.read_text()[-2000:]
    )
    assert wait_until(lambda: "succeeded in" in worker_log.read_text() and ": 42" in worker_log.read_text(), timeout=30), (
        r.root / "beat.log"
    ).read_text()[-2000:]
    assert healthy(r, healthcheck_command(r.project, "beat"), env)
    client = (
        "from celery import chord\n"
        "from app.celery_app import add, celery\n"
        "from scheduled import total\n"
        "result = add.delay(2, 3)\n"
        "print(result.get(timeout=30))\n"
        "result.forget()\n"
        "print(chord([add.s(1, 1), add.s(2, 2)])(total.s()).get(timeout=30))\n"
        "celery.control.revoke(add.apply_async((1, 1), countdown=3600).id)\n"  # revoked, kept unacked
        "add.apply_async((2, 2), countdown=3600)\n"  # held unacknowledged by the worker until it stops
    )
    round_trip = subprocess.run(
        [sys.executable, "-c", client], cwd=r.project / "backend", env=env, capture_output=True, text=True, timeout=60
    )
    assert round_trip.stdout.split() == ["5", "6"], round_trip.stderr[-2000:]
    assert wait_until(lambda: worker_log.read_text().count("received") >= 6, timeout=30)
    r.processes.stop(worker)  # warm shutdown: the held tasks go back to the queue

    assert admin.acl_log(count=100) == [], "Celery needed a command the application's user is denied"
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.client().flushall()
    assert [entry["object"] for entry in admin.acl_log(count=100)] == ["flushall"]


def test_celery_worker_and_beat_healthchecks_follow_redis(redis_server: RedisServer) -> None:
    r = redis_server
    process = r.start()
    wait_ready(process, lambda: redis_answers(r.port))
    env = celery_env(r)
    start_celery(
        r,
        "worker.log",
        "--app=app.celery_app",
        "worker",
        "--queues=default",
        "--hostname=default@%h",
        "--pool=solo",
        "--loglevel=INFO",
        env=env,
    )
    start_beat(r, "app.celery_app", env)
    healthcheck = [sys.executable, str(r.project / "backend" / "docker" / "healthcheck.py")]
    worker_check = healthcheck_command(r.project, "worker_default")
    beat_check = healthcheck_command(r.project, "beat")

    assert wait_until(lambda: healthy(r, worker_check, env), timeout=60), (r.root / "worker.log").read_text()[-2000:]
    assert wait_until(lambda: healthy(r, beat_check, env), timeout=30), (r.root / "beat.log").read_text()[-2000:]
    assert healthy(r, [*healthcheck, "redis"], env)

    r.processes.stop(process)  # Redis goes down
    assert not healthy(r, [*healthcheck, "redis"], env)
    assert not healthy(r, beat_check, env)
    assert not healthy(r, worker_check, env)


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[tuple[Path, dict, int, Path]]:
    project = render(tmp_path / "p", services=["postgres"])
    environment = compose_model(project, "compose.yaml")["services"]["postgres"]["environment"]
    processes = Processes()
    with server_root("postgres") as root:
        try:
            secret = copy_secret(project, "postgres_password", root)
            data = root / "data"
            for path in (data, root / "run"):
                path.mkdir(mode=0o700)
                if AS_ROOT:
                    os.chown(path, NOBODY, NOBODY)
            # What the image's entrypoint does on first start: initdb with the password file,
            # scram-sha-256 for TCP connections.
            init = subprocess.run(
                as_service(
                    [
                        POSTGRES_BIN / "initdb",
                        "-D",
                        data,
                        "--username",
                        environment["POSTGRES_USER"],
                        "--pwfile",
                        secret,
                        "--auth-host=scram-sha-256",
                        "--auth-local=trust",
                    ]
                ),
                capture_output=True,
                text=True,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            )
            assert init.returncode == 0, init.stderr
            port = free_port()
            process = processes.start(
                as_service([POSTGRES_BIN / "postgres", "-D", data, "-h", "127.0.0.1", "-p", port, "-k", root / "run"]),
                root / "postgres.log",
            )
            wait_ready(process, lambda: postgres_answers(root / "run", port, environment["POSTGRES_USER"]))
            createdb = subprocess.run(
                as_service(
                    [
                        POSTGRES_BIN / "createdb",
                        "-h",
                        root / "run",
                        "-p",
                        port,
                        "-U",
                        environment["POSTGRES_USER"],
                        environment["POSTGRES_DB"],
                    ]
                ),
                capture_output=True,
                text=True,
            )
            assert createdb.returncode == 0, createdb.stderr
            yield project, environment, port, secret
        finally:
            processes.stop_all()


def test_postgres_password_auth_works_with_the_secret_only(postgres: tuple[Path, dict, int, Path]) -> None:
    project, environment, port, secret = postgres
    assert environment["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in environment

    def psql(password: str | None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", **({"PGPASSWORD": password} if password is not None else {})}
        return subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                environment["POSTGRES_USER"],
                "-d",
                environment["POSTGRES_DB"],
                "-w",
                "-tAc",
                "select current_user",
            ],
            capture_output=True,
            text=True,
            env=env,
        )

    ok = psql(secret.read_text())
    assert ok.returncode == 0 and ok.stdout.strip() == environment["POSTGRES_USER"]
    assert psql("wrong-password").returncode != 0
    assert psql(None).returncode != 0

    # The skeleton backend builds its connection URL from the same secret file.
    code = "from app.settings import settings; print(settings.database_url)"
    env = {
        "POSTGRES_PASSWORD_FILE": str(secret),
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(port),
        "POSTGRES_USER": environment["POSTGRES_USER"],
        "POSTGRES_DB": environment["POSTGRES_DB"],
        "PATH": "/usr/bin:/bin",
    }
    url = subprocess.run(
        [sys.executable, "-c", code], cwd=project / "backend", env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    via_url = subprocess.run(["psql", url, "-w", "-tAc", "select 1"], capture_output=True, text=True)
    assert via_url.returncode == 0 and via_url.stdout.strip() == "1"


# An existing app's Celery module as such apps write it: Celery's defaults (its tasks go to the
# queue "celery"), broker and result backend built from the REDIS_* variables and the secret file.
EXISTING_CELERY_APP = """\
import os
from pathlib import Path

from celery import Celery

password = Path(os.environ["REDIS_PASSWORD_FILE"]).read_text().strip()
url = f"redis://:{password}@{os.environ['REDIS_HOST']}:{os.environ['REDIS_PORT']}/0"
app = Celery("acme", broker=url, backend=url)


@app.task
def add(x: int, y: int) -> int:
    return x + y
"""


def test_an_existing_apps_celery_task_runs_on_the_rendered_worker(tmp_path: Path) -> None:
    """Issue 21 item 2: an existing app that keeps Celery's defaults sends its tasks to the queue
    `celery`; the worker, started with the rendered command (defaults answered), must run them."""
    project = render(tmp_path / "p", backend="existing", asgi_app="acme.api:app", celery_app="acme.tasks:app",
                     services=["redis", "celery_worker"])  # fmt: skip
    (project / "backend" / "acme").mkdir(parents=True)
    (project / "backend" / "acme" / "__init__.py").write_text("")
    (project / "backend" / "acme" / "tasks.py").write_text(EXISTING_CELERY_APP)
    processes = Processes()
    with server_root("redis") as root:
        try:
            shutil.copy(project / "redis" / "start-redis.sh", root / "start-redis.sh")
            (root / "data").mkdir()
            if AS_ROOT:
                os.chown(root / "data", NOBODY, NOBODY)
            for secret in compose_model(project, "compose.yaml")["services"]["redis"]["secrets"]:
                copy_secret(project, secret["source"], root)
            r = RedisServer(project, root, free_port(), root / "secrets" / "redis_password", processes)
            wait_ready(r.start(), lambda: redis_answers(r.port))
            services = compose_model(project, "compose.yaml")["services"]
            workers = [name for name in services if name.startswith("worker_")]
            assert len(workers) == 1, workers
            command = services[workers[0]]["command"]
            assert command[0] == "celery"
            env = celery_env(r)
            start_celery(r, "worker.log", *command[1:], env=env)
            client = "from acme.tasks import add\nprint(add.delay(2, 3).get(timeout=20))\n"
            result = subprocess.run([sys.executable, "-c", client], cwd=project / "backend", env=env,
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
            assert result.stdout.strip() == "5", (
                f"{command}:\n{result.stderr[-1500:]}\n{(root / 'worker.log').read_text()[-1500:]}"
            )
        finally:
            processes.stop_all()
