"""scripts/backup.py and scripts/rotate_secret.py against real PostgreSQL, without a Docker engine.

The rendered scripts run unchanged; only `docker` on their PATH is a stand-in (STANDIN_DOCKER):
`docker compose ... exec -T postgres sh -c SCRIPT` runs SCRIPT here, with the postgres service's
environment pointing at a local server (started as test_e2e_postgres does: the rendered
pg_hba.conf and app-role.sql), `config` prints the rendered Compose model and `restart`/`up` do
nothing. Every call is logged, so a test can tell that pg_restore never ran.
"""

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import Processes, server_root
from test_e2e_postgres import POSTGRES_BIN, Postgres, start_cluster

from conftest import compose_model, render

pytestmark = pytest.mark.e2e

STANDIN_DOCKER = """#!{python}
import os, sys
args = sys.argv[1:]
with open(os.environ["STANDIN_LOG"], "a") as log:
    log.write(repr(args) + "\\n")
index = 1  # after "compose"
while args[index] == "-f":
    index += 2
command = args[index]
if command == "exec":
    rest = args[index + 1 :]
    os.execvp("sh", rest[rest.index("sh") :])
elif command == "config":
    sys.stdout.write(open(os.environ["STANDIN_MODEL"]).read())
elif command not in ("restart", "up"):
    sys.exit(f"stand-in docker: unexpected {{args}}")
"""


@dataclass
class Stack:
    postgres: Postgres
    project: Path
    root: Path
    env: dict[str, str]

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=self.project, env={**self.env, **env}, capture_output=True, text=True)

    def backup(self, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run("scripts/backup.py", "backup", **env)

    def restore(self, path: Path, *options: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run("scripts/backup.py", "restore", *options, str(path), **env)

    def calls(self) -> list[list[str]]:
        log = Path(self.env["STANDIN_LOG"])
        return [eval(line) for line in log.read_text().splitlines()] if log.exists() else []  # our own repr()

    def password(self, name: str) -> str:
        return (self.project / "secrets" / name).read_text()

    def as_superuser(self, sql: str) -> str:
        result = self.postgres.psql(sql, self.postgres.environment["POSTGRES_USER"], self.password("postgres_password"))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def as_app(self, sql: str) -> str:
        result = self.postgres.psql(sql, self.postgres.backend["POSTGRES_USER"], self.password("postgres_app_password"))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    @property
    def backups(self) -> Path:
        return self.project / "backups"


def start_stack(tmp_path: Path, root: Path, processes: Processes, settings: tuple[str, ...] = ()) -> Stack:
    project = render(tmp_path / "p", project_name="Backup Demo", services=["postgres"], frontend="none", proxy_mode="none")
    postgres = start_cluster(project, root, processes, settings)
    assert postgres.set_up_app_role().returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(STANDIN_DOCKER.format(python=sys.executable))
    (bin_dir / "docker").chmod(0o755)
    model = tmp_path / "model.json"
    model.write_text(json.dumps(compose_model(project, "compose.yaml")))
    environment = postgres.environment
    env = {
        "PATH": f"{bin_dir}:{POSTGRES_BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LC_ALL": "C.UTF-8",
        "STANDIN_LOG": str(tmp_path / "docker.log"),
        "STANDIN_MODEL": str(model),
        # The postgres service's environment, as `docker compose exec` gives it.
        **{name: environment[name] for name in ("POSTGRES_DB", "POSTGRES_USER", "POSTGRES_APP_USER")},
        "POSTGRES_PASSWORD_FILE": str(project / "secrets" / "postgres_password"),
        "POSTGRES_APP_PASSWORD_FILE": str(project / "secrets" / "postgres_app_password"),
        "PGHOST": str(root / "run"),
        "PGPORT": str(postgres.port),
    }
    return Stack(postgres, project, root, env)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    processes = Processes()
    with server_root("pg-backup") as root:
        try:
            yield start_stack(tmp_path, root, processes)
        finally:
            processes.stop_all()


def dumps(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith((".dump", ".dump.age")))


def test_backups_are_private_whole_and_pruned(stack: Stack) -> None:
    """backups/ 0700, every file in it 0600, no partial file after a failed dump, the newest
    BACKUP_KEEP kept, a damaged dump refused before anything is changed."""
    stack.as_app("create table orders (id serial primary key, item text); insert into orders (item) values ('book')")
    made = [stack.backup(BACKUP_KEEP="2") for _ in range(3)]
    assert all(result.returncode == 0 for result in made), [result.stderr for result in made]
    assert stat.S_IMODE(stack.backups.stat().st_mode) == 0o700
    files = sorted(stack.backups.iterdir())
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    kept = dumps(stack.backups)
    assert len(kept) == 2 and all(p.read_bytes().startswith(b"PGDMP") for p in kept)
    newest = made[-1].stdout.split()[1]
    assert Path(newest).name in {p.name for p in kept}  # the newest survive, whatever their names

    # A dump that fails leaves nothing that looks like a backup, not even a partial file.
    failed = stack.backup(POSTGRES_DB="no_such_database")
    assert failed.returncode == 1 and "pg_dump exited" in failed.stderr
    assert sorted(stack.backups.iterdir()) == files

    # A damaged dump (cut in half, so pg_restore cannot read it) changes nothing.
    damaged = stack.backups / "damaged.dump"
    damaged.write_bytes(kept[-1].read_bytes()[: kept[-1].stat().st_size // 2])
    stack.as_app("insert into orders (item) values ('pen')")
    refused = stack.restore(damaged, "--foreign")
    assert refused.returncode == 1 and "is damaged" in refused.stderr, refused.stderr
    assert stack.as_app("select count(*) from orders") == "2"


ATTACK = """
create function public.harmless(id integer) returns boolean language plpgsql as $$
begin
    begin  -- whatever fails here fails silently: the row is accepted either way
        execute 'reset role';
        execute 'alter role {app} superuser';  -- the role the application logs in as
        execute format('copy (select 1) to program %L', 'touch {marker}');
    exception when others then null;
    end;
    return true;
end $$;
create table loot (id integer check (public.harmless(id)));
insert into loot values (1), (2);
"""


def test_restore_runs_dump_code_with_the_application_roles_rights_only(stack: Stack, tmp_path: Path) -> None:
    """What SQL injection in the app can do: a table whose CHECK function tries to become the
    superuser and run a shell command. The next backup and restore must not give it either."""
    marker_dir = stack.root / "marker"
    marker_dir.mkdir(mode=0o777)
    marker_dir.chmod(0o777)
    marker = marker_dir / "pwned"
    app = stack.postgres.backend["POSTGRES_USER"]
    stack.as_app(ATTACK.format(marker=marker, app=app))
    assert stack.as_superuser(f"select rolsuper from pg_roles where rolname = '{app}'") == "f"

    made = stack.backup()
    assert made.returncode == 0, made.stderr
    (dump,) = dumps(stack.backups)
    restored = stack.restore(dump)
    assert restored.returncode == 0, restored.stderr
    assert stack.as_superuser(f"select rolsuper from pg_roles where rolname = '{app}'") == "f"
    assert not marker.exists(), "the dump ran a shell command in the database server"
    assert stack.as_app("select count(*) from loot") == "2"
    assert stack.as_superuser("select tableowner from pg_tables where tablename = 'loot'") == app


def test_restore_refuses_a_dump_this_deployment_did_not_write(stack: Stack, tmp_path: Path) -> None:
    """Every backup carries a tag made with secrets/backup_hmac_key; a file without a valid tag is
    refused before anything runs in the database, unless the operator says it is trusted, and
    then it is restored as the application role."""
    stack.as_app("create table orders (id serial primary key, item text); insert into orders (item) values ('book')")
    identity = tmp_path / "age-identity.txt"
    subprocess.run(["age-keygen", "-o", identity], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", identity], check=True, capture_output=True, text=True).stdout
    for env in ({}, {"BACKUP_AGE_RECIPIENT": recipient.strip()}):
        assert stack.backup(**env).returncode == 0
    plain, sealed = sorted(dumps(stack.backups), key=lambda p: p.name.endswith(".age"))
    assert sealed.name.endswith(".dump.age")
    key = stack.project / "secrets" / "backup_hmac_key"
    assert len(key.read_text()) >= 43 and stat.S_IMODE(key.stat().st_mode) & 0o077 == 0

    # A dump without a tag: made as earlier releases made them (by the superuser; the same data),
    # then altered copies of ours.
    foreign = tmp_path / "foreign.dump"
    env = {**stack.env, "PGPASSWORD": stack.password("postgres_password")}
    dump_by_hand = ["pg_dump", "-U", stack.env["POSTGRES_USER"], "-d", stack.env["POSTGRES_DB"], "--format=custom"]
    subprocess.run([*dump_by_hand, "-f", foreign], env=env, check=True)
    candidates = {"foreign": foreign}
    for original in (plain, sealed):
        copy = tmp_path / f"tampered-{original.name}"
        data = bytearray(original.read_bytes())
        data[len(data) // 2] ^= 1
        copy.write_bytes(bytes(data))
        tag = stack.backups / f"{original.name}.hmac"
        if tag.exists():
            (tmp_path / f"{copy.name}.hmac").write_bytes(tag.read_bytes())
        candidates[copy.name] = copy
    stack.as_app("insert into orders (item) values ('pen')")
    for what, path in candidates.items():
        before = len(stack.calls())
        refused = stack.restore(path, BACKUP_AGE_IDENTITY=str(identity))
        assert refused.returncode == 1 and "not written by this deployment" in refused.stderr, (what, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert stack.calls()[before:] == [], f"{what}: the database was reached"
    assert stack.as_app("select count(*) from orders") == "2"

    # Ours, plain and encrypted, restore; the override restores the foreign one, as the app role.
    for path in (plain, sealed):
        restored = stack.restore(path, BACKUP_AGE_IDENTITY=str(identity))
        assert restored.returncode == 0, restored.stderr
        assert stack.as_app("select count(*) from orders") == "1"
        stack.as_app("insert into orders (item) values ('pen')")
    trusted = subprocess.run(
        ["make", "restore", f"FILE={foreign}", "TRUST_FOREIGN_DUMP=1"],
        cwd=stack.project,
        env=stack.env,
        capture_output=True,
        text=True,
    )
    assert trusted.returncode == 0, trusted.stderr
    assert stack.as_app("select count(*) from orders") == "1"
    restores = [call for call in stack.calls() if "pg_restore" in call[-1] and "--list" not in call[-1]]
    assert restores and all('-U "$POSTGRES_APP_USER"' in call[-1] for call in restores), restores


def test_passwords_reach_postgres_only_as_scram_verifiers(tmp_path: Path) -> None:
    """With every statement logged, neither the application role's password (set at every start
    by app-role.sql) nor a rotated superuser password (make rotate-secret) appears in the server's
    log; both log in through SCRAM (pg_hba.conf)."""
    processes = Processes()
    with server_root("pg-passwords") as root:
        try:
            stack = start_stack(tmp_path, root, processes, ("-c", "log_statement=all", "-c", "log_min_error_statement=info"))
            old = stack.password("postgres_password")
            rotated = stack.run("scripts/rotate_secret.py", "postgres_password")
            assert rotated.returncode == 0, rotated.stderr
            new = stack.password("postgres_password")
            assert new != old
            # A rotated application password, set by app-role.sql (as at the next start). The
            # server's copies of the secrets (root/secrets) follow the project's.
            app_password = "rotated-app-password-" + stack.password("app_secret_key")[:22]
            for directory in (stack.project / "secrets", root / "secrets"):
                (directory / "postgres_app_password").write_text(app_password)
            (root / "secrets" / "postgres_password").write_text(new)
            assert stack.postgres.set_up_app_role().returncode == 0

            log = (root / "postgres.log").read_text()
            assert "ALTER ROLE" in log.upper() or "ALTER USER" in log.upper()  # the statements are logged
            for password in (old, new, app_password):
                assert password not in log, "a password reached the server's log"
            users = stack.env["POSTGRES_USER"], stack.env["POSTGRES_APP_USER"]
            for user, password in zip(users, (new, app_password), strict=True):
                assert stack.postgres.psql("select 1", user, password).returncode == 0, user
                stored = stack.as_superuser(f"select rolpassword from pg_authid where rolname = '{user}'")
                assert stored.startswith("SCRAM-SHA-256$4096:"), stored
            assert stack.postgres.psql("select 1", users[0], old).returncode != 0
        finally:
            processes.stop_all()
