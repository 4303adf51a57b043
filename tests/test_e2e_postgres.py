"""PostgreSQL as the rendered stack runs it: SCRAM for every login, and an application role that
cannot escape the database. Real PostgreSQL (Debian's), started as a non-root user.

The cluster is created with the rendered POSTGRES_INITDB_ARGS and the superuser's password file,
served with the rendered pg_hba.conf, and set up by the rendered postgres/app-role.sql, as
postgres/start-postgres.sh does in the container (the boot tests run that script itself).
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import AS_ROOT, NOBODY, Processes, as_unprivileged, free_port, server_root, wait_until

from conftest import compose_model, render

pytestmark = pytest.mark.e2e

POSTGRES_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), Path("/usr/bin"))


@dataclass
class Postgres:
    project: Path
    root: Path
    port: int
    environment: dict[str, str]  # the postgres service's, from the rendered compose.yaml
    backend: dict[str, str]  # the backend's

    def secret(self, name: str) -> Path:
        return self.root / "secrets" / name

    def psql(self, sql: str, user: str, password: str | None, *, socket: bool = False, db: str | None = None):
        """One statement as `user`; returns the finished psql (never prompts for a password)."""
        host = str(self.root / "run") if socket else "127.0.0.1"
        env = {"PATH": "/usr/bin:/bin", **({"PGPASSWORD": password} if password is not None else {})}
        database = db or self.environment["POSTGRES_DB"]
        command = [
            "psql",
            "-X",
            "-q",
            "-w",
            "-h",
            host,
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
        ]
        return subprocess.run([*command, "-tAc", sql], capture_output=True, text=True, env=env)

    def as_superuser(self, sql: str):
        result = self.psql(sql, self.environment["POSTGRES_USER"], self.secret("postgres_password").read_text())
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def as_app(self, sql: str):
        return self.psql(sql, self.backend["POSTGRES_USER"], self.secret("postgres_app_password").read_text())

    def set_up_app_role(self) -> subprocess.CompletedProcess[str]:
        """What start-postgres.sh runs once the server is up: app-role.sql as the superuser, the
        application role's password on stdin."""
        env = {
            "PATH": "/usr/bin:/bin",
            "PGPASSWORD": self.secret("postgres_password").read_text(),
            "POSTGRES_APP_USER": self.environment["POSTGRES_APP_USER"],
            "POSTGRES_APP_PASSWORD_FILE": str(self.secret("postgres_app_password")),
            "POSTGRES_DB": self.environment["POSTGRES_DB"],
        }
        command = ["psql", "-X", "-q", "-w", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.environment["POSTGRES_USER"]]
        sql = self.project / "postgres" / "app-role.sql"
        # The app password twice on stdin, for psql's \password; no terminal (a new session), as
        # in the container: psql reads the password from stdin, not from a terminal.
        password = self.secret("postgres_app_password").read_text().rstrip("\n")
        stdin = f"{password}\n{password}\n"
        return subprocess.run([*command, "-d", "postgres", "-f", sql], input=stdin, capture_output=True, text=True,
                              env=env, start_new_session=True)  # fmt: skip


def start_cluster(project: Path, root: Path, processes: Processes, settings: tuple[str, ...] = ()) -> Postgres:
    """settings: more server options (`-c name=value` pairs), e.g. log_statement=all."""
    model = compose_model(project, "compose.yaml")["services"]
    environment, backend = model["postgres"]["environment"], model["backend"]["environment"]
    shutil.copytree(project / "secrets", root / "secrets")
    data, run = root / "data", root / "run"
    for path in (data, run):
        path.mkdir(mode=0o700)
    if AS_ROOT:
        for path in (data, run, root / "secrets", *(root / "secrets").iterdir()):
            os.chown(path, NOBODY, NOBODY)
    # The image's entrypoint on first start: initdb with the password file and POSTGRES_INITDB_ARGS.
    initdb = [POSTGRES_BIN / "initdb", "-D", data, "--username", environment["POSTGRES_USER"],
              "--pwfile", root / "secrets" / "postgres_password", *environment["POSTGRES_INITDB_ARGS"].split()]  # fmt: skip
    locale = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    init = subprocess.run(as_unprivileged(initdb), capture_output=True, text=True, env=locale)
    assert init.returncode == 0, init.stderr
    port = free_port()
    hba = project / "postgres" / "pg_hba.conf"
    shutil.copy(hba, root / "pg_hba.conf")
    server = [POSTGRES_BIN / "postgres", "-D", data, "-h", "127.0.0.1", "-p", port, "-k", run,
              "-c", f"hba_file={root / 'pg_hba.conf'}", *settings]  # fmt: skip
    process = processes.start(as_unprivileged(server), root / "postgres.log")
    postgres = Postgres(project, root, port, environment, backend)

    def accepts_the_superuser() -> bool:
        assert process.poll() is None, (root / "postgres.log").read_text()
        password = postgres.secret("postgres_password").read_text()
        return postgres.psql("select 1", environment["POSTGRES_USER"], password, db="postgres").returncode == 0

    assert wait_until(accepts_the_superuser, timeout=30), (root / "postgres.log").read_text()
    # The official image creates POSTGRES_DB on first start.
    postgres.psql(f'create database "{environment["POSTGRES_DB"]}"', environment["POSTGRES_USER"],
                  postgres.secret("postgres_password").read_text(), db="postgres")  # fmt: skip
    return postgres


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[Postgres]:
    project = render(tmp_path / "p", services=["postgres"])
    processes = Processes()
    with server_root("pg-role") as root:
        try:
            yield start_cluster(project, root, processes)
        finally:
            processes.stop_all()


def test_app_role_owns_its_database_and_cannot_escape_it(postgres: Postgres) -> None:
    app_user = postgres.backend["POSTGRES_USER"]
    assert app_user == postgres.environment["POSTGRES_APP_USER"] != postgres.environment["POSTGRES_USER"]
    assert postgres.backend["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_app_password"
    backend_secrets = compose_model(postgres.project, "compose.yaml")["services"]["backend"]["secrets"]
    assert "postgres_password" not in [secret["source"] for secret in backend_secrets]
    result = postgres.set_up_app_role()
    assert result.returncode == 0, result.stderr

    flags = postgres.as_superuser(
        f"select rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls from pg_roles where rolname = '{app_user}'"
    )
    assert flags == "f|f|f|f|f"
    db = postgres.environment["POSTGRES_DB"]
    assert postgres.as_superuser(f"select pg_get_userbyid(datdba) from pg_database where datname = '{db}'") == app_user

    # The application's everyday work.
    work = postgres.as_app(
        "create table notes (id serial primary key, body text); insert into notes (body) values ('hi'); select body from notes"
    )
    assert work.returncode == 0 and work.stdout.strip() == "hi", work.stderr
    # What an SQL injection as a superuser would reach: a shell, server files, the server's settings.
    escapes = {
        "COPY FROM PROGRAM": "copy notes (body) from program 'id'",
        "COPY TO PROGRAM": "copy notes to program 'cat > /tmp/x'",
        "read a server file": "select pg_read_file('/etc/passwd')",
        "read a server file by COPY": "copy notes (body) from '/etc/passwd'",
        "ALTER SYSTEM": "alter system set log_statement = 'none'",
        "create a role": "create role intruder login",
        "read other secrets": "select pg_ls_dir('.')",
    }
    for what, sql in escapes.items():
        refused = postgres.as_app(sql)
        reason = refused.stderr.lower()
        denied = "permission denied" in reason or "must be superuser" in reason
        assert refused.returncode != 0 and denied, (what, refused.stderr)


def test_every_login_needs_its_password(postgres: Postgres) -> None:
    assert postgres.set_up_app_role().returncode == 0
    superuser, app_user = postgres.environment["POSTGRES_USER"], postgres.backend["POSTGRES_USER"]
    for user in (superuser, app_user):
        for socket in (True, False):  # no "trust" left on the local socket nor on TCP
            refused = postgres.psql("select 1", user, None, socket=socket)
            assert refused.returncode != 0 and "password" in refused.stderr, (user, socket, refused.stderr)
        assert postgres.psql("select 1", user, "wrong-password").returncode != 0
    assert postgres.as_app("select current_user").stdout.strip() == app_user
    method = postgres.as_superuser("select distinct auth_method from pg_hba_file_rules")
    assert method == "scram-sha-256"


def test_existing_superuser_data_moves_to_the_app_role_idempotently_and_passwords_rotate(postgres: Postgres) -> None:
    # A project from before the app role existed: the app ran as the superuser and owns its tables.
    postgres.as_superuser(
        "create table orders (id serial primary key, item text);"
        " create table audit (id bigint generated always as identity, note text);"
        " insert into orders (item) values ('book'), ('pen'); insert into audit (note) values ('x');"
        " create view order_items as select item from orders"
    )
    for _ in range(2):  # every start runs it again
        result = postgres.set_up_app_role()
        assert result.returncode == 0, result.stderr
    changed = postgres.as_app(
        "insert into orders (item) values ('ink'); insert into audit (note) values ('y');"
        " alter table orders add column qty int; select count(*) from order_items"
    )
    assert changed.returncode == 0 and changed.stdout.strip().endswith("3"), changed.stderr

    # Rotation: a new secret, the set-up runs at the next start; the old password stops working.
    old = postgres.secret("postgres_app_password").read_text()
    postgres.secret("postgres_app_password").write_text("rotated-" + old[:20])
    assert postgres.set_up_app_role().returncode == 0
    assert postgres.as_app("select count(*) from orders").stdout.strip() == "3"
    assert postgres.psql("select 1", postgres.backend["POSTGRES_USER"], old).returncode != 0


def test_skeleton_migrations_run_as_the_app_role_and_match_the_models(postgres: Postgres) -> None:
    """backend/migrations with the rendered settings: Alembic connects as the application role
    (URL from POSTGRES_* and the password file, as the app), creates the first migration's table
    owned by that role, the models need no further migration, and upgrading again changes nothing.
    (The boot tests run the same in the migrate container.)"""
    assert postgres.set_up_app_role().returncode == 0
    backend = postgres.project / "backend"
    assert "sqlalchemy.url" not in (backend / "alembic.ini").read_text()  # no URL (or password) in the ini
    env = {
        "PATH": os.environ["PATH"],
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(postgres.port),
        "POSTGRES_DB": postgres.backend["POSTGRES_DB"],
        "POSTGRES_USER": postgres.backend["POSTGRES_USER"],
        "POSTGRES_PASSWORD_FILE": str(postgres.secret("postgres_app_password")),
    }

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alembic", *args], cwd=backend, env=env, capture_output=True, text=True)

    for _ in range(2):  # the second run is a no-op
        upgraded = alembic("upgrade", "head")
        assert upgraded.returncode == 0, upgraded.stderr
    app_user = postgres.backend["POSTGRES_USER"]
    assert postgres.as_superuser("select tableowner from pg_tables where tablename = 'notes'") == app_user
    assert postgres.as_superuser("select version_num from alembic_version") == "0001"
    assert alembic("current").stdout.strip() == "0001 (head)"
    checked = alembic("check")  # autogenerate finds nothing to add: models and migrations agree
    assert checked.returncode == 0 and "No new upgrade operations detected" in checked.stdout + checked.stderr, checked.stderr
    assert postgres.as_app("insert into notes (body) values ('hi') returning id").stdout.strip() == "1"


STANDIN_ENTRYPOINT = Path(__file__).resolve().parent / "standins" / "postgres-entrypoint.sh"


@pytest.mark.parametrize("env_file", ["", "POSTGRES_MEMORY=1G\n"])
def test_start_postgres_sizes_memory_for_the_container_limit(tmp_path: Path, env_file: str) -> None:
    """The rendered postgres/start-postgres.sh, run as the container runs it (the image's
    entrypoint is the boot tests' stand-in, on PATH), with a cgroup directory whose memory.max is
    what Docker sets for this project: the default limit, then one changed in .env (no
    re-rendering). PostgreSQL's memory settings follow it."""
    project = render(tmp_path / "p", services=["postgres"])
    (project / ".env").write_text(env_file)
    service = compose_model(project, "compose.yaml")["services"]["postgres"]
    limit = int(service["deploy"]["resources"]["limits"]["memory"])
    environment = service["environment"]
    processes = Processes()
    with server_root("pg-memory") as root:
        try:
            bin_dir, config, cgroup = root / "bin", root / "etc/postgresql", root / "cgroup"
            for path in (bin_dir, config, cgroup):
                path.mkdir(parents=True)
            shutil.copy(STANDIN_ENTRYPOINT, bin_dir / "docker-entrypoint.sh")
            (bin_dir / "docker-entrypoint.sh").chmod(0o755)
            for name in ("start-postgres.sh", "pg_hba.conf", "app-role.sql"):
                shutil.copy(project / "postgres" / name, config / name)
            (cgroup / "memory.max").write_text(f"{limit}\n")
            shutil.copytree(project / "secrets", root / "secrets")
            data, run, tmp = root / "data", root / "run", root / "tmp"
            for path in (data, run, tmp):
                path.mkdir(mode=0o700)
            if AS_ROOT:
                for path in (data, run, tmp, root / "secrets", *(root / "secrets").iterdir()):
                    os.chown(path, NOBODY, NOBODY)
            port = free_port()
            env = {
                "PATH": f"{bin_dir}:{POSTGRES_BIN}:/usr/bin:/bin",
                "LC_ALL": "C.UTF-8",
                "PGDATA": str(data),
                "PGHOST": str(run),  # the stand-in's first-start createdb, through the socket
                "PGPORT": str(port),
                **{name: environment[name] for name in ("POSTGRES_DB", "POSTGRES_USER", "POSTGRES_APP_USER")},
                "POSTGRES_INITDB_ARGS": environment["POSTGRES_INITDB_ARGS"],
                "POSTGRES_PASSWORD_FILE": str(root / "secrets/postgres_password"),
                "POSTGRES_APP_PASSWORD_FILE": str(root / "secrets/postgres_app_password"),
                "POSTGRES_PORT": str(port),
                "POSTGRES_CONFIG_DIR": str(config),
                "POSTGRES_RUN_DIR": str(run),
                "TMPDIR": str(tmp),
                "CGROUP_DIR": str(cgroup),
            }
            # Options to the script reach the server, as a `command:` in compose.override.yaml would.
            # (Not listen_addresses: the first start's temporary server must stay on the socket.)
            command = ["sh", config / "start-postgres.sh", "-c", f"unix_socket_directories={run}"]
            process = processes.start(as_unprivileged(command), root / "postgres.log", env=env)
            ready = wait_until(lambda: (run / "app-role.ready").exists() or process.poll() is not None, timeout=90)
            assert ready and process.poll() is None, (root / "postgres.log").read_text()

            postgres = Postgres(project, root, port, environment, service["environment"])
            settings = ("shared_buffers", "effective_cache_size", "work_mem", "maintenance_work_mem")
            query = ", ".join(f"pg_size_bytes(current_setting('{name}'))" for name in settings)
            values = map(int, postgres.as_superuser(f"select {query}").split("|"))
            sizes = dict(zip(settings, values, strict=True))
            assert sizes == {
                "shared_buffers": limit // 4,
                "effective_cache_size": limit * 3 // 4,
                "work_mem": min(max(limit // 256, 2**20), 64 * 2**20),
                "maintenance_work_mem": min(max(limit // 16, 2**20), 2**30),
            }
            if env_file:
                assert limit == 2**30 and postgres.as_superuser("show shared_buffers") == "256MB"
        finally:
            processes.stop_all()
