"""Digest pinning against a real registry (Debian's docker-registry on 127.0.0.1)."""

import base64
import hashlib
import json
import os
import re
import resource
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from registry import FaultProxy, Faults, Registry, TokenServer, free_port, push_image

from conftest import TEMPLATE, release, render, run, self_signed_certificate

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
    return [ref for path in pin_module["find_files"](project) for ref in references_in(path, pin_module)]


def references_in(path: Path, pin_module: dict) -> list[str]:
    return [match.group(group) for match, group in pin_module["references_in"](path, path.read_text())]


def push_all(registry: Registry, refs: list[str], pin_module: dict, seed: str = "") -> dict[str, str]:
    digests = {}
    for tagged in refs:
        ref = pin_module["Reference"].parse(tagged)
        digests[tagged] = push_image(registry, ref.repository, ref.tag, "oci-index", seed)
    return digests


def resolver(pin_module: dict, url: str, **kwargs: float):
    return pin_module["Resolver"](mirrors={"docker.io": url}, **kwargs)


def snapshot(project: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}


# The project's scripts run on servers with a plain python3: the real interpreter, isolated from
# this environment and without site-packages (so without PyYAML).
PLAIN_PYTHON = [sys.executable, "-I", "-S"]


def run_pin_script(project: Path, *args: str, env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    command = [*PLAIN_PYTHON, "scripts/pin_images.py", *args]
    return subprocess.run(command, cwd=project, env={**os.environ, **env}, capture_output=True, text=True, **kwargs)


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
    assert "image: my_app-backend:${IMAGE_TAG:-local}\n" in (project / "compose.yaml").read_text()
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


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_5xx_are_retried_with_backoff_then_succeed(registry: Registry, pin_module: dict, status: int) -> None:
    pushed = push_image(registry, "library/demo", "1.0")
    proxy = FaultProxy(registry.url, Faults(status_first=status, status_count=2))
    try:
        r = resolver(pin_module, proxy.url, backoff=0.01)
        assert r.resolve(pin_module["Reference"].parse("demo:1.0")) == pushed
        assert [s for *_, s, _ in proxy.faults.log] == [status, status, 200]
    finally:
        proxy.close()


@pytest.mark.parametrize("registry_url", ["closed port", "http://registry.invalid:5000"])
def test_unreachable_registry_costs_one_attempt_per_image_and_no_wait(
    registry_url: str, pin_module: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused connection or a host name that does not resolve will not work a moment later."""
    url = f"http://127.0.0.1:{free_port()}" if registry_url == "closed port" else registry_url  # nothing listens
    project = render(tmp_path / "p", **FULL)
    before = snapshot(project)
    r = resolver(pin_module, url)
    start = time.monotonic()
    assert pin_module["pin"](project, resolver=r) == 1
    elapsed = time.monotonic() - start
    assert r.requests == len(UPSTREAM_REFS), "one attempt per image, no retries"
    assert elapsed < 2, f"{elapsed:.1f} s"  # a generous regression guard; it takes a few ms
    assert snapshot(project) == before
    err = capsys.readouterr().err
    assert f"WARNING: {len(UPSTREAM_REFS)} image references stay on their tag only" in err and "make pin" in err
    assert err.count(" unreachable: ") == 1, "the reason is said once"
    assert all(f"    {ref}\n" in err for ref in UPSTREAM_REFS)


def test_one_deadline_bounds_all_lookups_however_many_time_out(
    registry: Registry, pin_module: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = FaultProxy(registry.url, Faults(hang_seconds=3.0))
    try:
        project = render(tmp_path / "p", **FULL)
        r = resolver(pin_module, proxy.url, timeout=10.0, deadline=0.6)
        start = time.monotonic()
        assert pin_module["pin"](project, resolver=r) == 1
        elapsed = time.monotonic() - start
        assert elapsed < 1.5, f"{elapsed:.1f} s: not bounded by the 0.6 s deadline"
        assert r.requests == len(UPSTREAM_REFS), "no retry once the deadline is reached"
        assert "unreachable: timed out" in capsys.readouterr().err
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
    assert "stay on their tag only" in result.stderr and "make pin" in result.stderr
    compose = (tmp_path / "p" / "compose.yaml").read_text()
    assert "image: postgres:17-alpine\n" in compose and "@sha256" not in compose
    assert yaml.safe_load((tmp_path / "p" / ".copier-answers.yml").read_text())["image_digests"] == {}


def test_pin_and_check_run_on_a_plain_python_without_yaml(registry: Registry, pin_module: dict, tmp_path: Path) -> None:
    assert subprocess.run([*PLAIN_PYTHON, "-c", "import yaml"], capture_output=True).returncode != 0
    pushed = push_all(registry, UPSTREAM_REFS, pin_module)
    project = render(tmp_path / "p", **FULL)
    env = {MIRRORS: f"docker.io={registry.url}"}
    answers = project / ".copier-answers.yml"
    generated = answers.read_text()

    before = snapshot(project)
    check = run_pin_script(project, "--check", env=env)
    assert check.returncode == 1 and "python:3.12-slim: not pinned" in check.stderr, check.stderr
    assert snapshot(project) == before, "--check writes nothing"

    result = run_pin_script(project, env=env)
    assert result.returncode == 0, result.stderr
    assert "pin: pinned 6 image references" in result.stdout
    assert all(ref.partition("@")[2] == pushed[ref.partition("@")[0]] for ref in references(project, pin_module))
    assert yaml.safe_load(answers.read_text())["image_digests"] == pushed
    # Only the image_digests entry changed, and it reads as Copier writes it: a project Copier
    # renders from these digests has the same answers file and the same pinned files.
    changed = [line for line in answers.read_text().splitlines() if line not in generated.splitlines()]
    assert changed == ["image_digests:"] + [f"    {ref}: {digest}" for ref, digest in sorted(pushed.items())]
    assert "image_digests: {}" not in answers.read_text()
    rendered = render(tmp_path / "rendered", image_digests=pushed, **FULL)
    for path in [answers, *pin_module["find_files"](project)]:
        assert without_commit(path) == without_commit(rendered / path.relative_to(project)), path

    after = snapshot(project)
    check = run_pin_script(project, "--check", env=env)
    assert check.returncode == 0, check.stderr
    assert run_pin_script(project, env=env).returncode == 0
    assert snapshot(project) == after, "a second run changes nothing"


def without_commit(path: Path) -> str:
    """The file's text without Copier's _commit line (a render of a dirty template tree gets a new one)."""
    return "".join(line for line in path.read_text().splitlines(keepends=True) if not line.startswith("_commit:"))


@pytest.mark.parametrize(
    "entry",
    [
        "image_digests: {}\n",
        'image_digests: {"old:1": "sha256:' + "b" * 64 + '"}\n',
        "image_digests:\n    old:1: sha256:" + "b" * 64 + "\n\n    # a comment\n    '1:30': sha256:" + "c" * 64 + "\n",
        "",  # a project from before the answer existed
    ],
)
def test_the_answers_entry_is_replaced_in_place_whatever_its_style(pin_module: dict, entry: str) -> None:
    before, after = "# header\n_commit: v1\nfrontend: spa\n", "# kept\nservices:\n- postgres\nupdate_bot: none"
    digests = {"redis:7.4-alpine": "sha256:" + "a" * 64, "1:30": "sha256:" + "d" * 64}
    text = pin_module["answers_with_digests"](before + entry + after, digests)
    assert text.startswith(before) and (text.endswith(after) or not entry)
    assert yaml.safe_load(text) == {**yaml.safe_load(before + after), "image_digests": digests}
    assert pin_module["answers_with_digests"](text, digests) == text


def test_a_write_failure_part_way_leaves_every_file_unchanged(registry: Registry, pin_module: dict, tmp_path: Path) -> None:
    """A real write error (file size limit: like a full disk, and root is not exempt) after some files were written."""
    push_all(registry, UPSTREAM_REFS, pin_module)
    project = render(tmp_path / "p", **FULL)
    before = snapshot(project)
    # Files are written in find_files' order: the first one fits, a later one does not.
    sizes = [len(before[path]) for path in pin_module["find_files"](project) if references_in(path, pin_module)]
    limit = sizes[0] + 1000
    assert max(sizes[1:]) > limit

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_pin_script(project, env={MIRRORS: f"docker.io={registry.url}"}, preexec_fn=limit_file_size)
    assert result.returncode != 0 and "File too large" in result.stderr, result.stderr
    assert snapshot(project) == before


def test_a_failing_replacement_puts_back_the_files_already_replaced(
    registry: Registry, pin_module: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_all(registry, UPSTREAM_REFS, pin_module)
    project = render(tmp_path / "p", **FULL)
    before = snapshot(project)
    replace, calls = os.replace, []

    def third_replacement_fails(source: str, target: Path) -> None:
        calls.append(target)
        if len(calls) == 3:
            raise OSError("device went away")
        replace(source, target)

    monkeypatch.setattr(os, "replace", third_replacement_fails)
    with pytest.raises(OSError, match="device went away"):
        pin_module["pin"](project, resolver=resolver(pin_module, registry.url))
    assert len(calls) > 3, "two files were replaced, then put back"
    assert snapshot(project) == before


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
    # Offline (the generated CI workflow): a moved tag is no failure, and no registry is asked.
    offline = resolver(pin_module, registry.url)
    assert check(project, check=True, offline=True, resolver=offline) == 0
    assert offline.requests == 0
    compose = project / "compose.yaml"
    compose.write_text(compose.read_text().replace("@" + compose.read_text().split("postgres:17-alpine@")[1][:71], ""))
    assert check(project, check=True, resolver=resolver(pin_module, registry.url)) == 1
    assert "postgres:17-alpine: not pinned" in capsys.readouterr().err
    assert check(project, check=True, offline=True, resolver=offline) == 1
    assert "postgres:17-alpine: not pinned" in capsys.readouterr().err
    assert offline.requests == 0


def test_the_ci_workflow_checks_pins_offline_as_documented(pin_module: dict, tmp_path: Path) -> None:
    """The Security scan workflow runs the offline check with the server's plain python3: it fails
    on an unpinned reference and passes once every reference carries a digest, with no registry."""
    project = render(tmp_path / "p", **FULL)
    workflow = yaml.safe_load((project / ".github/workflows/security-scan.yml").read_text())
    steps = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    command = "python3 scripts/pin_images.py --check --offline"
    assert command in steps
    argv = [*PLAIN_PYTHON, *command.split()[1:]]
    unreachable = {MIRRORS: "docker.io=http://127.0.0.1:9"}  # any lookup would fail
    failed = subprocess.run(argv, cwd=project, env={**os.environ, **unreachable}, capture_output=True, text=True)
    assert failed.returncode == 1 and "python:3.12-slim: not pinned" in failed.stderr, failed.stderr
    for path in pin_module["find_files"](project):
        digests = {tagged: "sha256:" + hashlib.sha256(tagged.encode()).hexdigest() for tagged in references_in(path, pin_module)}
        path.write_text(pin_module["pinned_text"](path, path.read_text(), digests))
    passed = subprocess.run(argv, cwd=project, env={**os.environ, **unreachable}, capture_output=True, text=True)
    assert passed.returncode == 0, passed.stderr
    assert "--offline checks only" in run_pin_script(project, "--offline", env={}).stderr


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


@pytest.fixture
def registry_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Stores a login for a host in ~/.docker/config.json; returns the Authorization header it makes."""
    auth = base64.b64encode(b"tester:secret-password").decode()
    config = tmp_path / "docker-config"
    config.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config))

    def login(host: str) -> str:
        (config / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
        return f"Basic {auth}"

    return login


@pytest.mark.parametrize(("realm_host", "sent"), [("127.0.0.1", True), ("localhost", False)])
def test_credentials_go_to_a_plain_http_token_endpoint_only_on_the_registrys_own_host(
    tmp_path: Path, pin_module: dict, registry_login: Callable[[str], str], realm_host: str, sent: bool
) -> None:
    tokens = TokenServer(tmp_path)
    server = Registry(tmp_path, tokens, realm=f"http://{realm_host}:{tokens.port}/token")
    try:
        pushed = push_image(server, "team/demo", "1.0")
        host = f"127.0.0.1:{server.port}"  # a private registry, named in the image reference
        basic = registry_login(host)
        r = pin_module["Resolver"](mirrors={host: server.url})  # http: the test registry has no TLS
        assert r.resolve(pin_module["Reference"].parse(f"{host}/team/demo:1.0")) == pushed, "an anonymous token works"
        assert tokens.authorizations == [basic if sent else None]
        assert any("not sent" in w for w in r.warnings) != sent
    finally:
        server.close()
        tokens.close()


@pytest.mark.parametrize(("target_host", "kept"), [("127.0.0.1", True), ("localhost", False)])
def test_a_redirect_to_another_host_drops_the_credentials(
    tmp_path: Path, pin_module: dict, registry_login: Callable[[str], str], target_host: str, kept: bool
) -> None:
    tokens = TokenServer(tmp_path)
    redirector = FaultProxy(f"http://127.0.0.1:{tokens.port}", Faults(redirect_to=f"http://{target_host}:{tokens.port}"))
    server = Registry(tmp_path, tokens, realm=f"{redirector.url}/token")
    try:
        pushed = push_image(server, "team/demo", "1.0")
        host = f"127.0.0.1:{server.port}"
        basic = registry_login(host)
        r = pin_module["Resolver"](mirrors={host: server.url})
        assert r.resolve(pin_module["Reference"].parse(f"{host}/team/demo:1.0")) == pushed
        assert [status for *_, status, _ in redirector.faults.log] == [307]
        assert tokens.authorizations == [basic if kept else None]
    finally:
        server.close()
        redirector.close()
        tokens.close()


def test_a_mirror_gets_its_own_credentials_not_the_registrys(
    tmp_path: Path, pin_module: dict, registry_login: Callable[[str], str]
) -> None:
    tokens = TokenServer(tmp_path)
    server = Registry(tmp_path, tokens)
    try:
        push_image(server, "library/demo", "1.0")
        registry_login("docker.io")
        resolver(pin_module, server.url).resolve(pin_module["Reference"].parse("demo:1.0"))
        mirror_login = registry_login(f"127.0.0.1:{server.port}")
        resolver(pin_module, server.url).resolve(pin_module["Reference"].parse("demo:1.0"))
        assert tokens.authorizations == [None, mirror_login]
    finally:
        server.close()
        tokens.close()


@pytest.mark.parametrize(
    ("realm_host", "allowed", "sent"),
    [("127.0.0.1", "", True), ("localhost", "", False), ("localhost", "localhost", True), ("localhost", "other.example", False)],
    ids=["same-host", "other-host", "other-host-allowed", "other-host-not-named"],
)
def test_credentials_go_to_an_https_token_endpoint_only_on_the_host_they_are_for(
    tmp_path: Path,
    pin_module: dict,
    registry_login: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    realm_host: str,
    allowed: str,
    sent: bool,
) -> None:
    """A registry (or mirror) whose challenge names an https token endpoint on another host gets no
    password sent there, unless HARDENED_COMPOSE_REGISTRY_TOKEN_HOSTS names that host; the
    endpoint's anonymous token still resolves the tag."""
    cert, key = tmp_path / "token.crt", tmp_path / "token.key"
    self_signed_certificate(key, cert)  # for localhost and 127.0.0.1
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("HARDENED_COMPOSE_REGISTRY_TOKEN_HOSTS", allowed)
    tokens = TokenServer(tmp_path, tls=(cert, key))
    server = Registry(tmp_path, tokens, realm=f"https://{realm_host}:{tokens.port}/token")
    try:
        pushed = push_image(server, "team/demo", "1.0")
        host = f"127.0.0.1:{server.port}"
        basic = registry_login(host)
        r = pin_module["Resolver"](mirrors={host: server.url})
        assert r.resolve(pin_module["Reference"].parse(f"{host}/team/demo:1.0")) == pushed
        assert tokens.authorizations == [basic if sent else None]
        assert any("not sent" in w and "HARDENED_COMPOSE_REGISTRY_TOKEN_HOSTS" in w for w in r.warnings) != sent
    finally:
        server.close()
        tokens.close()


def test_docker_hubs_own_token_service_gets_docker_hub_credentials(pin_module: dict) -> None:
    """Docker Hub's registry (registry-1.docker.io) names its token service on auth.docker.io: the
    one pair of hosts built in; a mirror of docker.io gets no such exception."""
    r = pin_module["Resolver"](mirrors={"quay.io": "https://mirror.example"})
    assert r.may_send_credentials("https://auth.docker.io/token", "docker.io")
    assert not r.may_send_credentials("http://auth.docker.io/token", "docker.io")
    assert not r.may_send_credentials("https://auth.docker.io/token", "quay.io")
    assert not r.may_send_credentials("https://auth.example/token", "docker.io")


def pinned_copy(tmp_path: Path, pin_module: dict, **answers: object) -> Path:
    """A rendered project with every reference pinned (to made-up digests), as after `make pin`."""
    project = render(tmp_path / "p", tasks=False, **answers)
    for path in pin_module["find_files"](project):
        digests = {tagged: "sha256:" + hashlib.sha256(tagged.encode()).hexdigest() for tagged in references_in(path, pin_module)}
        path.write_text(pin_module["pinned_text"](path, path.read_text(), digests))
    return project


DRIFTS = [
    ("stack.yaml", "postgres", "postgres:17.1-alpine@sha256:" + "1" * 64),
    ("stack.yaml", "redis", "redis:7.4-alpine@sha256:" + "2" * 64),
    (".github/workflows/security-scan.yml", "redis", "redis:7.2-alpine@sha256:" + "3" * 64),
]


@pytest.mark.parametrize(("name", "image", "drifted"), DRIFTS, ids=["stack-tag", "stack-digest", "workflow-tag"])
def test_pin_check_fails_when_stack_or_workflow_drift_from_compose(
    tmp_path: Path, pin_module: dict, name: str, image: str, drifted: str
) -> None:
    """An update bot that sees only the Compose files (Dependabot cannot see stack.yaml nor the
    scan workflow's image list) leaves the others behind: pin-check --offline fails on the drift,
    and `make pin` brings them back to compose.yaml's references."""
    project = pinned_copy(tmp_path, pin_module, swarm=True, services=["postgres", "redis"])
    offline = ["--check", "--offline"]
    assert run_pin_script(project, *offline, env={}).returncode == 0
    path = project / name
    text = path.read_text()
    changed = re.sub(rf"(image: ){image}:\S+", rf"\g<1>{drifted}", text, count=1)
    assert changed != text
    path.write_text(changed)
    result = run_pin_script(project, *offline, env={})
    assert result.returncode == 1 and f"pin-check: {name}: {drifted} differs from compose.yaml's " in result.stderr, result.stderr
    synced = run_pin_script(project, env={MIRRORS: "docker.io=http://127.0.0.1:9"})  # nothing to resolve
    assert synced.returncode == 0, synced.stderr
    assert path.read_text() == text


def test_pin_check_fails_when_the_workflow_does_not_scan_an_image_compose_runs(tmp_path: Path, pin_module: dict) -> None:
    project = pinned_copy(tmp_path, pin_module, services=["postgres", "redis"])
    workflow = project / ".github/workflows/security-scan.yml"
    lines = workflow.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == "- name: redis")
    workflow.write_text("".join(lines[:start] + lines[start + 2 :]))
    result = run_pin_script(project, "--check", "--offline", env={})
    assert result.returncode == 1 and "does not scan redis:7.4-alpine" in result.stderr, result.stderr


def test_renovate_sees_stack_yaml_and_the_workflows_image_list(tmp_path: Path, pin_module: dict) -> None:
    """Renovate updates every copy together: its docker-compose manager also reads stack.yaml, and
    a regex manager reads the scan workflow's pinned image list (the same images as compose.yaml)."""
    project = pinned_copy(tmp_path, pin_module, swarm=True, update_bot="renovate", services=["postgres", "redis"])
    config = json.loads((project / "renovate.json").read_text())
    patterns = [re.compile(p.strip("/")) for p in config["docker-compose"]["managerFilePatterns"]]
    assert any(p.search("stack.yaml") for p in patterns)
    (manager,) = config["customManagers"]
    assert any(re.compile(p.strip("/")).search(".github/workflows/security-scan.yml") for p in manager["managerFilePatterns"])
    workflow = (project / ".github/workflows/security-scan.yml").read_text()
    (match_string,) = manager["matchStrings"]
    found = {
        f"{m['depName']}:{m['currentValue']}@{m['currentDigest']}"
        for m in re.finditer(match_string.replace("(?<", "(?P<"), workflow)
    }
    compose = {ref for ref in references_in(project / "compose.yaml", pin_module)}
    assert found == compose and len(found) == 2
