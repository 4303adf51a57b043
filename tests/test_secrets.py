"""Secrets: generated once, strong, private, gitignored, never overwritten, never in answers."""

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from conftest import compose_model, copier_cli, render, run

ALL_SERVICES = ["postgres", "redis", "celery_worker", "celery_beat"]
NAMES = ["app_secret_key", "postgres_password", "redis_password", "redis_admin_password"]


def read_secrets(project: Path) -> dict[str, str]:
    return {name: (project / "secrets" / name).read_text() for name in NAMES}


def test_secrets_are_generated_strong_and_private(tmp_path: Path) -> None:
    project = render(tmp_path / "p", services=ALL_SERVICES)
    values = read_secrets(project)
    assert len(set(values.values())) == len(NAMES)
    for name, value in values.items():
        # token_urlsafe(32): 43 characters of a 64-symbol alphabet = 256 bits.
        assert len(value) >= 43 and value.replace("-", "").replace("_", "").isalnum(), name
        mode = stat.S_IMODE((project / "secrets" / name).stat().st_mode)
        assert mode & 0o007 == 0, f"{name} is readable by others ({oct(mode)})"
        if os.geteuid() == 0:
            assert mode == 0o440 and (project / "secrets" / name).stat().st_gid == 10001
        else:
            assert mode == 0o600


def test_secrets_are_gitignored_and_absent_from_answers(tmp_path: Path) -> None:
    project = render(tmp_path / "p", services=ALL_SERVICES)
    run("git", "init", "-q", cwd=project)
    for name in NAMES:
        assert run("git", "check-ignore", "-q", f"secrets/{name}", cwd=project, check=False).returncode == 0
    assert run("git", "check-ignore", "-q", "secrets/README.md", cwd=project, check=False).returncode == 1
    assert run("git", "check-ignore", "-q", ".env", cwd=project, check=False).returncode == 0
    answers = (project / ".copier-answers.yml").read_text()
    tracked = run("git", "add", "--dry-run", ".", cwd=project).stdout
    for value in read_secrets(project).values():
        assert value not in answers and value not in tracked
        for path in project.rglob("*"):
            if path.is_file() and "secrets" not in path.parts:
                assert value not in path.read_text(errors="replace"), path


def test_the_test_stack_has_secrets_of_its_own(tmp_path: Path) -> None:
    """compose.test.yaml runs on the production server too (make test-up, restore rehearsals):
    it reads its own values from secrets/test/, so nothing it signs or stores is valid in
    production. They are made like production's: generated once, private, gitignored."""
    project = render(tmp_path / "p", services=ALL_SERVICES)
    production = compose_model(project, "compose.yaml")["secrets"]
    test = compose_model(project, "compose.test.yaml")["secrets"]
    assert set(test) == set(production)
    own = project / "secrets" / "test"
    assert {name: spec["file"] for name, spec in test.items()} == {name: str(own / name) for name in test}
    test_values = {(project / "secrets" / "test" / name).read_text() for name in test}
    assert len(test_values) == len(test) and not test_values & {Path(spec["file"]).read_text() for spec in production.values()}
    for name in test:
        info = (project / "secrets" / "test" / name).stat()
        assert stat.S_IMODE(info.st_mode) == (0o440 if os.geteuid() == 0 else 0o600), name
        if os.geteuid() == 0:
            assert info.st_gid == 10001
    run("git", "init", "-q", cwd=project)
    assert run("git", "check-ignore", "-q", "secrets/test/app_secret_key", cwd=project, check=False).returncode == 0
    run("python3", "scripts/ensure_secrets.py", cwd=project)
    assert {(project / "secrets" / "test" / name).read_text() for name in test} == test_values


def test_second_copy_and_make_secrets_never_overwrite(tmp_path: Path) -> None:
    project = render(tmp_path / "p", services=["postgres"])
    before = {n: (project / "secrets" / n).read_text() for n in ("app_secret_key", "postgres_password")}
    # A second copy over the project, now with redis too: only the new secret appears.
    result = copier_cli(project, "--overwrite", "--data", "services=[postgres, redis]")
    assert result.returncode == 0, result.stderr
    assert "created redis_password" in result.stdout
    run("python3", "scripts/ensure_secrets.py", cwd=project)
    after = {n: (project / "secrets" / n).read_text() for n in before}
    assert after == before
    assert (project / "secrets" / "redis_password").read_text() not in before.values()


def test_secrets_script_warns_when_the_group_cannot_be_set(tmp_path: Path) -> None:
    """As a user outside group 10001 the group cannot be set: the file stays private, with a hint."""
    if os.geteuid() != 0:
        project = render(tmp_path / "p")
        command = ["python3", "scripts/ensure_secrets.py"]
    else:
        # Run as nobody (not in group 10001), in a directory nobody can reach, with the system Python.
        shared = Path(tempfile.mkdtemp(prefix="hc-secrets-"))
        shared.chmod(0o755)
        project = render(shared / "p")
        run("chown", "-R", "65534:65534", project)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "scripts/ensure_secrets.py"]
    (project / "secrets" / "app_secret_key").unlink()
    try:
        result = subprocess.run(command, cwd=project, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "sudo make secrets" in result.stderr
        assert stat.S_IMODE((project / "secrets" / "app_secret_key").stat().st_mode) == 0o600
    finally:
        if project.parent != tmp_path:
            shutil.rmtree(project.parent)


def test_secrets_script_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    """A link in secrets/ pointing elsewhere: its target keeps its owner, group, mode and content."""
    project = render(tmp_path / "p")
    target = tmp_path / "elsewhere"
    target.write_text("not a secret")
    target.chmod(0o644)
    before = target.stat()
    (project / "secrets" / "app_secret_key").unlink()
    (project / "secrets" / "app_secret_key").symlink_to(target)
    (project / "secrets" / "postgres_password").chmod(0o644)  # a real secret with a wrong mode is still fixed
    result = subprocess.run(["python3", "scripts/ensure_secrets.py"], cwd=project, capture_output=True, text=True)
    assert result.returncode == 0 and "app_secret_key is not a regular file" in result.stderr, result.stderr
    after = target.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert target.read_text() == "not a secret"
    assert stat.S_IMODE((project / "secrets" / "postgres_password").stat().st_mode) in (0o440, 0o600)


def test_secrets_script_leaves_correct_secrets_alone_for_an_operator_who_cannot_change_them(tmp_path: Path) -> None:
    """Secrets set up by root (group 10001, 0440): a non-root operator's `make secrets` (run by
    `make up`) has nothing to change and must neither crash nor complain."""
    if os.geteuid() != 0:
        return
    shared = Path(tempfile.mkdtemp(prefix="hc-secrets-"))
    try:
        shared.chmod(0o755)
        project = render(shared / "p")
        run("chown", "65534:65534", project, project / "scripts", project / "secrets", project / "secrets" / "test")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "scripts/ensure_secrets.py"]
        result = subprocess.run(command, cwd=project, capture_output=True, text=True)
        assert result.returncode == 0 and result.stderr == "", result.stderr
    finally:
        shutil.rmtree(shared)


def test_each_service_gets_only_the_secrets_it_reads(tmp_path: Path) -> None:
    project = render(tmp_path / "p", services=ALL_SERVICES)
    services = compose_model(project, "compose.yaml")["services"]
    given = {name: sorted(s["source"] for s in service.get("secrets") or []) for name, service in services.items()}
    assert given == {
        "postgres": ["postgres_app_password", "postgres_password"],  # the superuser's: nobody else
        "redis": ["redis_admin_password", "redis_password"],  # the admin user's: nobody else
        "backend": ["app_secret_key", "postgres_app_password", "redis_password"],
        "worker_default": ["postgres_app_password", "redis_password"],
        "beat": ["redis_password"],
        "migrate": ["postgres_app_password"],  # the one-shot migrations: the app role only
        "frontend": [],
    }


def test_backup_key_is_the_project_owners_alone_and_no_containers(tmp_path: Path) -> None:
    """secrets/backup_hmac_key (authenticates backups) is read on the host by whoever runs
    `make backup`: mode 0400, handed by root to the project directory's owner, never a Compose
    secret, never overwritten, not something rotate-secret replaces."""
    project = render(tmp_path / "p", services=["postgres"])
    key = project / "secrets" / "backup_hmac_key"
    value = key.read_text()
    assert len(value) >= 43 and stat.S_IMODE(key.stat().st_mode) == 0o400
    model = compose_model(project, "compose.yaml")
    assert "backup_hmac_key" not in model["secrets"]
    assert all("backup_hmac_key" not in str(spec.get("secrets")) for spec in model["services"].values())
    if os.geteuid() == 0:
        os.chown(project, 65534, 65534)  # the project belongs to an operator; root runs make secrets
    key.chmod(0o644)
    result = subprocess.run(["python3", "scripts/ensure_secrets.py"], cwd=project, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert key.read_text() == value and stat.S_IMODE(key.stat().st_mode) == 0o400
    assert key.stat().st_uid == project.stat().st_uid
    rotate = ["python3", "scripts/rotate_secret.py", "backup_hmac_key"]
    refused = subprocess.run(rotate, cwd=project, capture_output=True, text=True)
    assert refused.returncode == 2 and "invalid choice" in refused.stderr
    assert key.read_text() == value
    render_without = render(tmp_path / "q", services=["redis"])
    assert not (render_without / "secrets" / "backup_hmac_key").exists()
