"""The generated CI enforces the hardening rules: the Security scan workflow's own commands, run
here in a rendered project as a runner runs them, fail a pull request whose override weakens a
service (compose.override.yaml, stack.override.yaml) and pass the project as generated.

Only the jobs that need nothing but the checkout run here (the others build images and run
Trivy). `docker compose` is the docker-compose binary of the test environment as a CLI plugin of
the machine's docker CLI, which has `docker stack config`.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import render, run

CHECKOUT = "actions/checkout@"
SECRET_FILES_KEPT = ("README.md", ".gitignore")


def checkout_only_jobs(project: Path) -> dict[str, list[dict]]:
    """job -> its `run:` steps, for every job of the workflow whose only action is the checkout."""
    workflow = yaml.safe_load((project / ".github" / "workflows" / "security-scan.yml").read_text())
    jobs = {}
    for name, job in workflow["jobs"].items():
        if all(step.get("uses", CHECKOUT).startswith(CHECKOUT) for step in job["steps"]):
            jobs[name] = [step for step in job["steps"] if "run" in step]
    return jobs


def as_checked_out(project: Path) -> None:
    """What a runner checks out: nothing git ignores (no secrets, no .env), every image pinned (the
    pins job passes)."""
    run("git", "init", "-q", cwd=project)
    run("git", "clean", "-q", "-f", "-d", "-X", cwd=project)
    assert {path.name for path in (project / "secrets").iterdir()} == set(SECRET_FILES_KEPT)
    assert not (project / ".env").exists()
    spec = importlib.util.spec_from_file_location("pin_images_ci", project / "scripts" / "pin_images.py")
    assert spec and spec.loader
    pin = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pin  # its dataclasses look their module up
    spec.loader.exec_module(pin)
    texts = {path: path.read_text() for path in pin.find_files(project)}
    found = {pin.Reference.parse(m.group(g)).tagged for path, text in texts.items() for m, g in pin.references_in(path, text)}
    pins = dict.fromkeys(found, "sha256:" + "0" * 64)
    for path, text in texts.items():
        path.write_text(pin.pinned_text(path, text, pins))


def run_jobs(project: Path, tmp_path: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each job's run steps in order, as GitHub runs them (bash -e, the step's env); a failing
    step ends its job. job -> the last step's result."""
    plugins = tmp_path / "docker-config" / "cli-plugins"
    if not plugins.exists():
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(shutil.which("docker-compose") or "docker-compose")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "HARDENED_COMPOSE_"))}
    base |= {"DOCKER_CONFIG": str(plugins.parent), "CI": "true"}
    results = {}
    for job, steps in checkout_only_jobs(project).items():
        for step in steps:
            assert "${{" not in step["run"], step  # nothing the runner would substitute
            env = base | {k: str(v) for k, v in (step.get("env") or {}).items()}
            result = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=project, env=env, capture_output=True, text=True)
            results[job] = result
            if result.returncode != 0:
                break
    return results


def failures(results: dict[str, subprocess.CompletedProcess[str]]) -> str:
    return "".join(f"{job}:\n{r.stdout}{r.stderr}" for job, r in results.items() if r.returncode != 0)


PRIVILEGED_BACKEND = "services:\n  backend:\n    privileged: true\n"
PROXY_DATABASE_SECRET = "services:\n  proxy:\n    secrets: [postgres_password]\n"

CASES = [
    (
        "compose-privileged",
        {"services": ["postgres", "redis"]},
        "compose.override.yaml",
        PRIVILEGED_BACKEND,
        "verify --config: backend: privileged: every capability and device of the host",
    ),
    (
        "compose-proxy-secret",
        {"proxy_mode": "nginx-certbot", "services": ["postgres"], "swarm": True},
        "compose.override.yaml",
        PROXY_DATABASE_SECRET,
        "verify --config: proxy: receives the secret postgres_password, which it does not read",
    ),
    (
        "stack-privileged",
        {"proxy_mode": "nginx-certbot", "services": ["postgres", "redis"], "swarm": True},
        "stack.override.yaml",
        PRIVILEGED_BACKEND,
        "verify --swarm --config: backend: privileged (Swarm ignores it)",
    ),
    (
        "stack-proxy-secret",
        {"proxy_mode": "nginx-certbot", "services": ["postgres"], "swarm": True},
        "stack.override.yaml",
        PROXY_DATABASE_SECRET,
        "verify --swarm --config: proxy: receives the secret postgres_password, which it does not read",
    ),
]


@pytest.mark.parametrize(("answers", "override", "weakening", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_workflow_commands_fail_a_weakened_override(
    tmp_path: Path, answers: dict, override: str, weakening: str, reason: str
) -> None:
    project = render(tmp_path / "project", project_name="CI Demo", **answers)
    as_checked_out(project)
    clean = run_jobs(project, tmp_path)
    assert clean and not failures(clean), failures(clean)

    as_checked_out(project)  # a fresh checkout again: the run above created throw-away secrets
    (project / override).write_text(weakening)
    weakened = run_jobs(project, tmp_path)
    assert failures(weakened), "the weakened override passed every job:\n" + "".join(r.stdout for r in weakened.values())
    assert reason in failures(weakened).splitlines() or any(
        line.startswith(reason) for line in failures(weakened).splitlines()
    ), failures(weakened)
