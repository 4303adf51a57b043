"""A person answers the questions in a real terminal: typing, a validation error, a multi-select.

The command is the README's first command, run verbatim (only the destination is a temporary
directory), so the documented set-up is what the test proves."""

import os
import re
import shutil
from pathlib import Path

import pexpect
import pytest
import yaml

from conftest import TEMPLATE

CLEAR_LINE = "\x15"  # Ctrl-U: discard the pre-filled default
DOWN = "\x1b[B"
ENTER = "\r"


def readme_commands() -> tuple[str, str]:
    """The two set-up commands of the README: generate a project, run the test suite."""
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", (TEMPLATE / "README.md").read_text(), re.S)
    assert block, "README.md has no '## Two commands' shell block"
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    return commands[0], commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (TEMPLATE / ".ci" / "run").read_text()
    assert f"exec {readme_commands()[1]}" in ci


@pytest.mark.e2e
def test_interactive_copy_with_multiselect_and_validation_error(tmp_path: Path) -> None:
    destination = tmp_path / "demo"
    generate = readme_commands()[0]
    assert generate.endswith(" ../my-app")
    env = {**os.environ, "HARDENED_COMPOSE_PIN": "off", "PROMPT_TOOLKIT_NO_CPR": "1"}
    if not shutil.which("sudo"):  # root on a machine without sudo (CI): the same command, as root
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (shim / "sudo").chmod(0o755)
        env["PATH"] = f"{shim}:{env['PATH']}"
    child = pexpect.spawn(
        "bash",
        ["-c", generate.removesuffix("../my-app") + str(destination)],
        cwd=TEMPLATE,
        # No cursor-position requests: pexpect does not answer them, prompt_toolkit would wait.
        env=env,
        encoding="utf-8",
        timeout=30,
        dimensions=(50, 160),
    )
    transcript = tmp_path / "transcript.txt"
    child.logfile_read = transcript.open("w")

    def answer(prompt: str, keys: str) -> None:
        child.expect_exact(prompt)
        child.send(keys)

    try:
        # The first run of `pipx run` downloads Copier.
        child.expect_exact("Human-readable project name", timeout=180)
        child.send(CLEAR_LINE + "Demo Shop" + ENTER)
        answer("Slug used for image", ENTER)
        answer("One-line description", ENTER)
        # A typo first: the validator's message appears and the prompt stays open.
        answer("Public domain name", CLEAR_LINE + "demo example" + ENTER)
        child.expect_exact("domain: must be a lowercase fully-qualified domain name")
        child.send(CLEAR_LINE + "demo.example.org" + ENTER)
        answer("Other names of the site", CLEAR_LINE + "www.demo.example.org" + ENTER)
        answer("Contact e-mail", ENTER)
        answer("Backend code", ENTER)
        answer("Python version", ENTER)
        answer("Frontend", ENTER)
        answer("Node.js major version", ENTER)
        # postgres and redis are pre-selected; move to "Celery worker(s)" and tick it.
        answer("Services to include", DOWN + DOWN + " " + ENTER)
        answer("Celery queues", CLEAR_LINE + "default,long" + ENTER)
        answer("How traffic reaches the app", ENTER)
        answer("Name of the external Docker network", ENTER)
        answer("Also render stack.yaml for Docker Swarm", ENTER)
        answer("Other CORS origins", ENTER)
        answer("PostgreSQL major version", ENTER)
        answer("Redis version", ENTER)
        answer("nginx version", ENTER)
        answer("Lowest vulnerability severity", ENTER)
        answer("Dependency update bot", ENTER)
        answer("CPUs (cores) of the host", CLEAR_LINE + "2" + ENTER)
        answer("Memory of the host in GB", CLEAR_LINE + "4" + ENTER)
        child.expect_exact('Project "Demo Shop" is ready')
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript.read_text()

    answers = yaml.safe_load((destination / ".copier-answers.yml").read_text())
    assert answers["domain"] == "demo.example.org"
    assert answers["project_slug"] == "demo_shop"
    assert answers["services"] == ["postgres", "redis", "celery_worker"]
    assert (answers["extra_domains"], answers["swarm"], answers["host_cpus"], answers["host_memory_gb"]) == (
        "www.demo.example.org",
        False,
        "2",
        "4",
    )
    compose = (destination / "compose.yaml").read_text()
    assert "worker_default:" in compose and "worker_long:" in compose
    assert (destination / "secrets" / "postgres_password").is_file()
