"""`copier update` across real tagged template versions, with a user's committed changes."""

from pathlib import Path

import pytest
import yaml

from conftest import TEMPLATE, commit, copier, release, run

pytestmark = pytest.mark.e2e

ANSWERS = [
    "--data=frontend=spa",
    "--data=proxy_mode=npm",
    "--data=services=[postgres, redis]",
]
USER_CHANGES = {
    "compose.override.yaml": 'services:\n  backend:\n    environment:\n      FEATURE_FLAGS: "beta"\n',
    "nginx/locations.d/robots.conf": 'location = /robots.txt {\n    return 200 "User-agent: *\\nDisallow:\\n";\n}\n',
    ".env": "BACKEND_MEMORY=3G\nCORS_ORIGINS=https://app.example.org,https://admin.example.org\n",
    "backend/app/extra.py": "def answer() -> int:\n    return 42\n",
}


def snapshot(project: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (project / name).read_bytes() for name in names}


def assert_clean_merge(project: Path) -> None:
    assert not list(project.rglob("*.rej")), "rejected hunks"
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            text = path.read_text(errors="replace")
            assert "<<<<<<<" not in text and ">>>>>>>" not in text, f"conflict markers in {path}"


def rename_everywhere(template: Path, old: str, new: str) -> None:
    for path in [template / "copier.yml", *template.glob("includes/**/*"), *template.glob("template/**/*")]:
        if path.is_file():
            text = path.read_text()
            if old in text:
                path.write_text(text.replace(old, new))


def test_update_v1_v2_v3_keeps_user_work_and_applies_hardening(tmp_path: Path) -> None:
    template, project = tmp_path / "template", tmp_path / "project"
    release(TEMPLATE, template, "v1.0.0")
    copier("copy", "--trust", "--defaults", "--vcs-ref=v1.0.0", *ANSWERS, str(template), str(project))
    run("git", "init", "-q", cwd=project)
    for name, content in USER_CHANGES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    main_py = project / "backend/app/main.py"
    endpoint = '\n\n@app.get("/api/hello")\ndef hello() -> dict[str, str]:\n    return {"hello": "world"}\n'
    main_py.write_text(main_py.read_text() + endpoint)
    commit(project, "generated, with my changes")
    secrets = snapshot(project, ["secrets/app_secret_key", "secrets/postgres_password", "secrets/redis_password", ".env"])
    app_code = main_py.read_text()

    # v2: a hardening change (a tighter file-descriptor limit for every service).
    common = template / "includes" / "common.jinja"
    limits = "{'soft': 4096, 'hard': 8192}"
    assert limits in common.read_text()
    common.write_text(common.read_text().replace(limits, "{'soft': 4096, 'hard': 4096}"))
    release(template, template, "v2.0.0")
    result = copier("update", "--trust", "--defaults", "--vcs-ref=v2.0.0", cwd=project)
    assert "Before you deploy" in result.stdout + result.stderr
    assert_clean_merge(project)
    assert "hard: 4096" in (project / "compose.yaml").read_text()
    assert snapshot(project, list(secrets)) == secrets
    for name, content in USER_CHANGES.items():
        assert (project / name).read_text() == content, f"{name} changed"
    assert main_py.read_text() == app_code
    run("docker-compose", "-f", "compose.yaml", "-f", "compose.override.yaml", "config", "--quiet", cwd=project)
    commit(project, "update to v2")

    # v3: the user-owned override file is renamed (with a migration) and a question is added.
    run("git", "mv", "template/compose.override.yaml.jinja", "template/compose.local.yaml.jinja", cwd=template)
    rename_everywhere(template, "compose.override.yaml", "compose.local.yaml")
    (template / "hooks" / "migrations.yml").write_text(
        '- version: "3.0.0"\n  rename:\n    from: compose.override.yaml\n    to: compose.local.yaml\n'
    )
    questions = template / "copier.yml"
    new_question = "\nbackup_keep_days:\n  type: int\n  help: Days of backups to keep\n  default: 14\n"
    questions.write_text(questions.read_text() + new_question)
    release(template, template, "v3.0.0")
    result = copier("update", "--trust", "--defaults", "--vcs-ref=v3.0.0", cwd=project)
    assert "migration 3.0.0: moved compose.override.yaml -> compose.local.yaml" in result.stdout, result.stderr
    assert_clean_merge(project)
    assert not (project / "compose.override.yaml").exists()
    assert (project / "compose.local.yaml").read_text() == USER_CHANGES["compose.override.yaml"]
    assert "compose.local.yaml" in (project / "Makefile").read_text()
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["backup_keep_days"] == 14 and answers["_commit"] == "v3.0.0"
    assert snapshot(project, list(secrets)) == secrets
    assert main_py.read_text() == app_code
    assert (project / "nginx/locations.d/robots.conf").read_text() == USER_CHANGES["nginx/locations.d/robots.conf"]
    run("docker-compose", "-f", "compose.yaml", "-f", "compose.local.yaml", "config", "--quiet", cwd=project)


def test_update_with_changed_answers_adds_and_removes_files(tmp_path: Path) -> None:
    template, project = tmp_path / "template", tmp_path / "project"
    release(TEMPLATE, template, "v1.0.0")
    copier(
        "copy",
        "--trust",
        "--defaults",
        "--vcs-ref=v1.0.0",
        "--data=proxy_mode=npm",
        "--data=services=[postgres]",
        str(template),
        str(project),
    )
    run("git", "init", "-q", cwd=project)
    (project / ".env").write_text("POSTGRES_MEMORY=2G\n")
    (project / "compose.override.yaml").write_text("services:\n  postgres:\n    shm_size: 256m\n")
    commit(project, "generated")
    kept = snapshot(project, [".env", "compose.override.yaml", "secrets/postgres_password"])

    copier(
        "update",
        "--trust",
        "--defaults",
        "--vcs-ref=v1.0.0",
        "--data=proxy_mode=nginx-certbot",
        "--data=services=[postgres, redis]",
        cwd=project,
    )
    assert_clean_merge(project)
    for path in ("proxy/Dockerfile", "certbot/entrypoint.sh", "redis/start-redis.sh", "secrets/redis_password"):
        assert (project / path).is_file(), path
    compose = (project / "compose.yaml").read_text()
    assert "  proxy:" in compose and "  redis:" in compose and "npm_proxy_network" not in compose
    assert snapshot(project, list(kept)) == kept
    commit(project, "self-hosted proxy and redis")

    copier(
        "update", "--trust", "--defaults", "--vcs-ref=v1.0.0", "--data=proxy_mode=npm", "--data=services=[postgres]", cwd=project
    )
    assert not (project / "proxy").exists() and not (project / "certbot").exists() and not (project / "redis").exists()
    assert snapshot(project, list(kept)) == kept


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("dirty", "Destination repository is dirty"),
        ("downgrade", "Downgrades are not supported"),
        ("broken answers", ".copier-answers.yml"),
    ],
)
def test_update_refuses_bad_states_with_a_clear_message(tmp_path: Path, state: str, message: str) -> None:
    template, project = tmp_path / "template", tmp_path / "project"
    release(TEMPLATE, template, "v1.0.0")
    release(template, template, "v2.0.0")
    copier("copy", "--trust", "--defaults", "--vcs-ref=v2.0.0", str(template), str(project))
    run("git", "init", "-q", cwd=project)
    commit(project, "generated")
    before = run("git", "rev-parse", "HEAD", cwd=project).stdout
    if state == "dirty":
        (project / "compose.yaml").write_text((project / "compose.yaml").read_text() + "# local edit\n")
    elif state == "broken answers":
        (project / ".copier-answers.yml").write_text((project / ".copier-answers.yml").read_text() + "domain: [unclosed\n")
        commit(project, "break the answers")
        before = run("git", "rev-parse", "HEAD", cwd=project).stdout
    ref = "v1.0.0" if state == "downgrade" else "v2.0.0"
    result = copier("update", "--trust", "--defaults", f"--vcs-ref={ref}", cwd=project, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert run("git", "rev-parse", "HEAD", cwd=project).stdout == before
    changed = run("git", "status", "--porcelain", cwd=project).stdout
    assert changed == (" M compose.yaml\n" if state == "dirty" else "")


def managed_files(project: Path, user_owned: list[str]) -> dict[str, bytes]:
    """Every file the template manages: all but .git, secrets/ and the named user-owned files.
    The answers file without `_commit` (a dirty template gets a new throw-away commit each time)."""
    files = {
        name: path.read_bytes()
        for path in project.rglob("*")
        if path.is_file()
        and (name := str(path.relative_to(project))) not in user_owned
        and not name.startswith((".git/", "secrets/"))
    }
    answers = files[".copier-answers.yml"].splitlines(keepends=True)
    files[".copier-answers.yml"] = b"".join(line for line in answers if not line.startswith(b"_commit:"))
    return files


@pytest.mark.parametrize(
    "answers",
    [ANSWERS, ["--data=frontend=spa", "--data=proxy_mode=nginx-certbot", "--data=services=[postgres]"]],
    ids=["npm-spa", "nginx-certbot-spa"],
)
def test_update_from_the_oldest_release_tag_to_head(tmp_path: Path, answers: list[str]) -> None:
    """An update lands exactly on a fresh copy: files the new version moved or dropped are gone
    (Copier deletes managed files it no longer renders), new ones are there, the user's stay."""
    tags = run("git", "tag", "--list", "v*", "--sort=v:refname", cwd=TEMPLATE).stdout.split()
    if not tags:
        pytest.skip("no release tag yet: the first release makes this test run")
    project, fresh = tmp_path / "project", tmp_path / "fresh"
    copier("copy", "--trust", "--defaults", f"--vcs-ref={tags[0]}", *answers, str(TEMPLATE), str(project))
    run("git", "init", "-q", cwd=project)
    mine = [".env", "compose.override.yaml", "nginx/locations.d/robots.conf"]
    for name in mine:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(USER_CHANGES[name])
    commit(project, "generated at the oldest release")
    kept = snapshot(project, mine)
    copier("update", "--trust", "--defaults", "--vcs-ref=HEAD", cwd=project)
    assert_clean_merge(project)
    assert snapshot(project, mine) == kept
    copier("copy", "--trust", "--defaults", "--vcs-ref=HEAD", *answers, str(TEMPLATE), str(fresh))
    updated, expected = managed_files(project, mine), managed_files(fresh, mine)
    assert sorted(updated.keys() - expected.keys()) == [], "left over from the old release"
    assert sorted(expected.keys() - updated.keys()) == [], "missing after the update"
    assert [name for name in expected if updated[name] != expected[name]] == []
    run("docker-compose", "-f", "compose.yaml", "-f", "compose.override.yaml", "config", "--quiet", cwd=project)


def test_update_adds_the_redis_admin_secret_and_keeps_the_application_password(tmp_path: Path) -> None:
    """A project from before the Redis admin user (one Redis secret) updated: the update creates
    secrets/redis_admin_password for the redis service alone, and the application keeps its
    password and its own settings.py (which logs in with the password alone, as `default`)."""
    template, project = tmp_path / "template", tmp_path / "project"
    release(TEMPLATE, template, "v1.0.0")
    common = template / "includes" / "common.jinja"
    today = common.read_text()
    both = "['redis_password', 'redis_admin_password'] if has_redis"
    assert both in today
    common.write_text(today.replace(both, "['redis_password'] if has_redis"))
    release(template, template, "v1.1.0")
    copier("copy", "--trust", "--defaults", "--vcs-ref=v1.1.0", "--data=services=[redis]", str(template), str(project))
    assert not (project / "secrets" / "redis_admin_password").exists()
    run("git", "init", "-q", cwd=project)
    commit(project, "generated before the admin user")
    kept = snapshot(project, ["secrets/redis_password", "backend/app/settings.py"])

    common.write_text(today)
    release(template, template, "v2.0.0")
    copier("update", "--trust", "--defaults", "--vcs-ref=v2.0.0", cwd=project)
    assert_clean_merge(project)
    assert snapshot(project, list(kept)) == kept
    admin_password = (project / "secrets" / "redis_admin_password").read_text()
    assert len(admin_password) >= 43 and admin_password != kept["secrets/redis_password"].decode()
    services = yaml.safe_load((project / "compose.yaml").read_text())["services"]
    assert [s if isinstance(s, str) else s["source"] for s in services["redis"]["secrets"]] == [
        "redis_password",
        "redis_admin_password",
    ]
    assert "redis_admin_password" not in str(services["backend"])


def test_update_to_the_migrate_service_says_what_requirements_in_lacks(tmp_path: Path) -> None:
    """A skeleton project from before schema migrations, updated: it gets backend/migrations/ and
    the migrate service, its own requirements.in stays as it is, and the update says which pins
    to add (else migrate, and so the backend, could not start)."""
    template, project = tmp_path / "template", tmp_path / "project"
    release(TEMPLATE, template, "v1.0.0")
    (requirements_in,) = (template / "template" / "backend").glob("*requirements.in*")
    today = requirements_in.read_text()
    pins = [line for line in today.splitlines() if line.lower().startswith(("alembic==", "sqlalchemy=="))]
    assert len(pins) == 2
    requirements_in.write_text("".join(line + "\n" for line in today.splitlines() if line not in pins))
    release(template, template, "v1.1.0")
    copier("copy", "--trust", "--defaults", "--vcs-ref=v1.1.0", "--data=services=[postgres]", str(template), str(project))
    run("git", "init", "-q", cwd=project)
    commit(project, "generated before the migrations")
    kept = snapshot(project, ["backend/requirements.in"])

    requirements_in.write_text(today)
    release(template, template, "v2.0.0")
    result = copier("update", "--trust", "--defaults", "--vcs-ref=v2.0.0", cwd=project)
    assert_clean_merge(project)
    assert snapshot(project, list(kept)) == kept
    assert (project / "backend" / "migrations" / "env.py").is_file()
    warning = f"backend/requirements.in (yours: an update never changes it) lacks {', '.join(pins)}."
    assert warning in " ".join(result.stderr.split()), result.stderr
    assert "run `make lock`" in result.stderr
