"""A throw-away Docker engine for the boot tests and the build benchmark (root only).

`Engine` starts Debian's dockerd with its data root and socket in a temporary directory, through
tests/servers.py (which also ends it when a run is interrupted), and removes them after it.
`build_standins` builds the local stand-ins for the upstream base images (see
tests/standins/README.md). Images are built with Debian's 20.10 docker CLI, whose BuildKit needs
no buildx plugin (the newer CLI on PATH refuses BuildKit without one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from servers import ServerNotReady, end_server, start_server, wait_ready

STANDINS = Path(__file__).resolve().parent / "standins"
BUILD_CLI = "/usr/bin/docker"
BASE_IMAGE = "hc-standin/debian:bookworm"
# stand-in Dockerfile -> the upstream name:tag it replaces (the rendered files use these)
STANDIN_TAGS = {
    "python": "python:3.11-slim",
    "node": "node:22-alpine",
    "nginx": "nginxinc/nginx-unprivileged:1.28-alpine",
    "postgres": "postgres:17-alpine",
    "redis": "redis:7.4-alpine",
}


class Engine:
    """dockerd with everything of its own under a temporary root.

    namespace: run it in that network namespace (`ip netns`), under its own host name (the name
    Swarm gives the node); its networks and firewall rules then stay in that namespace. nsenter
    switches only the network namespace: `ip netns exec` would also remount /sys, without the
    cgroup hierarchies dockerd needs. daemon_config: its daemon.json (never the host's
    /etc/docker/daemon.json). options: more dockerd flags."""

    def __init__(
        self,
        namespace: str | None = None,
        daemon_config: dict | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hc-docker-"))
        self.socket = self.root / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.namespace = namespace
        # docker compose as a CLI plugin, for scripts that call `docker compose` (verify.py).
        plugins = self.root / "config" / "cli-plugins"
        plugins.mkdir(parents=True)
        compose = Path(sys.executable).parent / "docker-compose"
        (plugins / "docker-compose").symlink_to(compose if compose.exists() else Path(shutil.which("docker-compose") or compose))
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.root / "config"),
            "DOCKER_BUILDKIT": "1",
        }
        config = self.root / "daemon.json"
        config.write_text(json.dumps(daemon_config or {}))
        prefix: list[str | Path] = []
        if namespace:
            hostname = ["sh", "-c", 'hostname "$0" && exec "$@"', namespace]
            prefix = ["nsenter", f"--net=/run/netns/{namespace}", "unshare", "--uts", *hostname]
        self.process = start_server(
            [
                *prefix,
                "dockerd",
                "--config-file",
                config,
                "--data-root",
                self.root / "data",
                "--exec-root",
                self.root / "exec",
                "-H",
                f"unix://{self.socket}",
                "--pidfile",
                self.pidfile,
                *options,
            ],
            self.root / "dockerd.log",
            after=self._remove_root,
            grace=60,  # dockerd stops the containers, then containerd (in a session of its own)
        )
        try:
            # `docker version` asks the daemon itself (/_ping, /version), not just its socket.
            wait_ready(self.process, lambda: self.docker("version", check=False).returncode == 0, timeout=60)
        except ServerNotReady:
            self.stop()
            raise

    def docker(self, *args: str | Path, check: bool = True, cli: str = "docker") -> subprocess.CompletedProcess[str]:
        result = subprocess.run([cli, *map(str, args)], env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def build(self, tag: str, context: Path, dockerfile: Path | None = None, **build_args: str) -> None:
        args = ["build", "--quiet", "--tag", tag]
        args += [item for key, value in build_args.items() for item in ("--build-arg", f"{key}={value}")]
        args += ["--file", dockerfile] if dockerfile else []
        self.docker(*args, context, cli=BUILD_CLI)

    def compose(
        self, project: Path, compose_file: str, *args: str, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["docker-compose", "-f", compose_file, *args], cwd=project, env={**self.env, **env}, capture_output=True, text=True
        )
        if check and result.returncode != 0:
            # The containers' own words say why a service never became healthy.
            logs = subprocess.run(["docker-compose", "-f", compose_file, "logs", "--no-color", "--tail", "40"],
                                  cwd=project, env={**self.env, **env}, capture_output=True, text=True)  # fmt: skip
            raise RuntimeError(f"docker compose {' '.join(args)} failed:\n{result.stderr[-3000:]}\n{logs.stdout[-6000:]}")
        return result

    def inspect(self, kind: str, *names: str) -> list[dict]:
        return json.loads(self.docker(kind, "inspect", *names).stdout)

    def stop(self) -> None:
        end_server(self.process)

    def _remove_root(self) -> None:
        # Whatever the engine left mounted under its root (layers, the network namespaces of
        # its Swarm networks under exec/netns), deepest first.
        with open("/proc/self/mountinfo") as mounts:
            points = [line.split()[4] for line in mounts]
        for point in sorted((p for p in points if p.startswith(f"{self.root}/")), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def build_standins(engine: Engine) -> None:
    """The Debian base (debootstrap + docker import), then every stand-in tagged as upstream."""
    work = engine.root / "standins"
    shutil.copytree(STANDINS, work)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", work / "ca-certificates.crt")
    result = subprocess.run(["sh", work / "base.sh", work, BASE_IMAGE], env=engine.env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"base image: {result.stderr}\n{(work / 'debootstrap.log').read_text()[-2000:]}")
    for name, tag in STANDIN_TAGS.items():
        engine.build(tag, work, work / f"{name}.Dockerfile", BASE=BASE_IMAGE)
