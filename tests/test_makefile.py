"""The generated Makefile with the real make and git: image tags follow the repository's version."""

import subprocess
from pathlib import Path

import yaml

from conftest import compose_model, render, run


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
