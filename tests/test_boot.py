"""Every topology boots under a real Docker engine and passes `make verify`'s checks from outside.

Root only (dockerd); marked `boot`. One engine and one set of stand-in base images per test
session; the tests share them through the xdist group "docker" (run with --dist loadgroup).
"""

import itertools
import json
import math
import os
import re
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from docker_engine import BASE_IMAGE, Engine
from servers import free_port

from conftest import IDLE_MEMORY, healthcheck_argv, render, rendered_verify

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("docker")]

# Every topology renders with the stand-ins' Python (Debian bookworm's 3.11).
COMMON = {"python_version": "3.11"}
TOPOLOGIES = {
    "npm-spa-postgres-redis-celery": {
        "proxy_mode": "npm",
        "frontend": "spa",
        "services": ["postgres", "redis", "celery_worker", "celery_beat"],
    },
    "nginx-certbot-spa-postgres": {"proxy_mode": "nginx-certbot", "frontend": "spa", "services": ["postgres"]},
    "none-api-postgres-redis-celery": {
        "proxy_mode": "none",
        "frontend": "none",
        "services": ["postgres", "redis", "celery_worker", "celery_beat"],
    },
}


def http(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read()


def verify(engine: Engine, project: Path) -> subprocess.CompletedProcess[str]:
    """`make test-verify`, against the test engine."""
    command = ["python3", "scripts/verify.py", "--test", "--compose-file", "compose.test.yaml"]
    return subprocess.run(command, cwd=project, env=engine.env, capture_output=True, text=True)


def recreate_with_override(engine: Engine, project: Path, port: int, service: str, settings: str) -> None:
    """Recreate one service with extra settings from compose.override.yaml, and wait for it."""
    (project / "compose.override.yaml").write_text(f"services:\n  {service}:\n    {settings}\n")
    engine.compose(project, "compose.test.yaml", "-f", "compose.override.yaml", "up", "--detach", "--wait",
                   "--no-build", "--no-deps", service, HTTP_PORT=str(port))  # fmt: skip


def no_egress(network: dict) -> bool:
    """Internal network: the host drops every packet leaving its bridge for another subnet, and
    nothing masquerades it (checked in the firewall rules; no packet is sent anywhere)."""
    subnet = network["IPAM"]["Config"][0]["Subnet"]
    bridge = f"br-{network['Id'][:12]}"
    isolation = subprocess.run(["iptables", "-S", "DOCKER-ISOLATION-STAGE-1"], capture_output=True, text=True).stdout
    nat = subprocess.run(["iptables", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True).stdout
    return network["Internal"] and f"! -d {subnet} -i {bridge} -j DROP" in isolation and subnet not in nat


# --- Healthchecks and idle memory: helpers called once the stack is healthy ---------------------

GO_DURATION_SECONDS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
BYTES = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "kB": 10**3, "MB": 10**6, "GB": 10**9}


def seconds(duration: str) -> float:
    """A Go duration as `docker compose config` prints it: "5s", "1m0s"."""
    return sum(float(number) * GO_DURATION_SECONDS[unit] for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def healthcheck_passes(engine: Engine, container: str, service: dict) -> bool:
    """The service's Compose healthcheck run inside container as the engine runs it (the
    container's user, environment and working directory), within the healthcheck's timeout."""
    command = ["docker", "exec", container, *healthcheck_argv(service)]
    try:
        result = subprocess.run(command, env=engine.env, capture_output=True, timeout=seconds(service["healthcheck"]["timeout"]))
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def check_healthchecks(engine: Engine, project: Path, model: dict) -> None:
    """Each service's healthcheck, taken from the Compose model, passes in the service's running
    container and fails in a fresh container of the same service (image, user, environment,
    secrets, networks: the broker and database stay reachable) whose main process is a `sleep`.
    The images the project builds declare no healthcheck of their own (one place: Compose)."""
    problems = []  # every service is checked, so one run shows every broken healthcheck
    one_shot = rendered_verify(project).ONE_SHOT_SERVICES  # they run once and have no healthcheck
    for name, service in model["services"].items():
        if name in one_shot:
            continue
        if "build" in service and engine.inspect("image", service["image"])[0]["Config"].get("Healthcheck"):
            problems.append(f"{name}: its image declares a healthcheck too")
        container = engine.compose(project, "compose.test.yaml", "ps", "--quiet", name).stdout.strip()
        if not healthcheck_passes(engine, container, service):
            problems.append(f"{name}: healthcheck fails while the service is up")
        down = f"{model['name']}-{name}-down"
        engine.compose(project, "compose.test.yaml", "run", "--detach", "--no-deps", "--name", down,
                       "--entrypoint", "sleep", name, "infinity")  # fmt: skip
        try:
            if healthcheck_passes(engine, down, service):
                problems.append(f"{name}: healthcheck passes while the service is down")
        finally:
            engine.docker("rm", "--force", down, check=False)
    assert not problems, "\n".join(problems)


def check_nginx_container(engine: Engine, project: Path, name: str, service: dict) -> None:
    """nginx cannot change its own configuration: nothing under /etc/nginx is owned by or writable
    for anyone but root (the base image leaves it to UID 101, group 0, group-writable). And it
    starts as many workers as the service's CPU limit allows, not one per host CPU."""
    container = engine.compose(project, "compose.test.yaml", "ps", "--quiet", name).stdout.strip()
    loose = ["find", "/etc/nginx", "(", "!", "-user", "root", "-o", "!", "-group", "root",
             "-o", "!", "-type", "l", "-perm", "/022", ")", "-printf", "%u:%g %m %p\\n"]  # fmt: skip
    assert engine.docker("exec", container, *loose).stdout == "", f"{name}: nginx may change its configuration"
    # The pattern does not match itself, so grep finds only the workers' command lines.
    workers = engine.docker("exec", container, "sh", "-c", "grep -l 'nginx: worke[r] process' /proc/[0-9]*/cmdline", check=False)
    limit = float(service["deploy"]["resources"]["limits"]["cpus"])
    assert len(workers.stdout.split()) == min(math.ceil(limit), os.cpu_count() or 1), f"{name}: {workers.stdout}"


def idle_memory(engine: Engine, project: Path) -> str:
    """`docker stats --no-stream` of the stack at rest: memory (used / limit) and processes per
    container, and the memory of all of them."""
    containers = engine.compose(project, "compose.test.yaml", "ps", "--quiet").stdout.split()
    stats = engine.docker("stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}\t{{.PIDs}}", *containers).stdout
    rows = sorted(line.split("\t") for line in stats.splitlines())
    used = 0.0
    for _, usage, _ in rows:
        number, unit = re.fullmatch(r"([\d.]+)\s*(\w+)", usage.split("/")[0].strip()).groups()
        used += float(number) * BYTES[unit]
    lines = [f"{name:<44} {usage:>22} {pids:>4} processes" for name, usage, pids in rows]
    return "\n".join([*lines, f"{'all containers':<44} {used / 2**20:>12.1f}MiB"])


# --- Schema migrations: the one-shot migrate service and the Makefile's targets ------------------


def superuser_sql(engine: Engine, project: Path, statement: str, **env: str) -> str:
    """One SQL statement as the database superuser, in the test stack's postgres container."""
    password = 'PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")"'
    login = f'{password} psql -X -qtA -h 127.0.0.1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "$0"'
    return engine.compose(
        project, "compose.test.yaml", "exec", "-T", "postgres", "sh", "-c", login, statement, **env
    ).stdout.strip()


def make(engine: Engine, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A Makefile target against the test engine; compose targets on the test stack (COMPOSE)."""
    test_stack = " ".join(f"-f {name}" for name in rendered_verify(project).COMPOSE_FILES["test"])
    command = ["make", "-s", *args, f"COMPOSE=docker compose {test_stack}"]
    return subprocess.run(command, cwd=project, env=engine.env, capture_output=True, text=True)


def check_migrations(engine: Engine, project: Path, model: dict, port: int, *, makemigration: bool) -> None:
    """migrate ran to completion before the backend started, as the application role, to the head
    revision; `make migrate` again changes nothing. makemigration: `make makemigration` writes the
    next revision from a changed model into backend/migrations/versions/, and once the image is
    rebuilt `make migrate` applies it."""

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return engine.compose(project, "compose.test.yaml", *args, HTTP_PORT=str(port))

    def as_superuser(statement: str) -> str:
        return superuser_sql(engine, project, statement, HTTP_PORT=str(port))

    def alembic_current() -> str:
        return compose("run", "--rm", "--no-deps", "migrate", "alembic", "current").stdout.strip()

    (migrate,) = engine.inspect("container", *compose("ps", "--all", "--quiet", "migrate").stdout.split())
    (backend,) = engine.inspect("container", *compose("ps", "--quiet", "backend").stdout.split())
    assert (migrate["State"]["Status"], migrate["State"]["ExitCode"]) == ("exited", 0)
    finished = datetime.fromisoformat(migrate["State"]["FinishedAt"])
    assert finished <= datetime.fromisoformat(backend["State"]["StartedAt"]), "the backend started before migrate ended"
    # Only the secret it needs; no superuser password.
    assert [m["Destination"] for m in migrate["Mounts"] if m["Destination"].startswith("/run/secrets/")] == [
        "/run/secrets/postgres_app_password"
    ]
    app_user = model["services"]["backend"]["environment"]["POSTGRES_USER"]
    assert as_superuser("select tableowner from pg_tables where tablename = 'notes'") == app_user
    assert alembic_current() == "0001 (head)"

    # Running the migrations again (make migrate) is a no-op: same revision, data kept.
    as_superuser("insert into notes (body) values ('kept')")
    again = make(engine, project, "migrate")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Running upgrade" not in again.stderr
    assert as_superuser("select body from notes") == "kept" and alembic_current() == "0001 (head)"

    if makemigration:
        models = project / "backend" / "app" / "models.py"
        models.write_text(models.read_text() + "    title: Mapped[str | None] = mapped_column(Text)\n")
        written = make(engine, project, "makemigration", "MESSAGE=add title")
        assert written.returncode == 0, written.stdout + written.stderr
        (revision,) = (project / "backend" / "migrations" / "versions").glob("*_add_title.py")
        assert revision.stat().st_uid == os.getuid()
        assert "op.add_column('notes', sa.Column('title', sa.Text(), nullable=True))" in revision.read_text()
        head = re.search(r"^revision: str = '(\w+)'$", revision.read_text(), re.MULTILINE)[1]
        engine.build(model["services"]["backend"]["image"], project / "backend")
        applied = make(engine, project, "migrate")
        assert applied.returncode == 0 and "Running upgrade 0001 -> " in applied.stderr, applied.stdout + applied.stderr
        assert alembic_current() == f"{head} (head)"
        assert as_superuser("select title is null from notes where body = 'kept'") == "t"


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_boot_topology_is_healthy_verified_and_isolated(
    engine: Engine, tmp_path: Path, name: str, record_property: Callable[[str, object], None]
) -> None:
    answers = {**COMMON, **TOPOLOGIES[name]}
    project = render(tmp_path / "p", project_name="Boot Demo", **answers)
    model = json.loads(engine.compose(project, "compose.test.yaml", "config", "--format", "json").stdout)
    for service in model["services"].values():
        if "build" in service:
            context = Path(service["build"]["context"])
            engine.build(service["image"], context, context / service["build"]["dockerfile"])
    port = free_port()
    try:
        engine.compose(
            project, "compose.test.yaml", "up", "--detach", "--wait", "--wait-timeout", "240", "--no-build", HTTP_PORT=str(port)
        )
        record_property(IDLE_MEMORY, idle_memory(engine, project))  # printed at the end (conftest.py)

        # The operator's check (make test-verify): healthy, hardened, numeric non-root, limited.
        result = subprocess.run(
            ["python3", "scripts/verify.py", "--test", "--compose-file", "compose.test.yaml"],
            cwd=project,
            env={**engine.env, "HTTP_PORT": str(port)},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{len(model['services'])} passed, 0 failed" in result.stdout

        # Through the entry point to the backend, postgres, redis and a celery task.
        assert http(port, "/api/health") == (200, b'{"status":"ok"}')
        assert http(port, "/api/health/db")[0] == 200
        if "redis" in answers["services"]:
            assert http(port, "/api/health/redis")[0] == 200
        if "celery_worker" in answers["services"]:
            # No demo route in the test stack (development only): a task sent from the API's container.
            with pytest.raises(urllib.error.HTTPError, match="404"):
                http(port, "/api/tasks/add?a=2&b=3", method="POST")
            task = "from app.celery_app import add; print(add.delay(2, 3).get(timeout=60))"
            assert engine.compose(project, "compose.test.yaml", "exec", "-T", "backend", "python", "-c", task,
                                  HTTP_PORT=str(port)).stdout.strip() == "5"  # fmt: skip
        if answers["frontend"] == "spa":
            status, page = http(port, "/")
            assert status == 200 and b"Boot Demo" in page

        check_migrations(engine, project, model, port, makemigration=name.startswith("none"))

        # Every service runs, but the one-shots, which exited 0 (checked by verify above).
        containers = engine.compose(project, "compose.test.yaml", "ps", "--quiet").stdout.split()
        assert len(containers) == len(set(model["services"]) - rendered_verify(project).ONE_SHOT_SERVICES)
        for container in containers:
            write = engine.docker("exec", container, "sh", "-c", "touch /hardened-compose-probe", check=False)
            assert write.returncode != 0 and "Read-only file system" in write.stderr, container
        assert no_egress(engine.inspect("network", f"{model['name']}_data")[0])
        check_healthchecks(engine, project, model)
        for service in ("frontend", "proxy"):
            if service in model["services"]:
                check_nginx_container(engine, project, service, model["services"][service])

        if answers["proxy_mode"] == "nginx-certbot":
            # The production mode of the proxy before any certificate exists (the test stack runs it
            # HTTP-only): it must start read-only and non-root, answer "pending" and serve ACME.
            recreate_with_override(engine, project, port, "proxy", 'environment:\n      PROXY_HTTP_ONLY: "0"')
            with pytest.raises(urllib.error.HTTPError) as pending:
                http(port, "/")
            assert pending.value.code == 503 and pending.value.read() == b"TLS certificate pending\n"
            with pytest.raises(urllib.error.HTTPError) as challenge:
                http(port, "/.well-known/acme-challenge/unknown-token")
            assert challenge.value.code == 404
            assert http(port, "/health") == (200, b"ok\n")

        if name.startswith("none"):
            # A weakened backend (writable root, running as root) must make verify fail, saying why.
            recreate_with_override(engine, project, port, "backend", 'read_only: false\n    user: "0"')
            weakened = verify(engine, project)
            assert weakened.returncode == 1
            assert "root filesystem is writable" in weakened.stdout and "not a non-root numeric UID" in weakened.stdout

            # A dangerous service added in compose.override.yaml (a file verify is not given): it
            # belongs to the project, so verify judges it and names every reason.
            intruder = "\n    ".join([
                'image: "python:3.11-slim"',
                'command: ["sleep", "infinity"]',
                "network_mode: none",
                'user: "1000:0"',
                "privileged: true",
                "pid: host",
                "cap_add: [NET_ADMIN]",
                'security_opt: ["seccomp=unconfined"]',
                f"volumes: ['{engine.socket}:/run/engine.sock:ro']",
            ])  # fmt: skip
            recreate_with_override(engine, project, port, "intruder", intruder)
            dangerous = verify(engine, project)
            assert dangerous.returncode == 1
            lines = dangerous.stdout.splitlines()
            row = next(i for i, line in enumerate(lines) if line.split()[1:2] == ["intruder"])
            reasons = [
                line.removeprefix("    - ") for line in itertools.takewhile(lambda x: x.startswith("    - "), lines[row + 1 :])
            ]
            for reason in (
                "privileged: every capability and device of the host",
                "shares the host's pid namespace",
                f"bind-mounts the host's {engine.socket}",
                "security_opt seccomp=unconfined turns a protection off",
                "adds capabilities ['NET_ADMIN'] (the template needs none)",
                "user 1000:0 runs with group root (0)",
            ):
                assert reason in reasons, dangerous.stdout
    finally:
        engine.compose(project, "compose.test.yaml", "down", "--volumes", "--remove-orphans", check=False)
    label = f"label=com.docker.compose.project={model['name']}"
    assert engine.docker("ps", "-aq", "--filter", label).stdout.strip() == ""
    assert engine.docker("volume", "ls", "-q", "--filter", label).stdout.strip() == ""
    assert engine.docker("network", "ls", "-q", "--filter", label).stdout.strip() == ""


def test_boot_build_context_of_the_nginx_images_admits_only_what_they_copy(engine: Engine, tmp_path: Path) -> None:
    """The frontend and proxy build from the project root: its .dockerignore must keep secrets,
    .env, backups, git and local build state out of what the builder receives."""
    project = render(tmp_path / "p", proxy_mode="nginx-certbot", frontend="spa", services=["postgres"], **COMMON)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    local_state = ["backups/db.dump", "frontend/.env", "frontend/.env.local", "frontend/node_modules/x.js", "frontend/dist/a.js"]
    for name in local_state:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("local\n")
    probe = tmp_path / "probe.Dockerfile"  # outside the context: only the context is listed
    probe.write_text(f"FROM {BASE_IMAGE}\nCOPY . /context/\n")
    engine.build("hc-context-probe", project, probe)
    listing = engine.docker("run", "--rm", "hc-context-probe", "find", "/context", "-type", "f").stdout.split()
    received = {name.removeprefix("/context/") for name in listing}

    def files(*roots: str) -> set[str]:
        paths = [p for root in roots for p in ([project / root] if (project / root).is_file() else (project / root).rglob("*"))]
        return {str(p.relative_to(project)) for p in paths if p.is_file()}

    admitted = files("nginx/nginx.conf", "nginx/runtime-settings.sh", "nginx/snippets", "nginx/frontend", "nginx/proxy",
                     "frontend", "proxy")  # fmt: skip
    never = files("secrets", ".git", "nginx/locations.d", "backend", ".env") | set(local_state)
    never |= {"frontend/Dockerfile", "proxy/Dockerfile", "compose.yaml", ".copier-answers.yml"}
    assert received == admitted - never
    assert "nginx/nginx.conf" in received and "frontend/src/main.js" in received and not received & never


# Local files that must never reach the backend image (make swarm-push sends it to a registry).
BACKEND_NEVER = [".env", ".env.production", "x.pem", "id.key", "secrets/token", ".git/config", "notes.txt",
                 "app/.env.local", "app/tls/server.key", "app/__pycache__/main.cpython-311.pyc"]  # fmt: skip


@pytest.mark.parametrize("backend", ["skeleton", "existing"])
def test_boot_build_context_of_the_backend_admits_only_what_the_image_needs(engine: Engine, tmp_path: Path, backend: str) -> None:
    """backend/.dockerignore is an allow-list: the app's code, the lock and the image's scripts
    enter the build context; env files, keys, secrets, git and anything unlisted never do."""
    existing = {"asgi_app": "app.asgi:app", "backend_context": "manage.py templates"} if backend == "existing" else {}
    project = render(tmp_path / "p", backend=backend, services=["postgres"], frontend="none", proxy_mode="none",
                     **existing, **COMMON)  # fmt: skip
    context = project / "backend"
    needed = ["app/__init__.py", "app/asgi.py", "manage.py", "templates/index.html", "requirements.txt"] if existing else []
    for name in BACKEND_NEVER + needed:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text("local\n")
    probe = tmp_path / "probe.Dockerfile"  # outside the context: only the context is listed
    probe.write_text(f"FROM {BASE_IMAGE}\nCOPY . /context/\n")
    engine.build("hc-context-probe", context, probe)
    listing = engine.docker("run", "--rm", "hc-context-probe", "find", "/context", "-type", "f").stdout.split()
    received = {name.removeprefix("/context/") for name in listing}
    admitted = {"requirements.txt", "docker/healthcheck.py", "docker/web-concurrency.sh"} | {
        str(path.relative_to(context)) for path in (context / "app").rglob("*.py") if "__pycache__" not in path.parts
    }
    admitted |= (
        {"manage.py", "templates/index.html"}
        if existing
        else {"alembic.ini"} | {str(path.relative_to(context)) for path in (context / "migrations").rglob("*") if path.is_file()}
    )
    assert received == admitted
    assert not received & set(BACKEND_NEVER)


def test_backup_and_restore_round_trip(engine: Engine, tmp_path: Path) -> None:
    """make backup / make restore against the real database: private files, nothing left by a
    failed dump, damaged or empty files refused, encrypted dumps, data back after the volume
    is gone, owned by the application role."""
    project = render(
        tmp_path / "p", project_name="Backup Demo", services=["postgres"], frontend="none", proxy_mode="none", **COMMON
    )
    script = ["python3", "scripts/backup.py", "--compose-file", "compose.test.yaml"]

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return engine.compose(project, "compose.test.yaml", *args, check=check)

    def sql(statement: str) -> str:
        as_app = (
            'PGPASSWORD="$(cat "$POSTGRES_APP_PASSWORD_FILE")" '
            'psql -qtA -h 127.0.0.1 -U "$POSTGRES_APP_USER" -d "$POSTGRES_DB" -c "$0"'
        )
        return compose("exec", "-T", "postgres", "sh", "-c", as_app, statement).stdout.strip()

    def tool(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*script, *args], cwd=project, env={**engine.env, **env}, capture_output=True, text=True)

    try:
        compose("up", "--detach", "--wait", "--no-build", "postgres")
        sql("create table orders (id serial primary key, item text); insert into orders (item) values ('book'), ('pen')")

        made = tool("backup")
        assert made.returncode == 0, made.stderr
        backups = project / "backups"
        (dump,) = backups.glob("backup_demo-*.dump")
        assert stat.S_IMODE(backups.stat().st_mode) == 0o700 and stat.S_IMODE(dump.stat().st_mode) == 0o600
        assert stat.S_IMODE(backups.joinpath(f"{dump.name}.hmac").stat().st_mode) == 0o600
        assert dump.read_bytes().startswith(b"PGDMP")

        identity = tmp_path / "age-identity.txt"
        subprocess.run(["age-keygen", "-o", identity], check=True, capture_output=True)
        recipient = subprocess.run(["age-keygen", "-y", identity], check=True, capture_output=True, text=True).stdout.strip()
        encrypted = tool("backup", BACKUP_AGE_RECIPIENT=recipient)
        assert encrypted.returncode == 0, encrypted.stderr
        (sealed,) = backups.glob("*.dump.age")
        assert b"PGDMP" not in sealed.read_bytes() and stat.S_IMODE(sealed.stat().st_mode) == 0o600

        # Damaged, empty, unauthenticated or foreign files are refused before anything is changed
        # (--foreign: the operator vouches for the file; it is still checked).
        damaged = tmp_path / "damaged.dump"
        damaged.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
        empty = tmp_path / "empty.dump"
        empty.write_bytes(b"")
        not_ours = "not written by this deployment"
        for bad, options, reason in (
            (damaged, [], not_ours),
            (damaged, ["--foreign"], "is damaged"),
            (empty, [], "missing or empty"),
            (project / "compose.yaml", ["--foreign"], "not a pg_dump"),
        ):
            refused = tool("restore", *options, str(bad))
            assert refused.returncode == 1 and reason in refused.stderr, refused.stderr
        assert sql("select count(*) from orders") == "2"

        # The volume is gone: a new, empty database; the encrypted backup brings the data back.
        compose("down", "--volumes")
        compose("up", "--detach", "--wait", "--no-build", "postgres")
        assert tool("restore", str(sealed)).returncode == 1  # no identity: refused
        restored = tool("restore", str(sealed), BACKUP_AGE_IDENTITY=str(identity))
        assert restored.returncode == 0, restored.stderr
        assert sql("select string_agg(item, ',' order by id) from orders") == "book,pen"
        assert sql("select tableowner from pg_tables where tablename = 'orders'") == "backup_demo_app"
        assert sql("insert into orders (item) values ('ink') returning id") == "3"  # the sequence came back too

        # A dump that cannot be made leaves no file that looks like a backup.
        compose("stop", "postgres")
        failed = tool("backup")
        assert failed.returncode == 1 and "pg_dump exited" in failed.stderr
        made_files = sorted(f"{p.name}{tag}" for p in (dump, sealed) for tag in ("", ".hmac"))
        assert sorted(p.name for p in backups.iterdir()) == made_files
    finally:
        compose("down", "--volumes", check=False)


def test_rotate_every_secret_on_the_running_stack(engine: Engine, tmp_path: Path) -> None:
    """make rotate-secret for each secret: the old value stops working, the new one works, the
    app keeps reaching its data, and nothing is lost."""
    project = render(
        tmp_path / "p", project_name="Rotate Demo", services=["postgres", "redis"], frontend="none", proxy_mode="none", **COMMON
    )
    model = json.loads(engine.compose(project, "compose.test.yaml", "config", "--format", "json").stdout)
    engine.build(model["services"]["backend"]["image"], Path(model["services"]["backend"]["build"]["context"]))
    port = free_port()

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return engine.compose(project, "compose.test.yaml", *args, check=check, HTTP_PORT=str(port))

    def psql(user_variable: str, password: str, statement: str) -> subprocess.CompletedProcess[str]:
        login = f'PGPASSWORD="$1" psql -X -qtA -h 127.0.0.1 -U "${user_variable}" -d "$POSTGRES_DB" -c "$0"'
        return compose("exec", "-T", "postgres", "sh", "-c", login, statement, password, check=False)

    def secret(name: str) -> str:  # the test stack's own (secrets/test/), never production's
        return (project / "secrets" / "test" / name).read_text()

    def rotate(name: str) -> str:
        command = ["python3", "scripts/rotate_secret.py", "--compose-file", "compose.test.yaml", name]
        result = subprocess.run(command, cwd=project, env={**engine.env, "HTTP_PORT": str(port)}, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    production = {path.name: path.read_text() for path in (project / "secrets").iterdir() if path.is_file()}
    try:
        compose("up", "--detach", "--wait", "--no-build")
        assert (
            psql(
                "POSTGRES_APP_USER",
                secret("postgres_app_password"),
                "insert into notes (body) values ('kept')",  # the first migration's table
            ).returncode
            == 0
        )

        for name, user_variable in (("postgres_app_password", "POSTGRES_APP_USER"), ("postgres_password", "POSTGRES_USER")):
            old = secret(name)
            restarted = rotate(name)
            if name == "postgres_app_password":  # not the one-shot migrate: it reads the secret when it next runs
                assert "restarted postgres, backend\n" in restarted, restarted
            assert secret(name) != old
            assert psql(user_variable, old, "select 1").returncode != 0, f"{name}: the old password still works"
            assert psql(user_variable, secret(name), "select body from notes").stdout.strip() == "kept"
        assert http(port, "/api/health/db")[0] == 200

        old = secret("redis_password")
        rotate("redis_password")
        ping = 'REDISCLI_AUTH="$0" redis-cli ping'
        assert compose("exec", "-T", "redis", "sh", "-c", ping, old, check=False).stdout.strip() != "PONG"
        assert compose("exec", "-T", "redis", "sh", "-c", ping, secret("redis_password")).stdout.strip() == "PONG"
        assert http(port, "/api/health/redis")[0] == 200

        rotate("app_secret_key")
        assert http(port, "/api/health") == (200, b'{"status":"ok"}')
        assert not list((project / "secrets").glob("**/.*.previous"))
        assert {path.name: path.read_text() for path in (project / "secrets").iterdir() if path.is_file()} == production
    finally:
        compose("down", "--volumes", check=False)


def test_boot_failed_migration_starts_no_backend_and_leaves_no_trace(engine: Engine, tmp_path: Path) -> None:
    """A migration that fails on the first start: `up` fails naming migrate, migrate exited
    non-zero with the database's reason in its log, the backend was never started, and the
    pending migrations rolled back together (PostgreSQL's DDL is transactional)."""
    project = render(
        tmp_path / "p", project_name="Migrate Demo", services=["postgres"], frontend="none", proxy_mode="none", **COMMON
    )
    broken = 'revision = "0002"\ndown_revision = "0001"\n\n\ndef upgrade() -> None:\n    op.execute("select 1/0")\n'
    versions = project / "backend" / "migrations" / "versions"
    (versions / "0002_broken.py").write_text("from alembic import op\n\n" + broken)
    model = json.loads(engine.compose(project, "compose.test.yaml", "config", "--format", "json").stdout)
    engine.build(model["services"]["backend"]["image"], project / "backend")
    port = free_port()

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return engine.compose(project, "compose.test.yaml", *args, check=check, HTTP_PORT=str(port))

    try:
        failed = compose("up", "--detach", "--wait", "--no-build", check=False)
        assert failed.returncode != 0 and "migrate" in failed.stderr, failed.stderr
        (migrate,) = engine.inspect("container", *compose("ps", "--all", "--quiet", "migrate").stdout.split())
        assert migrate["State"]["Status"] == "exited" and migrate["State"]["ExitCode"] != 0
        assert "division by zero" in compose("logs", "migrate").stdout
        for container in compose("ps", "--all", "--quiet", "backend").stdout.split():
            (backend,) = engine.inspect("container", container)
            assert backend["State"]["StartedAt"].startswith("0001-01-01"), "the backend started on an unmigrated schema"
        assert superuser_sql(engine, project, "select count(*) from pg_tables where schemaname = 'public'") == "0"
    finally:
        compose("down", "--volumes", check=False)
