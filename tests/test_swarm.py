"""The Docker Swarm rendering (answer swarm=true): stack.yaml as Swarm's own loader resolves it
(`docker stack config`, no daemon), judged by the project's scripts/verify.py (the rules of
`make verify`), the Swarm adapter of verify.py on a recorded task, the make targets, pinning, and
`copier update` switching Swarm on."""

import copy
import json
import os
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_render import case_id, topologies
from test_update import assert_clean_merge, snapshot

from conftest import TEMPLATE, TESTS, commit, copier, release, render, rendered_verify, run

REGISTRY = "registry.example.org:5000/team"
RECORDED_TASK = json.loads((TESTS / "data" / "swarm_task_inspect.json").read_text())


def stack_config(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`docker stack config` as `make swarm-deploy` runs it: with the variables .env would export."""
    environment = {**os.environ, "REGISTRY": REGISTRY, "IMAGE_TAG": "1.0.0", **env}
    command = ["docker", "stack", "config", "-c", "stack.yaml"]
    return subprocess.run(command, cwd=project, env=environment, capture_output=True, text=True)


def resolved(project: Path) -> dict:
    result = stack_config(project)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def user_of(service: dict) -> tuple[str, str]:
    uid, _, gid = service["user"].partition(":")
    return uid, gid


@pytest.mark.parametrize("data", topologies(), ids=case_id)
def test_stack_renders_hardened_and_valid(data: dict, tmp_path: Path) -> None:
    project = render(tmp_path / "project", tasks=False, swarm=True, **data)
    model = resolved(project)
    verify = rendered_verify(project)
    assert verify.stack_config_problems(model) == []

    data_services = {"postgres", "redis"} & set(model["services"])
    for name, service in model["services"].items():
        deploy = service["deploy"]
        # The built images from the operator's registry, every other one by name and tag.
        assert verify.is_built_repository(service["image"]) == service["image"].startswith(f"{REGISTRY}/"), name
        assert "$" not in service["image"] and service["image"].endswith(":1.0.0") == verify.is_built_repository(service["image"])
        # Secrets and configs owned by the service's own user, readable by it alone.
        for ref in service.get("secrets", []) + service.get("configs", []):
            assert (ref["uid"], ref["gid"]) == user_of(service) and ref["mode"] == 0o400, (name, ref)
        tmpfs = [v for v in service.get("volumes", []) if v["type"] == "tmpfs"]
        assert all(v["tmpfs"]["size"] > 0 for v in tmpfs) and (tmpfs or name == "redis"), name
        assert deploy["update_config"]["failure_action"] == "rollback" and "rollback_config" in deploy
        if name in data_services or name in ("proxy", "certbot"):
            label = "data" if name in data_services else "edge"
            assert deploy["placement"]["constraints"] == [f"node.labels.shop_demo.{label} == true"]
            assert deploy["replicas"] == 1 and deploy["update_config"]["order"] == "stop-first"
        elif name != "beat":
            assert deploy["replicas"] >= 2 and deploy["update_config"]["order"] == "start-first", name
    for name, network in model["networks"].items():
        if not network.get("external"):
            assert network["driver"] == "overlay" and "encrypted" in network["driver_opts"], name
    if data_services:
        assert model["networks"]["data"]["internal"] is True
    if "proxy" in model["services"]:
        ports = model["services"]["proxy"]["ports"]
        assert {(p["published"], p["mode"]) for p in ports} == {(80, "host"), (443, "host")}
    if data["proxy_mode"] == "npm":
        entry = verify.ENTRY_SERVICE
        assert [n for n in model["services"][entry]["networks"] if model["networks"][n].get("external")] == ["npm"]
    assert all(secret["external"] and secret["name"].endswith("_v1") for secret in model["secrets"].values())

    run("yamllint", "--strict", "-c", TESTS / "yamllint.yaml", project / "stack.yaml")
    run("ruff", "check", "--quiet", "--no-cache", "--isolated", project / "scripts")
    assert (project / "docs" / "SWARM.md").is_file()


def test_compose_projects_without_swarm_get_no_stack(tmp_path: Path) -> None:
    project = render(tmp_path / "p", tasks=False)
    assert not (project / "stack.yaml").exists() and not (project / "docs" / "SWARM.md").exists()
    assert not (project / "scripts" / "swarm.py").exists()
    assert "swarm-" not in (project / "Makefile").read_text()


@pytest.fixture(scope="module")
def full_stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(
        tmp_path_factory.mktemp("swarm") / "project",
        tasks=False,
        swarm=True,
        proxy_mode="nginx-certbot",
        services=["postgres", "redis", "celery_worker", "celery_beat"],
    )


def weaken(model: dict, service: str, change: str) -> dict:
    model = copy.deepcopy(model)
    svc = model["services"][service]
    if change == "cap_drop":
        del svc["cap_drop"]
    elif change == "secret_mode":
        svc["secrets"][0]["mode"] = 0o444
    elif change == "secret_owner":
        svc["secrets"][0]["uid"] = "0"
    elif change == "short_tmpfs":
        svc["volumes"] = [v for v in svc["volumes"] if v["type"] != "tmpfs"]
        svc["tmpfs"] = ["/tmp"]
    elif change == "security_opt":
        svc["security_opt"] = ["no-new-privileges:true"]
    elif change == "build":
        svc["build"] = {"context": "."}
    elif change == "restart":
        svc["deploy"]["restart_policy"]["condition"] = "on-failure"
    elif change == "reservations":
        del svc["deploy"]["resources"]["reservations"]
    return model


@pytest.mark.parametrize(
    ("service", "change", "reason"),
    [
        ("backend", "cap_drop", "backend: cap_drop is [], not [ALL]"),
        ("redis", "secret_mode", "redis: secret redis_password has mode 0444, not 0400"),
        ("postgres", "secret_owner", "postgres: secret postgres_password owned by 0:70, not the service's user 70:70"),
        ("backend", "short_tmpfs", "backend: tmpfs (Swarm ignores it without a warning: write a tmpfs volume)"),
        ("postgres", "security_opt", "postgres: security_opt (Swarm ignores it: no-new-privileges comes from each node's daemon"),
        ("proxy", "build", "proxy: build (Swarm ignores it: push built images (make swarm-push))"),
        ("worker_default", "restart", "worker_default: restart is on-failure, not unless-stopped"),
        ("beat", "reservations", "beat: no cpus reservation"),
    ],
)
def test_weakened_stack_fails(full_stack: Path, service: str, change: str, reason: str) -> None:
    verify = rendered_verify(full_stack)
    found = verify.stack_config_problems(weaken(resolved(full_stack), service, change))
    assert any(problem.startswith(reason) for problem in found), found


def test_resolved_stack_keeps_every_setting(full_stack: Path) -> None:
    """Nothing in stack.yaml is a setting `docker stack deploy` drops: `docker stack config` keeps
    them in its output (the deploy warns, and for the short tmpfs key not even that)."""
    model = resolved(full_stack)
    verify = rendered_verify(full_stack)
    assert not [key for svc in model["services"].values() for key in verify.SWARM_DROPPED if key in svc]
    raw = yaml.safe_load((full_stack / "stack.yaml").read_text())
    assert not [key for svc in raw["services"].values() for key in verify.SWARM_DROPPED if key in svc]


def recorded_task(verify: object, probe: str | None = None) -> object:
    networks = {n["Name"]: n for n in RECORDED_TASK["networks"]}
    # Recorded on a cgroup v1 engine: the host's cgroup namespace is its default.
    return verify.from_swarm_task(
        RECORDED_TASK["container"], networks, RECORDED_TASK["service"], probe or RECORDED_TASK["probe"], cgroupns_default="host"
    )


def test_a_recorded_task_is_read_from_the_engine_and_the_kernel(full_stack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real task (dockerd 20.10, daemon.json without no-new-privileges): the container shows no
    security option either way, so the kernel's NoNewPrivs decides."""
    verify = rendered_verify(full_stack)
    monkeypatch.setattr(verify, "STACK", "t")
    task = recorded_task(verify)
    assert task.name == "a" and task.user == "101:101" and task.restart == "any"
    assert task.secret_files == [("s", "101", "101", 0o400)]
    assert task.networks == {"t_default": verify.Network(internal=False, external=False)}
    reasons = verify.problems(task, test=False, secrets=[])
    assert "no-new-privileges not set" in reasons
    # /data keeps the image directory's mode (0750) but not its owner (101): unwritable.
    assert "tmpfs /data has no owner (root-owned, unwritable)" in reasons
    assert not [r for r in reasons if "/tmp" in r or "/newdir" in r or "secret" in r]

    enforced = recorded_task(verify, RECORDED_TASK["probe"].replace("NoNewPrivs:\t0", "NoNewPrivs:\t1"))
    assert "no-new-privileges not set" not in verify.problems(enforced, test=False, secrets=[])


def test_a_tmpfs_under_a_symbolic_link_is_found_in_the_mount_table(full_stack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/mounts names a mount by its real path: the postgres images' /var/run/postgresql is
    /run/postgresql there (/var/run is a link to /run). The probe resolves each tmpfs path."""
    verify = rendered_verify(full_stack)
    monkeypatch.setattr(verify, "STACK", "t")
    task = copy.deepcopy(RECORDED_TASK)
    for mount in task["container"]["HostConfig"]["Mounts"]:
        if mount["Target"] == "/newdir":
            mount["Target"] = "/var/run/newdir"  # the mount table still says /newdir
    probe = task["probe"].replace("writable /newdir", "writable /var/run/newdir") + "resolved /var/run/newdir /newdir\n"
    networks = {n["Name"]: n for n in task["networks"]}
    svc = verify.from_swarm_task(task["container"], networks, task["service"], probe, cgroupns_default="host")
    assert svc.tmpfs["/var/run/newdir"].startswith("rw,nosuid,nodev,noexec,relatime,size=1024k")
    assert not [r for r in verify.problems(svc, test=False, secrets=[]) if "/var/run/newdir" in r]


def make(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "IMAGE_TAG")} | env
    return subprocess.run(["make", "-s", *args], cwd=project, capture_output=True, text=True, env=environment)


def test_make_targets_check_their_settings(full_stack: Path) -> None:
    dry = make(full_stack, "-n", "swarm-secrets", "swarm-push", "swarm-deploy", "swarm-verify").stdout
    for command in ("scripts/swarm.py secrets", "scripts/swarm.py push", "scripts/swarm.py deploy", "scripts/swarm.py verify"):
        assert command in dry
    missing = make(full_stack, "swarm-deploy")
    assert missing.returncode != 0 and "REGISTRY is unset: set it in .env" in missing.stderr
    injected = make(full_stack, "swarm-deploy", REGISTRY="registry.example.org; rm -rf /")
    assert injected.returncode != 0 and "REGISTRY is 'registry.example.org; rm -rf /'" in injected.stderr
    version = make(full_stack, "swarm-deploy", REGISTRY=REGISTRY, REDIS_PASSWORD_SECRET_VERSION="v2 x")
    assert version.returncode != 0 and "REDIS_PASSWORD_SECRET_VERSION is 'v2 x'" in version.stderr


def test_stack_override_is_checked_and_deployed_after_the_stack(full_stack: Path, tmp_path: Path) -> None:
    """stack.override.yaml (yours) is merged after stack.yaml by swarm-config and swarm-deploy:
    a weakening there fails the check like one in stack.yaml (the boot test deploys with it)."""
    plugins = tmp_path / "docker-config" / "cli-plugins"  # verify.py reads the model with `docker compose`
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(shutil.which("docker-compose") or "docker-compose")
    settings = {"REGISTRY": REGISTRY, "DOCKER_CONFIG": str(plugins.parent)}
    override = full_stack / "stack.override.yaml"
    assert override.read_text().rstrip().endswith("services: {}")
    clean = make(full_stack, "swarm-config", **settings)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    original = override.read_text()
    try:
        override.write_text("services:\n  backend:\n    cap_add: [NET_ADMIN]\n")
        weakened = make(full_stack, "swarm-config", **settings)
        assert weakened.returncode != 0 and "backend: adds capabilities" in weakened.stdout, weakened.stdout
        # No engine behind DOCKER_HOST: the deploy fails, after printing the command it ran.
        deploy = make(full_stack, "swarm-deploy", REGISTRY=REGISTRY, DOCKER_HOST=f"unix://{full_stack}/no.sock")
        assert "-c stack.yaml -c stack.override.yaml my_app" in deploy.stdout, deploy.stdout
    finally:
        override.write_text(original)


def test_deploy_environment_names_configs_after_their_content(full_stack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY", REGISTRY)
    swarm = runpy.run_path(str(full_stack / "scripts" / "swarm.py"))
    before = swarm["deploy_environment"]()
    assert len(before["POSTGRES_HBA_CONFIG_VERSION"]) == 12
    hba = full_stack / "postgres" / "pg_hba.conf"
    original = hba.read_text()
    try:
        hba.write_text(original + "# changed\n")
        after = swarm["deploy_environment"]()
    finally:
        hba.write_text(original)
    assert after["POSTGRES_HBA_CONFIG_VERSION"] != before["POSTGRES_HBA_CONFIG_VERSION"]
    assert after["POSTGRES_START_CONFIG_VERSION"] == before["POSTGRES_START_CONFIG_VERSION"]
    versions = {key: value for key, value in after.items() if key.endswith("_VERSION")}
    names = yaml.safe_load(stack_config(full_stack, **versions).stdout)["configs"]
    assert names["postgres_hba"]["name"] == f"my_app_postgres_hba_{after['POSTGRES_HBA_CONFIG_VERSION']}"


def test_swarm_verify_reports_engine_versions_and_autolock(full_stack: Path) -> None:
    """On what a real two-node swarm answers (tests/record_swarm_nodes.py; dockerd 20.10.24):
    each node's engine version, failing without the fixes of CVE-2023-28840/28841/28842 (below
    20.10.24, or 23.0.0-23.0.2), and the managers' autolock (CIS 7.6), failing when it is off
    unless SWARM_AUTOLOCK=off accepts it with a warning."""
    recorded = json.loads((TESTS / "data" / "swarm_nodes.json").read_text())
    nodes, autolock, no_autolock = recorded["nodes"], recorded["swarm"]["autolock"], recorded["swarm"]["no_autolock"]
    report = runpy.run_path(str(full_stack / "scripts" / "swarm.py"))["cluster_report"]
    lines, failed = report(nodes, autolock, False)
    assert failed == 0 and len(lines) == len(nodes) + 1 == 3, lines
    for node, line in zip(nodes, lines, strict=False):
        assert line == f"ok   node {node['Hostname']}: engine {node['EngineVersion']}"
    assert lines[-1] == "ok   swarm: managers autolock (CIS Docker Benchmark 7.6)"

    lines, failed = report(nodes, no_autolock, False)
    assert failed == 1 and lines[-1].startswith("FAIL swarm: managers do not autolock"), lines
    lines, failed = report(nodes, no_autolock, True)
    assert failed == 0 and lines[-1].startswith("WARN swarm: managers do not autolock"), lines

    versions = {"20.10.23": False, "20.10.24+dfsg1": True, "20.10.27": True, "23.0.0": False, "23.0.2": False,
                "23.0.3": True, "24.0.7": True, "29.1.2": True, "": False, "master-dockerproject": False}  # fmt: skip
    for version, fixed in versions.items():
        lines, failed = report([{**nodes[0], "EngineVersion": version}], autolock, False)
        assert failed == (0 if fixed else 1), (version, lines)
        assert ("CVE-2023-28840" in lines[0]) != fixed, lines


def test_swarm_docs_ask_for_fixed_engines_xt_u32_autolock_and_private_addresses(full_stack: Path) -> None:
    docs = (full_stack / "docs" / "SWARM.md").read_text()
    assert "Engine 20.10 or later" not in docs
    for needed in ("20.10.24, or 23.0.3 or later", "CVE-2023-28840", "`xt_u32`", "SWARM_AUTOLOCK=off",
                   "docker swarm init --autolock --listen-addr <private address>:2377 --advertise-addr <private address>",
                   "docker swarm join --listen-addr", "docker swarm update --autolock=true"):  # fmt: skip
        assert needed in docs, needed
    assert "SWARM_AUTOLOCK=off" in (full_stack / ".env.example").read_text()


def test_pinning_covers_the_stack_file(full_stack: Path) -> None:
    pin = runpy.run_path(str(full_stack / "scripts" / "pin_images.py"))
    stack = full_stack / "stack.yaml"
    assert stack in pin["find_files"](full_stack)
    text = stack.read_text()
    references = sorted({m.group(g) for m, g in pin["references_in"](stack, text)})
    assert references == ["postgres:17-alpine", "redis:7.4-alpine"]  # the built images come from REGISTRY
    digest = "sha256:" + "ab" * 32
    pinned = pin["pinned_text"](stack, text, {ref: digest for ref in references})
    assert f"image: postgres:17-alpine@{digest}\n" in pinned
    stack.write_text(pinned)
    try:
        assert resolved(full_stack)["services"]["redis"]["image"] == f"redis:7.4-alpine@{digest}"
    finally:
        stack.write_text(text)


@pytest.mark.e2e
def test_update_switches_swarm_on_and_keeps_user_files(tmp_path: Path) -> None:
    template, project = tmp_path / "template", tmp_path / "project"
    release(TEMPLATE, template, "v1.0.0")
    copier("copy", "--trust", "--defaults", "--vcs-ref=v1.0.0", "--data=proxy_mode=nginx-certbot", str(template), str(project))
    run("git", "init", "-q", cwd=project)
    (project / ".env").write_text("BACKEND_MEMORY=2G\n")
    (project / "compose.override.yaml").write_text('services:\n  backend:\n    environment:\n      FLAG: "1"\n')
    (project / "nginx/locations.d/robots.conf").write_text("location = /robots.txt {\n    return 200;\n}\n")
    commit(project, "generated")
    kept = snapshot(project, [".env", "compose.override.yaml", "nginx/locations.d/robots.conf", "secrets/postgres_password"])
    compose = (project / "compose.yaml").read_bytes()

    copier("update", "--trust", "--defaults", "--vcs-ref=v1.0.0", "--data=swarm=true", cwd=project)
    assert_clean_merge(project)
    assert snapshot(project, list(kept)) == kept
    assert (project / "compose.yaml").read_bytes() == compose
    for path in ("stack.yaml", "docs/SWARM.md", "scripts/swarm.py"):
        assert (project / path).is_file(), path
    assert "swarm-deploy:" in (project / "Makefile").read_text()
    assert "COPY nginx/locations.d/ /etc/nginx/locations.d/" in (project / "proxy/Dockerfile").read_text()
    assert resolved(project)["services"]["proxy"]["deploy"]["placement"]["constraints"] == ["node.labels.my_app.edge == true"]
