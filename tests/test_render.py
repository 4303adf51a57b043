"""Render every topology and check the output with the real tools users rely on."""

import hashlib
import itertools
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import TEMPLATE, TESTS, compose_model, render, rendered_verify, run, self_signed_certificate
from nginx_stage import stage

QUESTIONS = yaml.safe_load((TEMPLATE / "copier.yml").read_text())


def choices(question: str) -> list[str]:
    """The values copier.yml offers for a question (its `choices`, a list or a label -> value map)."""
    offered = QUESTIONS[question]["choices"]
    return list(offered.values() if isinstance(offered, dict) else offered)


def rotate(question: str, i: int) -> str:
    offered = choices(question)
    return offered[i % len(offered)]


# Valid service sets (celery needs redis); each a subset of copier.yml's choices.
SERVICE_SETS = [
    [],
    ["postgres"],
    ["redis"],
    ["postgres", "redis"],
    ["redis", "celery_worker"],
    ["redis", "celery_beat"],
    ["postgres", "redis", "celery_worker", "celery_beat"],
]
assert all(set(services) <= set(choices("services")) for services in SERVICE_SETS)
SKELETON, EXISTING = choices("backend")


def topologies() -> list[dict]:
    """Every proxy mode x frontend x service set; other answers rotate through their choices."""
    cases = []
    axes = itertools.product(choices("proxy_mode"), choices("frontend"), SERVICE_SETS)
    for i, (proxy, frontend, services) in enumerate(axes):
        data = {
            "project_name": "Shop Demo",
            "proxy_mode": proxy,
            "frontend": frontend,
            "services": services,
            "backend": EXISTING if i % 5 == 4 else SKELETON,
            "update_bot": rotate("update_bot", i),
            "trivy_severity": rotate("trivy_severity", i),
        }
        if "celery_worker" in services:
            data["celery_queues"] = "default,long" if i % 2 else "default"
        if i % 3 == 1:
            data["extra_domains"] = "www.app.example.org,app.example.net"
        if "postgres" in services:
            data["postgres_version"] = "18" if i % 4 == 1 else QUESTIONS["postgres_version"]["default"]
            if data["backend"] == EXISTING and i % 2 == 0:
                data["migrate_command"] = "python -m myapp.migrate --to=head"
        cases.append(data)
    return cases


def case_id(data: dict) -> str:
    """Every answer the case sets, e.g. npm-spa-postgres+redis-skeleton-dependabot-HIGH-pg18-q2."""
    parts = [data["proxy_mode"], data["frontend"], "+".join(data["services"]) or "api", data["backend"]]
    parts += [data["update_bot"], data["trivy_severity"]]
    if "postgres_version" in data:
        parts.append(f"pg{data['postgres_version']}")
    if "celery_queues" in data:
        parts.append(f"q{len(data['celery_queues'].split(','))}")
    if "migrate_command" in data:
        parts.append("migrate")
    if "extra_domains" in data:
        parts.append("names")
    return "-".join(parts)


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away certificate for nginx -t of the HTTPS server."""
    directory = tmp_path_factory.mktemp("cert")
    self_signed_certificate(directory / "privkey.pem", directory / "fullchain.pem")
    return directory


def nginx_test(conf: Path) -> None:
    run("nginx", "-t", "-q", "-e", "/dev/stderr", "-c", conf)


def check_nginx(project: Path, root: Path, domain: str, cert: Path) -> None:
    if (project / "frontend").is_dir():
        nginx_test(stage(project, "frontend", root / "frontend"))
    if (project / "proxy").is_dir():
        # Every mode the proxy entrypoint can select: pending, redirect + HTTPS, plain app.
        for mode, https in (("http-pending", False), ("http-redirect", True), ("http-app", False)):
            mode_root = root / f"proxy-{mode}"
            conf = stage(project, "proxy", mode_root)
            active = mode_root / "tmp" / "nginx" / "active"
            active.mkdir(parents=True)
            (active / "http.conf").symlink_to(conf.parent / "modes" / f"{mode}.conf")
            if https:
                (active / "https.conf").symlink_to(conf.parent / "modes" / "https.conf")
                shutil.copytree(cert, mode_root / "etc" / "tls", dirs_exist_ok=True)
            nginx_test(conf)


def unrendered_jinja(project: Path) -> list[str]:
    marker = re.compile(r"\{%|\{#|(?<!\$)\{\{\s")
    hits = []
    for path in project.rglob("*"):
        readable = path.is_file() and ".git" not in path.parts and "secrets" not in path.parts
        if readable and marker.search(path.read_text(errors="replace")):
            hits.append(str(path.relative_to(project)))
    return hits


def identical_files(project: Path) -> list[list[str]]:
    """Groups of rendered files with the same bytes: each piece of configuration has one home."""
    by_content: dict[str, list[str]] = {}
    for path in sorted(project.rglob("*")):
        if path.is_file() and ".git" not in path.parts and "secrets" not in path.parts:
            by_content.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(str(path.relative_to(project)))
    return [names for names in by_content.values() if len(names) > 1]


def test_template_has_no_file_that_only_includes_another() -> None:
    """A rendered file's text lives in that file's template, not in a stub around an include."""
    include_only = re.compile(r"\A\s*\{%-?\s*include\s+[^%]*%\}\s*\Z")
    stubs = [str(p.relative_to(TEMPLATE)) for p in (TEMPLATE / "template").rglob("*.jinja") if include_only.match(p.read_text())]
    assert not stubs


@pytest.mark.parametrize("data", topologies(), ids=case_id)
def test_topology_renders_hardened_and_valid(data: dict, tmp_path: Path, self_signed: Path) -> None:
    project = render(tmp_path / "project", **data)
    entry = "proxy" if data["proxy_mode"] == "nginx-certbot" else ("frontend" if data["frontend"] == "spa" else "backend")

    # Compose: both stacks resolve and satisfy every hardening rule of the project's own
    # scripts/verify.py (the rules `make verify` applies to the running containers).
    verify = rendered_verify(project)
    assert entry == verify.ENTRY_SERVICE
    for compose_file, test in (("compose.yaml", False), ("compose.test.yaml", True)):
        problems = verify.config_problems(compose_model(project, compose_file), test=test)
        assert not problems, f"{compose_file}:\n" + "\n".join(problems)
    run("docker-compose", "-f", "compose.yaml", "-f", "compose.override.yaml", "config", "--quiet", cwd=project)

    yaml_files = [p for p in project.rglob("*.y*ml") if "secrets" not in p.parts]
    run("yamllint", "--strict", "-c", TESTS / "yamllint.yaml", *yaml_files)
    run("hadolint", *project.rglob("Dockerfile"))
    scripts = list(project.rglob("*.sh"))
    if scripts:
        run("shellcheck", *scripts)
    run("ruff", "check", "--quiet", "--no-cache", "--isolated", project)

    workflow = project / ".github" / "workflows" / "security-scan.yml"
    run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", workflow)
    # The project root, so zizmor audits the Dependabot configuration (cooldown) too.
    zizmor = run("zizmor", "--offline", "--persona=auditor", "--no-progress", project)
    assert "No findings" in zizmor.stdout + zizmor.stderr
    bot = data["update_bot"]
    if bot == "dependabot":
        run("check-jsonschema", "--builtin-schema", "vendor.dependabot", project / ".github" / "dependabot.yml")
    elif bot == "renovate":
        run("check-jsonschema", "--builtin-schema", "vendor.renovate", project / "renovate.json")
        # Renovate's cooldown (zizmor does not audit Renovate): a week, security fixes exempt.
        renovate = json.loads((project / "renovate.json").read_text())
        assert renovate["minimumReleaseAge"] == "7 days" and renovate["vulnerabilityAlerts"]["minimumReleaseAge"] is None
    else:
        assert not (project / "renovate.json").exists() and not (project / ".github" / "dependabot.yml").exists()

    check_nginx(project, tmp_path / "nginx", "app.example.org", self_signed)
    assert not unrendered_jinja(project)
    assert not identical_files(project)
    for package in project.rglob("package*.json"):
        json.loads(package.read_text())


HOST_SIZES = ["1", "2", "4", "16"]  # host_memory_gb answers: GB of the host
FULL_STACK = {"proxy_mode": "nginx-certbot", "frontend": "spa", "services": ["postgres", "redis", "celery_worker", "celery_beat"]}
# The biggest stacks: three and eight worker queues, beat, the SPA and the self-hosted proxy.
BIG_STACKS = [{**FULL_STACK, "celery_queues": queues} for queues in ("default,long,bulk", "q1,q2,q3,q4,q5,q6,q7,q8")]
SIZED_ANSWERS = ("proxy_mode", "frontend", "services", "celery_queues")


def sizing_cases() -> list[tuple[dict, str, str]]:
    """(topology, host_memory_gb, host_cpus): every topology of the matrix at one host size,
    and the biggest stacks at every size."""
    matrix = [{k: v for k, v in t.items() if k in SIZED_ANSWERS} for t in topologies()]
    cases = [(t, HOST_SIZES[i % len(HOST_SIZES)], str(1 + i % 3)) for i, t in enumerate(matrix)]
    return cases + [(stack, size, "2") for stack in BIG_STACKS for size in HOST_SIZES]


def sizing_id(case: tuple[dict, str, str]) -> str:
    topology, memory_gb, cpus = case
    queues = len(topology["celery_queues"].split(",")) if "celery_queues" in topology else 0
    services = "+".join(topology["services"]) or "api"
    return f"{topology['proxy_mode']}-{topology['frontend']}-{services}-q{queues}-{memory_gb}GB-{cpus}cpu"


@pytest.mark.parametrize("case", sizing_cases(), ids=sizing_id)
def test_default_limits_fit_the_host(case: tuple[dict, str, str], tmp_path: Path) -> None:
    """The default memory limits of all services (every worker queue included) add up to at most
    75 % of host_memory_gb, and no CPU limit exceeds host_cpus (Docker refuses that); a host too
    small for the services is refused with a message saying so."""
    data, memory_gb, cpus = case
    try:
        project = render(tmp_path / "p", tasks=False, host_memory_gb=memory_gb, host_cpus=cpus, **data)
    except ValueError as error:
        assert f"host_memory_gb: {memory_gb} GB leaves" in str(error)
        assert int(memory_gb) <= 2, "refused a host that should fit"
        return
    budget = int(memory_gb) * 2**30 * 3 // 4
    # compose.yaml: every service (compose.test.yaml has the same limits, without certbot).
    resources = [service["deploy"]["resources"] for service in compose_model(project, "compose.yaml")["services"].values()]
    memory = [int(r["limits"]["memory"]) for r in resources]
    assert sum(memory) <= budget, f"{sum(memory) / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"
    assert all(int(r["reservations"]["memory"]) < int(r["limits"]["memory"]) for r in resources)
    assert max(float(r["limits"]["cpus"]) for r in resources) <= int(cpus)
    if int(memory_gb) >= 4:
        # Room on a bigger host goes to the services: together at least half the budget.
        assert sum(memory) >= budget // 2


@pytest.mark.parametrize("proxy_mode", choices("proxy_mode"))
def test_operations_doc_daemon_json_is_valid_and_matches_the_stack(proxy_mode: str, tmp_path: Path) -> None:
    """The host hardening section's /etc/docker/daemon.json parses (python -m json.tool), has
    exactly the documented settings, and its log rotation is the stack's own default."""
    project = render(tmp_path / "p", proxy_mode=proxy_mode, frontend="spa", tasks=False)
    doc = (project / "docs" / "OPERATIONS.md").read_text()
    block = re.search(r"`/etc/docker/daemon\.json`.*?```json\n(.*?)```", doc, re.S)
    assert block, "no daemon.json block in docs/OPERATIONS.md"
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text(textwrap.dedent(block[1]))
    run("python3", "-m", "json.tool", daemon_json)
    settings = json.loads(daemon_json.read_text())
    assert settings == {
        "no-new-privileges": True,
        "live-restore": True,
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "5"},
        "userland-proxy": False,
    }
    logging = compose_model(project, "compose.yaml")["services"]["backend"]["logging"]
    assert logging == {"driver": settings["log-driver"], "options": settings["log-opts"]}


# (answers, the migrate service's command or None when there is none)
MIGRATE_CASES = [
    ({"services": ["postgres", "redis", "celery_worker", "celery_beat"]}, ["alembic", "upgrade", "head"]),
    ({"services": ["redis", "celery_worker"]}, None),  # no database, nothing to migrate
    ({"backend": EXISTING, "services": ["postgres", "redis", "celery_worker"]}, None),  # not opted in
    (
        {"backend": EXISTING, "services": ["postgres", "redis", "celery_worker"], "migrate_command": "flask db upgrade"},
        ["flask", "db", "upgrade"],
    ),
]


@pytest.mark.parametrize(("answers", "command"), MIGRATE_CASES, ids=["skeleton", "no-postgres", "existing", "existing-opted-in"])
def test_migrate_runs_once_before_the_app_code_with_only_the_app_password(
    answers: dict, command: list[str] | None, tmp_path: Path
) -> None:
    project = render(tmp_path / "p", frontend="none", proxy_mode="none", tasks=False, **answers)
    makefile = (project / "Makefile").read_text()
    assert (project / "backend" / "migrations").is_dir() == (command == ["alembic", "upgrade", "head"])
    for compose_file in ("compose.yaml", "compose.test.yaml"):
        services = compose_model(project, compose_file)["services"]
        if command is None:
            assert "migrate" not in services and "\nmigrate:" not in makefile
            assert all("migrate" not in (s.get("depends_on") or {}) for s in services.values())
            continue
        migrate = services["migrate"]
        assert migrate["command"] == command and migrate["restart"] == "no"
        assert migrate["image"] == services["backend"]["image"] and migrate["user"] == services["backend"]["user"]
        assert [secret["source"] for secret in migrate["secrets"]] == ["postgres_app_password"]
        assert migrate["environment"]["POSTGRES_USER"] == services["backend"]["environment"]["POSTGRES_USER"]
        assert list(migrate["networks"]) == ["data"] and list(migrate["depends_on"]) == ["postgres"]
        # Everything that runs the app's code waits for it; the data services do not.
        for name, service in services.items():
            waits = (service.get("depends_on") or {}).get("migrate", {}).get("condition")
            runs_app_code = name == "backend" or name.startswith("worker_") or name == "beat"
            assert waits == ("service_completed_successfully" if runs_app_code else None), name
    if command is not None:
        assert "\nmigrate: ##" in makefile
        assert ("\nmakemigration: ##" in makefile) == (answers.get("backend") != EXISTING)
