"""Digest pinning against a real registry (Debian's docker-registry on 127.0.0.1)."""

import hashlib
import os
import runpy
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from registry import FaultProxy, Faults, Registry, TokenServer, push_image

from conftest import TEMPLATE, release, render, run

MIRRORS = "HARDENED_COMPOSE_REGISTRY_MIRRORS"
# The image:tag references a full-topology project uses (see includes/common.jinja).
UPSTREAM_REFS = sorted(
    {
        "python:3.12-slim",
        "node:22-alpine",
        "nginxinc/nginx-unprivileged:1.28-alpine",
        "postgres:17-alpine",
        "redis:7.4-alpine",
        "certbot/certbot:v5.7.0",
    }
)
FULL = {
    "frontend": "spa",
    "proxy_mode": "nginx-certbot",
    "services": ["postgres", "redis", "celery_worker", "celery_beat"],
}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    (tmp_path / "registry").mkdir()
    server = Registry(tmp_path / "registry")
    yield server
    server.close()


@pytest.fixture(scope="module")
def pin_module(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The rendered scripts/pin_images.py, loaded as a module (for its Resolver and helpers)."""
    project = render(tmp_path_factory.mktemp("module") / "p", **FULL)
    return runpy.run_path(str(project / "scripts" / "pin_images.py"))


def references(project: Path, pin_module: dict) -> list[str]:
    found = []
    for path in pin_module["find_files"](project):
        for match, group in pin_module["references_in"](path, path.read_text()):
            found.append(match.group(group))
    return found


def push_all(registry: Registry, refs: list[str], pin_module: dict, seed: str = "") -> dict[str, str]:
    digests = {}
    for tagged in refs:
        ref = pin_module["Reference"].parse(tagged)
        digests[tagged] = push_image(registry, ref.repository, ref.tag, "oci-index", seed)
    return digests


def resolver(pin_module: dict, url: str, **kwargs: float):
    return pin_module["Resolver"](mirrors={"docker.io": url}, **kwargs)


def test_copy_pins_every_reference_to_its_index_digest(registry: Registry, pin_module: dict, tmp_path: Path) -> None:
    pushed = push_all(registry, UPSTREAM_REFS, pin_module)
    project = render(tmp_path / "p", env={MIRRORS: f"docker.io={registry.url}", "HARDENED_COMPOSE_PIN": "on"}, **FULL)

    found = references(project, pin_module)
    assert found and all("@sha256:" in ref for ref in found), found
    for ref in found:
        tagged, _, digest = ref.partition("@")
        assert pushed[tagged] == digest
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["image_digests"] == pushed
    # The same digest skopeo computes from the manifest it fetches itself.
    raw = run(
        "skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://127.0.0.1:{registry.port}/library/postgres:17-alpine"
    )
    assert pushed["postgres:17-alpine"] == "sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest()
    # Build stages and the project's own images are left alone.
    dockerfile = (project / "backend" / "Dockerfile").read_text()
    assert f"FROM python:3.12-slim@{pushed['python:3.12-slim']} AS build" in dockerfile
    assert "image: my_app-backend:${IMAGE_TAG:-latest}\n" in (project / "compose.yaml").read_text()
    run("docker-compose", "-f", "compose.yaml", "config", "--quiet", cwd=project)


@pytest.mark.parametrize("kind", ["oci-index", "docker-list", "single"])
def test_resolver_pins_manifest_lists_and_warns_on_single_platform(registry: Registry, pin_module: dict, kind: str) -> None:
    pushed = push_image(registry, "library/demo", "1.0", kind)
    r = resolver(pin_module, registry.url)
    assert r.resolve(pin_module["Reference"].parse("demo:1.0")) == pushed
    assert r.requests == 1 and r.bytes_received < 8192
    assert bool(r.warnings) == (kind == "single")


def test_missing_digest_header_falls_back_to_hashing_the_manifest(registry: Registry, pin_module: dict) -> None:
    pushed = push_image(registry, "library/demo", "1.0")
    proxy = FaultProxy(registry.url, Faults(strip_digest_header=True))
    try:
        assert resolver(pin_module, proxy.url).resolve(pin_module["Reference"].parse("demo:1.0")) == pushed
        assert [m for m, *_ in proxy.faults.log] == ["HEAD", "GET"]
    finally:
        proxy.close()


def test_token_auth_401_then_token_then_success_with_token_cache(tmp_path: Path, pin_module: dict) -> None:
    tokens = TokenServer(tmp_path)
    server = Registry(tmp_path, tokens)
    try:
        pushed = push_image(server, "library/demo", "1.0")
        push_image(server, "library/demo", "2.0")
        # Without a token the registry refuses: the resolver must follow the Bearer challenge.
        url = f"{server.url}/v2/library/demo/manifests/1.0"
        status = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url).stdout
        assert status == "401"
        r = resolver(pin_module, server.url)
        before = tokens.requests
        assert r.resolve(pin_module["Reference"].parse("demo:1.0")) == pushed
        r.resolve(pin_module["Reference"].parse("demo:2.0"))
        assert tokens.requests - before == 1, "one token per scope, cached"
        tokens.deny = True
        fresh = resolver(pin_module, server.url)
        with pytest.raises(pin_module["ResolveError"], match="token endpoint answered 401"):
            fresh.resolve(pin_module["Reference"].parse("demo:1.0"))
    finally:
        server.close()
        tokens.close()


def test_unknown_tag_is_a_clear_error_without_retries(registry: Registry, pin_module: dict) -> None:
    proxy = FaultProxy(registry.url)
    try:
        with pytest.raises(pin_module["ResolveError"], match="no such tag"):
            resolver(pin_module, proxy.url).resolve(pin_module["Reference"].parse("demo:missing"))
        assert len(proxy.faults.log) == 1
    finally:
        proxy.close()


def test_429_is_retried_with_backoff_then_succeeds(registry: Registry, pin_module: dict) -> None:
    pushed = push_image(registry, "library/demo", "1.0")
    proxy = FaultProxy(registry.url, Faults(status_first=429, status_count=2))
    try:
        r = resolver(pin_module, proxy.url, backoff=0.01)
        assert r.resolve(pin_module["Reference"].parse("demo:1.0")) == pushed
        assert [s for *_, s, _ in proxy.faults.log] == [429, 429, 200]
    finally:
        proxy.close()


def test_timeouts_are_bounded_and_reported(registry: Registry, pin_module: dict) -> None:
    proxy = FaultProxy(registry.url, Faults(hang_seconds=1.0))
    try:
        r = resolver(pin_module, proxy.url, timeout=0.2, backoff=0.01)
        with pytest.raises(pin_module["ResolveError"], match="timed out"):
            r.resolve(pin_module["Reference"].parse("demo:1.0"))
        assert r.requests == 4, "the first attempt and three retries"
    finally:
        proxy.close()


def test_registry_down_copy_succeeds_and_says_how_to_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRRORS, "docker.io=http://127.0.0.1:9")
    result = subprocess.run(
        ["copier", "copy", "--trust", "--defaults", "--vcs-ref=HEAD", str(TEMPLATE), str(tmp_path / "p")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "stay referenced by tag only" in result.stderr and "make pin" in result.stderr
    compose = (tmp_path / "p" / "compose.yaml").read_text()
    assert "image: postgres:17-alpine\n" in compose and "@sha256" not in compose
    assert yaml.safe_load((tmp_path / "p" / ".copier-answers.yml").read_text())["image_digests"] == {}


def test_rewrite_is_atomic(tmp_path: Path, pin_module: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    dockerfile = tmp_path / "Dockerfile"
    original = "FROM python:3.12-slim AS build\nFROM build\n"
    dockerfile.write_text(original)

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        pin_module["rewrite"](dockerfile, original, {"python:3.12-slim": "sha256:" + "a" * 64})
    assert dockerfile.read_text() == original
    assert [p.name for p in tmp_path.iterdir()] == ["Dockerfile"]


def test_second_run_changes_nothing_and_asks_nothing(registry: Registry, pin_module: dict, tmp_path: Path) -> None:
    push_all(registry, UPSTREAM_REFS, pin_module)
    project = render(tmp_path / "p", env={MIRRORS: f"docker.io={registry.url}", "HARDENED_COMPOSE_PIN": "on"}, **FULL)
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    r = resolver(pin_module, registry.url)
    assert pin_module["pin"](project, resolver=r) == 0
    assert r.requests == 0
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before


def test_check_mode_fails_on_unpinned_and_moved_tags(
    registry: Registry, pin_module: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    push_all(registry, UPSTREAM_REFS, pin_module)
    project = render(tmp_path / "p", env={MIRRORS: f"docker.io={registry.url}", "HARDENED_COMPOSE_PIN": "on"}, **FULL)
    check = pin_module["pin"]
    assert check(project, check=True, resolver=resolver(pin_module, registry.url)) == 0
    push_image(registry, "library/redis", "7.4-alpine", seed="rebuilt upstream")
    assert check(project, check=True, resolver=resolver(pin_module, registry.url)) == 1
    assert "redis:7.4-alpine: pinned sha256:" in capsys.readouterr().err
    compose = project / "compose.yaml"
    compose.write_text(compose.read_text().replace("@" + compose.read_text().split("postgres:17-alpine@")[1][:71], ""))
    assert check(project, check=True, resolver=resolver(pin_module, registry.url)) == 1
    assert "postgres:17-alpine: not pinned" in capsys.readouterr().err


def test_update_keeps_unchanged_pins_and_pins_changed_tags_without_conflicts(
    registry: Registry, pin_module: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MIRRORS, f"docker.io={registry.url}")
    template = tmp_path / "template"
    release(TEMPLATE, template, "v1.0.0")
    v1 = push_all(registry, UPSTREAM_REFS, pin_module)

    project = tmp_path / "project"
    run(
        "copier",
        "copy",
        "--trust",
        "--defaults",
        "--vcs-ref=v1.0.0",
        *[f"--data={k}={v}" for k, v in FULL.items() if k != "services"],
        "--data=services=[postgres, redis, celery_worker, celery_beat]",
        template,
        project,
    )
    run("git", "init", "-q", cwd=project)
    run("git", "add", "-A", cwd=project)
    run("git", "commit", "-q", "-m", "generated", cwd=project)

    # Upstream rebuilds every tag; the new template version changes only the Python base tag.
    push_all(registry, UPSTREAM_REFS, pin_module, seed="moved")
    new_python = push_image(registry, "library/python", "3.12-slim-bookworm", seed="new tag")
    common = template / "includes" / "common.jinja"
    common.write_text(common.read_text().replace("~ python_version ~ '-slim'", "~ python_version ~ '-slim-bookworm'"))
    release(template, template, "v2.0.0")

    run("copier", "update", "--trust", "--defaults", "--vcs-ref=v2.0.0", cwd=project)

    status = run("git", "status", "--porcelain", cwd=project).stdout
    assert not list(project.rglob("*.rej"))
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert "<<<<<<<" not in path.read_text(errors="replace"), path
    # (a) unchanged lines keep the project's digests although the registry moved the tags
    compose = (project / "compose.yaml").read_text()
    assert f"image: postgres:17-alpine@{v1['postgres:17-alpine']}" in compose
    assert f"FROM node:22-alpine@{v1['node:22-alpine']} AS build" in (project / "frontend" / "Dockerfile").read_text()
    # (b) the changed tag is freshly pinned
    backend = (project / "backend" / "Dockerfile").read_text()
    assert f"FROM python:3.12-slim-bookworm@{new_python} AS build" in backend
    assert "python:3.12-slim@" not in backend
    # (c) the answers record exactly the digests in use (the old python tag pruned)
    digests = yaml.safe_load((project / ".copier-answers.yml").read_text())["image_digests"]
    assert digests["python:3.12-slim-bookworm"] == new_python
    assert "python:3.12-slim" not in digests
    assert digests["redis:7.4-alpine"] == v1["redis:7.4-alpine"]
    assert "backend/Dockerfile" in status
