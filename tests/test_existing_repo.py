"""Applying the template to an existing repository renders infrastructure and keeps the user's code."""

import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TEMPLATE, commit, copier, copier_cli, release, render, run

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
        assert f"KEPT {name}: it was here before, so it stays yours: the template did not write it" in result.stderr
    assert "the template's README is docs/README.hardened-compose.md: link it from yours" in result.stderr
    assert "the stack needs the template's versions" not in result.stderr  # issue 21 item 5: not true of a README
    assert "KEPT .env: yours, as it was" in result.stderr
    assert "KEPT backend/app/main.py: yours, as it was" in result.stderr
    assert "backend=existing" in result.stderr  # the skeleton met an app of its own
    assert "delete its line under adopted_files in .copier-answers.yml" in result.stderr
    assert "Your .gitignore was kept" in result.stderr
    # Everything else is there: the copy did not stop half-way.
    for name in ("compose.yaml", "compose.test.yaml", "docs/OPERATIONS.md", "scripts/verify.py", ".copier-answers.yml"):
        assert (project / name).is_file(), name
    assert (project / "secrets" / "app_secret_key").is_file()
    assert run("git", "check-ignore", "-q", "secrets/app_secret_key", cwd=project, check=False).returncode == 0
    assert "secrets/app_secret_key" not in run("git", "status", "--porcelain", "-uall", cwd=project).stdout

    # From now on the directory is a generated project: a recopy renders the managed files again,
    # but never a file the repository had before (adopted_files), even with --overwrite.
    commit(project, "generated into our repository")
    shutil.rmtree(project / "scripts")
    copier("recopy", "--trust", "--defaults", "--overwrite", cwd=project)
    assert (project / "scripts" / "verify.py").is_file()
    for name, content in REPOSITORY_FILES.items():
        assert (project / name).read_text() == content, f"{name} was overwritten by the recopy"
    # Handing one over to the template, as the message says: move it away, drop its line, recopy.
    run("git", "mv", "Makefile", "Makefile.ours", cwd=project)
    answers = project / ".copier-answers.yml"
    answers.write_text(answers.read_text().replace("- Makefile\n", "", 1))
    commit(project, "the template's Makefile from now on")
    copier("recopy", "--trust", "--defaults", "--overwrite", cwd=project)
    assert "Managed by hardened-compose" in (project / "Makefile").read_text()
    assert (project / "README.md").read_text() == REPOSITORY_FILES["README.md"]


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


def existing_app(tmp_path: Path, files: dict[str, str], *options: str) -> str:
    """Copy in existing-app mode (with Celery) into a directory holding files; the task's output."""
    project = tmp_path / "app"
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    data = ["--data=backend=existing", "--data=asgi_app=service.api:app", "--data=celery_app=service.tasks:app",
            "--data=services=[postgres, redis, celery_worker]"]  # fmt: skip
    result = copier_cli(project, *data, *options)
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


def test_an_update_never_writes_a_file_the_repository_had_before_adoption(tmp_path: Path) -> None:
    """Issue 21 item 1: after adoption, an answer change (and a new release) must not merge the
    template's README (or any other file the repository had before) into the user's: every file
    kept at adoption is the user's for good. The template's README goes to its own file instead."""
    template, project = tmp_path / "template", tmp_path / "repo"
    release(TEMPLATE, template, "v1.0.0")
    for name, content in REPOSITORY_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    run("git", "init", "-q", cwd=project)
    commit(project, "our repository")
    copier("copy", "--trust", "--defaults", "--vcs-ref=v1.0.0", "--data=services=[postgres, redis, celery_worker]",
           str(template), str(project))  # fmt: skip
    ours = project / "docs" / "README.hardened-compose.md"
    assert "Managed by hardened-compose" in ours.read_text()
    commit(project, "adopted hardened-compose")

    # A new release that changes the README and the Makefile, and an answer change.
    readme = template / "template" / "README.md.jinja"
    readme.write_text(readme.read_text() + "\nA line added in v2.\n")
    makefile = template / "template" / "Makefile.jinja"
    makefile.write_text(makefile.read_text() + "\n# a line added in v2\n")
    release(template, template, "v2.0.0")
    result = copier("update", "--trust", "--defaults", "--data=celery_queues=default,emails", cwd=project)
    output = result.stdout + result.stderr
    status = run("git", "status", "--porcelain", cwd=project).stdout
    assert not [line for line in status.splitlines() if line[:2] in ("UU", "AA", "DU", "UD")], status
    for name, content in REPOSITORY_FILES.items():
        assert (project / name).read_text() == content, f"{name} was written by the update:\n{output}"
    assert "A line added in v2." in ours.read_text()
    assert "worker_emails" in (project / "compose.yaml").read_text()


OTHER_TEMPLATE_ANSWERS = (
    "# Changes here will be overwritten by Copier\n_commit: v1.2.0\n_src_path: gh:someone/python-package\npackage_name: acme\n"
)


def test_another_templates_answers_file_does_not_switch_off_the_first_copy_rule(tmp_path: Path) -> None:
    """Issue 22 item 14: a repository generated from another template has a .copier-answers.yml.
    That file is not this template's: the copy must still keep every file, and not take the
    other template's answers file for its own (nor write over it)."""
    project = tmp_path / "repo"
    files = {**REPOSITORY_FILES, ".copier-answers.yml": OTHER_TEMPLATE_ANSWERS}
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    run("git", "init", "-q", cwd=project)
    commit(project, "our repository, from another template")

    for options in ([], ["--overwrite"]):
        result = copier_cli(project, *options)
        assert result.returncode != 0, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
        assert len(errors) == 1 and "--answers-file .copier-answers.hardened-compose.yml" in errors[0], result.stderr
        assert run("git", "status", "--porcelain", "-uall", cwd=project).stdout == "", "the refused copy changed files"

    # With an answers file of its own, every file is kept, the other template's answers included.
    result = copier_cli(project, "--answers-file=.copier-answers.hardened-compose.yml")
    assert result.returncode == 0, result.stderr
    for name, content in files.items():
        assert (project / name).read_text() == content, f"{name} was overwritten:\n{result.stderr}"
    assert "KEPT README.md" in result.stderr
    assert "README.md" in (project / ".copier-answers.hardened-compose.yml").read_text()
    assert (project / "compose.yaml").is_file()


def test_the_existing_app_check_names_a_default_queue_no_worker_reads(tmp_path: Path) -> None:
    """Issue 21 item 2: tasks go to the app's task_default_queue (Celery's own default: `celery`);
    the check says so when no rendered worker reads that queue, and is silent when one does."""
    base = {"backend/service/api.py": "app = object()\n", "backend/requirements.txt": LOCK}
    plain = {**base, "backend/service/tasks.py": "from celery import Celery\n\napp = Celery('service')\n"}
    assert "EXISTING APP" not in existing_app(tmp_path / "defaults", plain)

    other = existing_app(tmp_path / "default-queue", plain, "--data=celery_queues=default")
    messages = re.findall(r"^EXISTING APP: (.*)$", other, re.MULTILINE)
    assert len(messages) == 1 and "`celery`" in messages[0] and "task_default_queue" in messages[0], other

    emails = {**base, "backend/service/tasks.py": "app = Celery('s')\napp.conf.task_default_queue = \"emails\"\n"}
    messages = re.findall(r"^EXISTING APP: (.*)$", existing_app(tmp_path / "emails", emails), re.MULTILINE)
    assert len(messages) == 1 and "task_default_queue 'emails'" in messages[0] and "celery_queues=" in messages[0]
    assert "EXISTING APP" not in existing_app(tmp_path / "answered", emails, "--data=celery_queues=emails,celery")


def test_the_update_message_names_only_what_this_project_owns(tmp_path: Path) -> None:
    """Issue 21 item 5: after an update, the list of files the user owns names paths this project
    has (the app's own package, the files adopted at the first copy), never the skeleton's code,
    a frontend or migrations it does not have."""
    template, project = tmp_path / "template", tmp_path / "repo"
    release(TEMPLATE, template, "v1.0.0")
    files = {"README.md": "# Acme\n", "backend/acme/__init__.py": "", "backend/acme/api.py": "app = object()\n",
             "backend/requirements.txt": LOCK}  # fmt: skip
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    run("git", "init", "-q", cwd=project)
    commit(project, "our repository")
    copier("copy", "--trust", "--defaults", "--data=backend=existing", "--data=asgi_app=acme.api:app", "--data=frontend=none",
           str(template),
           str(project))  # fmt: skip
    commit(project, "adopted")
    update = copier("update", "--trust", "--defaults", "--data=update_bot=none", cwd=project)
    message = (update.stdout + update.stderr).split("hardened-compose update done", 1)[1]
    promise = message.split("Files you own were not overwritten or deleted:", 1)[1].split("\n\n", 1)[0]
    for absent in ("backend/app/", "frontend/", "backend/alembic.ini", "backend/migrations/", "nginx/"):
        assert absent not in promise, f"{absent} is not in this project:\n{promise}"
    for present in ("backend/acme/", "README.md", ".env", "compose.override.yaml", "backend/requirements.txt"):
        assert present in promise, f"{present} is this project's and yours:\n{promise}"


def test_a_repository_adopted_before_adopted_files_existed_gets_them_on_update(tmp_path: Path) -> None:
    """A project adopted by an earlier release has no adopted_files answer: the first update
    records the rendered files it holds without the template's header (its own files), and from
    that update on they are never merged into (no README conflict)."""
    template, project = tmp_path / "template", tmp_path / "repo"
    release(TEMPLATE, template, "v1.0.0")
    for name, content in REPOSITORY_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    run("git", "init", "-q", cwd=project)
    commit(project, "our repository")
    copier("copy", "--trust", "--defaults", "--vcs-ref=v1.0.0", str(template), str(project))
    # As an earlier release left it: no adopted_files answer, no docs/README.hardened-compose.md.
    answers = project / ".copier-answers.yml"
    answers.write_text(re.sub(r"^adopted_files:\n(- .*\n)*", "", answers.read_text(), flags=re.MULTILINE))
    assert "adopted_files" not in answers.read_text()
    (project / "docs" / "README.hardened-compose.md").unlink()
    commit(project, "adopted with an earlier release")

    readme = template / "template" / "README.md.jinja"
    readme.write_text(readme.read_text() + "\nA line added in v2.\n")
    release(template, template, "v2.0.0")
    result = copier("update", "--trust", "--defaults", cwd=project)
    output = result.stdout + result.stderr
    status = run("git", "status", "--porcelain", cwd=project).stdout
    assert not [line for line in status.splitlines() if line[:2] in ("UU", "AA", "DU", "UD")], status
    for name, content in REPOSITORY_FILES.items():
        assert (project / name).read_text() == content, f"{name} was written by the update:\n{output}"
    recorded = yaml.safe_load(answers.read_text())["adopted_files"]
    assert set(recorded) == set(MANAGED_IN_REPOSITORY), recorded
    assert "adopted_files" in output  # the migration says what it recorded


def test_adoption_warns_about_committed_env_files_and_leaves_them(tmp_path: Path) -> None:
    """Issue 21 item 4 (part): a committed `.env.production` holds what are usually secrets: the
    first copy names it, says what to do, and never touches it; an example file is not named."""
    project = tmp_path / "repo"
    files = {".env.production": "SECRET_KEY=s3cr3t\nDATABASE_URL=postgres://u:p@db/app\n", ".env.example": "SECRET_KEY=\n",
             "backend/.env.staging": "STRIPE_KEY=sk_live_x\n", "README.md": "# ours\n"}  # fmt: skip
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    run("git", "init", "-q", cwd=project)
    commit(project, "our repository")
    result = copier_cli(project)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING:") and ".env" in line]
    assert len(warnings) == 2, result.stderr
    assert ".env.production" in warnings[0] and "backend/.env.staging" in warnings[1]
    assert all("git rm --cached" in w and "secrets/" in w and "rotate" in w for w in warnings)
    assert not any(".env.example" in w for w in warnings)
    for name, content in files.items():
        assert (project / name).read_text() == content
