"""Shared helpers: render the template with Copier's API and read what it produced."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from copier import run_copy
from docker_engine import Engine, build_standins
from plumbum import local

TEMPLATE = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# record_property names of results printed in the terminal summary: a boot test's `docker stats`
# table, an independent grader's verdict (tests/test_graders.py), what the Swarm tests cost.
IDLE_MEMORY = "idle memory"
GRADE = "grade"
COST = "seconds per phase"


def render(dst: Path, env: dict[str, str] | None = None, tasks: bool = True, **data: object) -> Path:
    """Render the working tree of the template (uncommitted changes included) into dst.

    env: extra environment for the template's tasks (Copier hands tasks plumbum's copy of the
    environment, so os.environ changes made after start-up do not reach them). Digest pinning is
    off unless env says otherwise: the pinning tests bring their own registry. tasks=False renders
    the template's files only (no secrets, no pinning)."""
    with warnings.catch_warnings(), local.env(**{"HARDENED_COMPOSE_PIN": "off", **(env or {})}):
        warnings.filterwarnings("ignore", message="Dirty template changes included automatically")
        # A first copy: copier.yml's generated_before looks for the destination's answers file.
        warnings.filterwarnings("ignore", message="File not found; returning empty dict")
        run_copy(str(TEMPLATE), dst, data=data, defaults=True, unsafe=True, quiet=True, vcs_ref="HEAD", skip_tasks=not tasks)
    return dst


def copier_cli(destination: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`copier copy` as a user types it (non-interactive), from the template's working tree."""
    command = ["copier", "copy", "--trust", "--defaults", "--vcs-ref=HEAD", *options, str(TEMPLATE), str(destination)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HARDENED_COMPOSE_PIN": "off"})


def copier(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The copier command line (copy, update, recopy) as a user runs it, with digest pinning off."""
    env = {**os.environ, "HARDENED_COMPOSE_PIN": "off"}
    result = subprocess.run(["copier", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, f"copier {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def commit(project: Path, message: str) -> None:
    run("git", "add", "-A", cwd=project)
    run("git", "commit", "-q", "-m", message, cwd=project)


def run(*args: str | Path, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def self_signed_certificate(key: Path, cert: Path) -> None:
    """A throw-away certificate for localhost and 127.0.0.1 (key readable by the test servers)."""
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert)  # fmt: skip
    key.chmod(0o644)


def compose_model(project: Path, compose_file: str) -> dict:
    """The resolved Compose model, as `docker compose config` computes it (no daemon needed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run(
        ["docker-compose", "-f", compose_file, "config", "--format", "json"],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        pytest.fail(f"docker compose config -f {compose_file} failed:\n{result.stderr}")
    return json.loads(result.stdout)


def healthcheck_argv(service: dict) -> list[str]:
    """A service's healthcheck from the Compose model, as the engine runs it: CMD runs its
    arguments, CMD-SHELL hands its string to `/bin/sh -c` (no image here sets SHELL). `config`
    prints Compose's `$$` escapes; the engine receives them as `$`."""
    kind, *args = [part.replace("$$", "$") for part in service["healthcheck"]["test"]]
    assert kind in ("CMD", "CMD-SHELL"), service["healthcheck"]
    return ["/bin/sh", "-c", *args] if kind == "CMD-SHELL" else args


def outside_the_image(argv: list[str], dockerfile: Path) -> list[str]:
    """A command written for the image, run on this machine: paths the Dockerfile copies from its
    build context become those files in the project, and the image's Python is the tests' own."""
    copied = {}
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            *sources, target = [word for word in words[1:] if not word.startswith("--")]
            if len(sources) == 1:
                copied[target] = str(dockerfile.parent / sources[0])
    python = {"python": sys.executable, "python3": sys.executable}
    return [python.get(argv[0], argv[0]), *(copied.get(arg, arg) for arg in argv[1:])]


def backend_command(project: Path, port: int) -> list[str]:
    """The backend image's CMD, run here: on 127.0.0.1:port, with the scripts the image copies
    from the project and the tests' own uvicorn."""
    dockerfile = (project / "backend" / "Dockerfile").read_text()
    command = json.loads(next(line for line in dockerfile.splitlines() if line.startswith("CMD ")).removeprefix("CMD "))
    copied = dict(re.findall(r"^COPY (docker/\S+) (/usr/local/bin/\S+)$", dockerfile, re.M))
    script = command[-1].replace("--host 0.0.0.0 --port 8000", f"--host 127.0.0.1 --port {port}")
    for source, target in copied.items():
        script = script.replace(target, str(project / "backend" / source))
    return [*command[:-1], script]


def rendered_verify(project: Path) -> ModuleType:
    """The project's own scripts/verify.py as a module: its hardening rules, for the tests to apply."""
    spec = importlib.util.spec_from_file_location(f"verify_{project.parent.name}", project / "scripts" / "verify.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def release(source: Path, repo: Path, tag: str) -> None:
    """Commit the template tree at source into the git repository repo as release `tag`.

    The first call copies the template's files (tracked and new, as git lists them) into a new
    repository; later calls commit what the test changed there."""
    if not repo.exists():
        names = run("git", "ls-files", "-z", "-co", "--exclude-standard", cwd=source).stdout.split("\0")
        for name in filter(None, names):
            if (source / name).is_file():
                (repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, repo / name)
        run("git", "init", "-q", "-b", "main", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-q", "--allow-empty", "-m", tag, cwd=repo)
    run("git", "tag", tag, cwd=repo)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The one Docker engine in the host's network namespace, with the stand-in base images: the
    boot tests run on it and the Swarm tests build their images on it. They share it through the
    xdist group "docker": two engines there would rewrite each other's docker0 and firewall rules."""
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("debootstrap"):
        pytest.skip("boot tests need root, dockerd and debootstrap (tests/run.sh installs them)")
    engine = Engine()
    try:
        build_standins(engine)
        yield engine
    finally:
        engine.stop()


@pytest.fixture(autouse=True, scope="session")
def git_identity() -> None:
    """Commits made by the tests (and by Copier during updates) need an author on CI machines."""
    identity = {"NAME": "Test", "EMAIL": "test@example.org"}
    for role in ("AUTHOR", "COMMITTER"):
        for field, value in identity.items():
            key = f"GIT_{role}_{field}"
            os.environ.setdefault(key, value)
            local.env[key] = os.environ[key]  # the copy Copier hands to its tasks and git


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The boot tests' idle memory tables, the graders' verdicts and the Swarm tests' costs, shown whatever the capture
    mode, with or without xdist (record_property travels with the test report from the worker)."""
    for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed"):
        for name, value in report.user_properties:
            if name in (IDLE_MEMORY, GRADE, COST) and report.when == "call":
                terminalreporter.write_sep("-", f"{name}: {report.nodeid}")
                terminalreporter.write_line(str(value))
