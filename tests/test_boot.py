"""Every topology boots under a real Docker engine and passes `make verify`'s checks from outside.

Root only (dockerd); marked `boot`. One engine and one set of stand-in base images per test
session; the tests share them through the xdist group "docker" (run with --dist loadgroup).
"""

import itertools
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker_engine import Engine, build_standins
from servers import free_port

from conftest import render

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("docker")]

# Every topology renders with the stand-ins' Python (Debian bookworm's 3.11).
COMMON = {"python_version": "3.11"}
TOPOLOGIES = {
    "npm-spa-postgres-redis-celery": {
        "proxy_mode": "npm",
        "frontend": "spa",
        "services": ["postgres", "redis", "celery_worker", "celery_beat"],
    },
    "nginx-certbot-spa-postgres": {"proxy_mode": "nginx-certbot", "frontend": "spa", "services": ["postgres"]},
    "none-api-postgres-redis-celery": {
        "proxy_mode": "none",
        "frontend": "none",
        "services": ["postgres", "redis", "celery_worker", "celery_beat"],
    },
}


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("debootstrap"):
        pytest.skip("boot tests need root, dockerd and debootstrap (tests/run.sh installs them)")
    engine = Engine()
    try:
        build_standins(engine)
        yield engine
    finally:
        engine.stop()


def http(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read()


def verify(engine: Engine, project: Path) -> subprocess.CompletedProcess[str]:
    """`make test-verify`, against the test engine."""
    command = ["python3", "scripts/verify.py", "--test", "--compose-file", "compose.test.yaml"]
    return subprocess.run(command, cwd=project, env=engine.env, capture_output=True, text=True)


def recreate_with_override(engine: Engine, project: Path, port: int, service: str, settings: str) -> None:
    """Recreate one service with extra settings from compose.override.yaml, and wait for it."""
    (project / "compose.override.yaml").write_text(f"services:\n  {service}:\n    {settings}\n")
    engine.compose(project, "compose.test.yaml", "-f", "compose.override.yaml", "up", "--detach", "--wait",
                   "--no-build", "--no-deps", service, HTTP_PORT=str(port))  # fmt: skip


def no_egress(network: dict) -> bool:
    """Internal network: the host drops every packet leaving its bridge for another subnet, and
    nothing masquerades it (checked in the firewall rules; no packet is sent anywhere)."""
    subnet = network["IPAM"]["Config"][0]["Subnet"]
    bridge = f"br-{network['Id'][:12]}"
    isolation = subprocess.run(["iptables", "-S", "DOCKER-ISOLATION-STAGE-1"], capture_output=True, text=True).stdout
    nat = subprocess.run(["iptables", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True).stdout
    return network["Internal"] and f"! -d {subnet} -i {bridge} -j DROP" in isolation and subnet not in nat


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_boot_topology_is_healthy_verified_and_isolated(engine: Engine, tmp_path: Path, name: str) -> None:
    answers = {**COMMON, **TOPOLOGIES[name]}
    project = render(tmp_path / "p", project_name="Boot Demo", **answers)
    model = json.loads(engine.compose(project, "compose.test.yaml", "config", "--format", "json").stdout)
    for service in model["services"].values():
        if "build" in service:
            engine.build(service["image"], Path(service["build"]["context"]))
    port = free_port()
    try:
        engine.compose(
            project, "compose.test.yaml", "up", "--detach", "--wait", "--wait-timeout", "240", "--no-build", HTTP_PORT=str(port)
        )

        # The operator's check (make test-verify): healthy, hardened, numeric non-root, limited.
        result = subprocess.run(
            ["python3", "scripts/verify.py", "--test", "--compose-file", "compose.test.yaml"],
            cwd=project,
            env={**engine.env, "HTTP_PORT": str(port)},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{len(model['services'])} passed, 0 failed" in result.stdout

        # Through the entry point to the backend, postgres, redis and a celery task.
        assert http(port, "/api/health") == (200, b'{"status":"ok"}')
        assert http(port, "/api/health/db")[0] == 200
        if "redis" in answers["services"]:
            assert http(port, "/api/health/redis")[0] == 200
        if "celery_worker" in answers["services"]:
            assert json.loads(http(port, "/api/tasks/add?a=2&b=3", method="POST")[1]) == {"result": 5}
        if answers["frontend"] == "spa":
            status, page = http(port, "/")
            assert status == 200 and b"Boot Demo" in page

        containers = engine.compose(project, "compose.test.yaml", "ps", "--quiet").stdout.split()
        assert len(containers) == len(model["services"])
        for container in containers:
            write = engine.docker("exec", container, "sh", "-c", "touch /hardened-compose-probe", check=False)
            assert write.returncode != 0 and "Read-only file system" in write.stderr, container
        assert no_egress(engine.inspect("network", f"{model['name']}_data")[0])

        if answers["proxy_mode"] == "nginx-certbot":
            # The production mode of the proxy before any certificate exists (the test stack runs it
            # HTTP-only): it must start read-only and non-root, answer "pending" and serve ACME.
            recreate_with_override(engine, project, port, "proxy", 'environment:\n      PROXY_HTTP_ONLY: "0"')
            with pytest.raises(urllib.error.HTTPError) as pending:
                http(port, "/")
            assert pending.value.code == 503 and pending.value.read() == b"TLS certificate pending\n"
            with pytest.raises(urllib.error.HTTPError) as challenge:
                http(port, "/.well-known/acme-challenge/unknown-token")
            assert challenge.value.code == 404
            assert http(port, "/health") == (200, b"ok\n")

        if name.startswith("none"):
            # A weakened backend (writable root, running as root) must make verify fail, saying why.
            recreate_with_override(engine, project, port, "backend", 'read_only: false\n    user: "0"')
            weakened = verify(engine, project)
            assert weakened.returncode == 1
            assert "root filesystem is writable" in weakened.stdout and "not a non-root numeric UID" in weakened.stdout

            # A dangerous service added in compose.override.yaml (a file verify is not given): it
            # belongs to the project, so verify judges it and names every reason.
            intruder = "\n    ".join([
                'image: "python:3.11-slim"',
                'command: ["sleep", "infinity"]',
                "network_mode: none",
                'user: "1000:0"',
                "privileged: true",
                "pid: host",
                "cap_add: [NET_ADMIN]",
                'security_opt: ["seccomp=unconfined"]',
                f"volumes: ['{engine.socket}:/run/engine.sock:ro']",
            ])  # fmt: skip
            recreate_with_override(engine, project, port, "intruder", intruder)
            dangerous = verify(engine, project)
            assert dangerous.returncode == 1
            lines = dangerous.stdout.splitlines()
            row = next(i for i, line in enumerate(lines) if line.split()[1:2] == ["intruder"])
            reasons = [
                line.removeprefix("    - ") for line in itertools.takewhile(lambda x: x.startswith("    - "), lines[row + 1 :])
            ]
            for reason in (
                "privileged: every capability and device of the host",
                "shares the host's pid namespace",
                f"bind-mounts the host's {engine.socket}",
                "security_opt seccomp=unconfined turns a protection off",
                "adds capabilities ['NET_ADMIN'] (the template needs none)",
                "user 1000:0 runs with group root (0)",
            ):
                assert reason in reasons, dangerous.stdout
    finally:
        engine.compose(project, "compose.test.yaml", "down", "--volumes", "--remove-orphans", check=False)
    label = f"label=com.docker.compose.project={model['name']}"
    assert engine.docker("ps", "-aq", "--filter", label).stdout.strip() == ""
    assert engine.docker("volume", "ls", "-q", "--filter", label).stdout.strip() == ""
    assert engine.docker("network", "ls", "-q", "--filter", label).stdout.strip() == ""
