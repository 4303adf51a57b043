"""Applying the template to an existing repository renders infrastructure and keeps the user's code."""

import re
import shutil
from pathlib import Path

import pytest

from conftest import commit, copier, copier_cli, render, run

USER_FILES = {
    "backend/app/main.py": "from fastapi import FastAPI\n\napp = FastAPI()  # mine\n",
    "backend/requirements.txt": "fastapi==0.100.0  # mine\nuvicorn==0.30.0\n",
    "frontend/src/main.js": "console.log('mine');\n",
    "frontend/index.html": "<!doctype html><title>mine</title>\n",
    "frontend/package.json": '{"name": "mine", "private": true, "scripts": {"build": "vite build"}}\n',
}
# What a repository plausibly has before it meets the template: files the template manages too.
REPOSITORY_FILES = {
    "README.md": "# My service\n\nOur own README.\n",
    ".gitignore": "node_modules/\n",
    "Makefile": "test:\n\tpytest\n",
    "backend/Dockerfile": "FROM python:3.12-slim\n",
    ".github/workflows/security-scan.yml": "name: ours\non: push\njobs: {}\n",
    ".env": "DEBUG=1\n",
    "backend/app/main.py": "from fastapi import FastAPI\n\napp = FastAPI()  # mine\n",
}
MANAGED_IN_REPOSITORY = ["README.md", ".gitignore", "Makefile", "backend/Dockerfile", ".github/workflows/security-scan.yml"]


def test_copy_into_existing_repo_keeps_user_code(tmp_path: Path) -> None:
    project = tmp_path / "repo"
    for name, content in USER_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    render(project, frontend="spa")
    for name, content in USER_FILES.items():
        assert (project / name).read_text() == content, f"{name} was overwritten"
    assert (project / "backend" / "Dockerfile").is_file()
    assert (project / "compose.yaml").is_file()


@pytest.mark.parametrize("options", [[], ["--overwrite"]], ids=["defaults", "defaults-overwrite"])
def test_copy_into_a_repository_never_replaces_its_files_and_finishes(tmp_path: Path, options: list[str]) -> None:
    """`copier copy --trust --defaults [--overwrite]` into a git repository with its own README,
    Makefile, .gitignore, Dockerfile, workflow, .env and app: the copy runs to the end (no
    "Interactive session required" half-way), every file of the repository is byte for byte what
    it was, each one the template would have written is named, and the generated secrets stay out
    of git although the repository's own .gitignore does not know them."""
    project = tmp_path / "repo"
    for name, content in REPOSITORY_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    run("git", "init", "-q", cwd=project)
    commit(project, "our repository")

    result = copier_cli(project, *options)
    assert result.returncode == 0, result.stderr
    for name, content in REPOSITORY_FILES.items():
        assert (project / name).read_text() == content, f"{name} was overwritten:\n{result.stderr}"
    for name in MANAGED_IN_REPOSITORY:
        assert f"KEPT {name}: it was here before, so the template's {name} was not written." in result.stderr
    assert "KEPT .env: yours, as it was" in result.stderr
    assert "KEPT backend/app/main.py: yours, as it was" in result.stderr
    assert "backend=existing" in result.stderr  # the skeleton met an app of its own
    assert "copier recopy --trust --defaults" in result.stderr
    assert "Your .gitignore was kept" in result.stderr
    # Everything else is there: the copy did not stop half-way.
    for name in ("compose.yaml", "compose.test.yaml", "docs/OPERATIONS.md", "scripts/verify.py", ".copier-answers.yml"):
        assert (project / name).is_file(), name
    assert (project / "secrets" / "app_secret_key").is_file()
    assert run("git", "check-ignore", "-q", "secrets/app_secret_key", cwd=project, check=False).returncode == 0
    assert "secrets/app_secret_key" not in run("git", "status", "--porcelain", "-uall", cwd=project).stdout

    # From now on the directory is a generated project: a recopy renders the managed files again.
    commit(project, "generated into our repository")
    copier("recopy", "--trust", "--defaults", "--overwrite", cwd=project)
    assert "Managed by hardened-compose" in (project / "Makefile").read_text()
    assert (project / ".env").read_text() == REPOSITORY_FILES[".env"]
    assert (project / "backend/app/main.py").read_text() == REPOSITORY_FILES["backend/app/main.py"]


def test_existing_app_mode_renders_infrastructure_only(tmp_path: Path) -> None:
    project = render(tmp_path / "p", backend="existing", asgi_app="service.api:application")
    assert not (project / "backend" / "app").exists()
    assert not (project / "backend" / "requirements.txt").exists()
    assert "APP_MODULE=service.api:application" in (project / "backend" / "Dockerfile").read_text()
    contract = (project / "docs/OPERATIONS.md").read_text().split("## Your application", 1)[1].split("\n## ", 1)[0]
    for promise in ("service.api:application", "backend/service/api.py", "`GET /api/health` answers 200", "port 8000",
                    "--require-hashes", "make lock", "**uvicorn**"):  # fmt: skip
        assert promise in contract, promise
    assert "docs/OPERATIONS.md#your-application" in (project / "README.md").read_text()


LOCK = "uvicorn==0.30.0 \\\n    --hash=sha256:{0}\ncelery==5.4.0 \\\n    --hash=sha256:{0}\n".format("a" * 64)


def existing_app(tmp_path: Path, files: dict[str, str]) -> str:
    """Copy in existing-app mode (with Celery) into a directory holding files; the task's output."""
    project = tmp_path / "app"
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    data = ["--data=backend=existing", "--data=asgi_app=service.api:app", "--data=celery_app=service.tasks:app",
            "--data=services=[postgres, redis, celery_worker]"]  # fmt: skip
    result = copier_cli(project, *data)
    assert result.returncode == 0, result.stderr  # a warning, never a lost project
    assert (project / "compose.yaml").is_file()
    return result.stderr


def test_the_existing_app_contract_is_checked_at_generation(tmp_path: Path) -> None:
    nothing = existing_app(tmp_path / "empty", {})
    messages = re.findall(r"^EXISTING APP: (.*)$", nothing, re.MULTILINE)
    assert len(messages) == 3, nothing
    assert "backend/service/api.py (or backend/service/api/__init__.py) is missing" in messages[0]
    assert "backend/service/tasks.py is missing" in messages[1]
    assert "backend/requirements.txt is missing" in messages[2] and "uvicorn and celery" in messages[2]

    unlocked = existing_app(tmp_path / "unlocked", {
        "backend/service/__init__.py": "",
        "backend/service/api/__init__.py": "app = object()\n",
        "backend/service/tasks.py": "app = object()\n",
        "backend/requirements.txt": "fastapi==0.115.0\nUvicorn[standard]==0.30.0\n",
    })  # fmt: skip
    messages = re.findall(r"^EXISTING APP: (.*)$", unlocked, re.MULTILINE)
    assert len(messages) == 2, unlocked
    assert "does not name celery" in messages[0] and "has no hashes" in messages[1]

    complete = existing_app(tmp_path / "complete", {
        "backend/service/api.py": "app = object()\n",
        "backend/service/tasks.py": "app = object()\n",
        "backend/requirements.txt": LOCK,
        "backend/manage.py": "",
        "backend/.env.production": "",
    })  # fmt: skip
    assert "EXISTING APP" not in complete
    # backend/.dockerignore is an allow-list: what it leaves out (but hidden files and keys) is named.
    assert "NOTE: not in the backend image (backend/.dockerignore is an allow-list): backend/manage.py. " in complete, complete


def test_user_owned_files_survive_a_second_copy(tmp_path: Path) -> None:
    project = render(tmp_path / "p", frontend="spa")
    edits = {
        ".env": "BACKEND_MEMORY=3G\n",
        "compose.override.yaml": 'services:\n  backend:\n    environment:\n      FEATURE_X: "1"\n',
        "compose.prod.override.yaml": "services: {}  # mine\n",
        "backend.env": "FEATURE_Y=1\n",
        "nginx/locations.d/extra.conf": 'location = /robots.txt { return 200 "User-agent: *\\n"; }\n',
        "backend/app/main.py": "# edited\n",
    }
    for name, content in edits.items():
        (project / name).write_text(content)
    result = copier_cli(project, "--overwrite")
    assert result.returncode == 0, result.stderr
    for name, content in edits.items():
        assert (project / name).read_text() == content, f"{name} was overwritten"


def test_recopy_says_it_rendered_again(tmp_path: Path) -> None:
    """Copier 9.19 runs a recopy as a copy (`_copier_operation` is "copy"): the messages tell them apart."""
    project = tmp_path / "p"
    first = copier_cli(project)
    assert first.returncode == 0, first.stderr
    assert "is ready in" in first.stderr and "rendered again" not in first.stderr
    run("git", "init", "-q", cwd=project)
    commit(project, "generated")
    shutil.rmtree(project / "scripts")  # a managed file the recopy brings back
    recopy = copier("recopy", "--trust", "--defaults", "--overwrite", cwd=project)
    output = recopy.stdout + recopy.stderr
    assert "rendered again from the template with these answers (copier recopy)" in output
    assert "is ready in" not in output and "git init" not in output
    assert "Files you own were not overwritten: .env, compose.override.yaml" in output
    assert "KEPT" not in output
    assert (project / "scripts" / "verify.py").is_file()
