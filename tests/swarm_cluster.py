"""A real Docker Swarm of several engines on one machine, for the Swarm tests (root only).

Everything lives in network namespaces of its own, so the host's interfaces, routes and
firewall rules are never touched (a dockerd edits the iptables of its own namespace only):

    <name>-hub   a bridge with 192.168.213.1/24, and the registry (docker-registry, plain HTTP,
                 port 5000), which every node uses as its Docker Hub mirror
    <name>-n1..  eth0 (a veth whose other end is on the hub's bridge) 192.168.213.11, .12, ...,
                 and a dockerd; n1 initialises the swarm, the others join it as workers

No node can reach the internet. Images are built by the boot tests' engine in the host's network
namespace (apt and pip need the network) and copied into the registry with skopeo, from inside
the hub's namespace. The engines and the
registry are servers of tests/servers.py (ended when a run is interrupted); the namespaces are
deleted by close(), at exit, or by the next cluster when the run that made them was killed.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from docker_engine import Engine
from registry import Registry
from servers import wait_until

SUBNET = "192.168.213"  # the underlay; Swarm's overlay networks come from 10.0.0.0/8
REGISTRY = f"{SUBNET}.1:5000"
PROGRAMS = ("dockerd", "debootstrap", "docker-registry", "skopeo", "ip", "nsenter", "unshare", "curl")


def in_namespace(namespace: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{namespace}"]


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{result.stdout}{result.stderr}")
    return result


def missing_prerequisites() -> str | None:
    """Why a cluster cannot be made here, or None."""
    if os.geteuid() != 0:
        return "Swarm tests need root (network namespaces, dockerd)"
    missing = [program for program in PROGRAMS if not shutil.which(program)]
    return f"Swarm tests need {', '.join(missing)} (tests/run.sh installs them)" if missing else None


class Cluster:
    def __init__(self, size: int = 2, daemon_config: dict | None = None) -> None:
        self.name = f"hcsw{os.getpid()}"
        self.hub = f"{self.name}-hub"
        self.nodes = [f"{self.name}-n{i}" for i in range(1, size + 1)]
        self.root = Path(tempfile.mkdtemp(prefix="hc-swarm-"))
        self.namespaces: list[str] = []
        self.engines: list[Engine] = []
        self.registry: Registry | None = None
        delete_abandoned_namespaces()
        atexit.register(self.close)
        try:
            self._make_network()
            self.registry = Registry(self.root, namespace=self.hub, address=f"{SUBNET}.1")
            # Every node pulls Docker Hub names (python:3.11-slim) from the registry, as its mirror.
            config = {**(daemon_config or {}), "registry-mirrors": [f"http://{REGISTRY}"], "insecure-registries": [REGISTRY]}
            self.engines = [Engine(namespace=node, daemon_config=config) for node in self.nodes]
            self._make_swarm()
        except BaseException:
            self.close()
            raise

    @property
    def manager(self) -> Engine:
        return self.engines[0]

    def address(self, node: int) -> str:
        return f"{SUBNET}.{11 + node}"

    def _make_network(self) -> None:
        run("ip", "netns", "add", self.hub)
        self.namespaces.append(self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        for device in ("lo", "br0"):
            run("ip", "-n", self.hub, "link", "set", device, "up")
        for index, node in enumerate(self.nodes):
            run("ip", "netns", "add", node)
            self.namespaces.append(node)
            # Created in the hub with its peer in the node: nothing ever appears in the host's namespace.
            port = f"port{index}"
            run("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node)
            run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", node, "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
            for device in ("lo", "eth0"):
                run("ip", "-n", node, "link", "set", device, "up")
            run("ip", "-n", node, "route", "add", "default", "via", f"{SUBNET}.1")

    def _make_swarm(self) -> None:
        """As docs/SWARM.md says: managers autolock, every node on its private address only."""
        address = self.address(0)
        self.manager.docker("swarm", "init", "--autolock", "--listen-addr", f"{address}:2377", "--advertise-addr", address)
        token = self.manager.docker("swarm", "join-token", "--quiet", "worker").stdout.strip()
        for index, engine in enumerate(self.engines[1:], start=1):
            own = self.address(index)
            listen = ["--listen-addr", f"{own}:2377", "--advertise-addr", own]
            engine.docker("swarm", "join", *listen, "--token", token, f"{address}:2377")
        ready = lambda: self.node_states() == ["Ready"] * len(self.engines)  # noqa: E731
        if not wait_until(ready, timeout=60, interval=0.5):
            raise RuntimeError(f"nodes not ready: {self.node_states()}")

    def node_states(self) -> list[str]:
        return self.manager.docker("node", "ls", "--format", "{{.Status}}").stdout.split()

    def engine_of(self, hostname: str) -> Engine:
        """The engine of the node Swarm calls hostname (its namespace's name)."""
        return self.engines[self.nodes.index(hostname)]

    def push(self, source: Engine, images: Sequence[str]) -> None:
        """Copy images (Docker Hub names, e.g. python:3.11-slim) from source's image store into
        the registry, under the names the nodes' Docker Hub mirror looks up."""

        def copy(image: str) -> None:
            # Fast compression: the layers cross no real network.
            run(*in_namespace(self.hub), "skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-compress-level=1",
                "--src-daemon-host", f"unix://{source.socket}", f"docker-daemon:{image}", mirrored(image))  # fmt: skip

        with ThreadPoolExecutor() as pool:
            list(pool.map(copy, images))

    def registry_digest(self, image: str) -> str:
        result = run(*in_namespace(self.hub), "skopeo", "inspect", "--tls-verify=false", mirrored(image))
        return json.loads(result.stdout)["Digest"]

    def close(self) -> None:
        """Leave the swarm, stop the engines and the registry, delete the namespaces (with the
        bridge and the veths in them). Safe to call again."""
        for engine in reversed(self.engines):
            engine.docker("swarm", "leave", "--force", check=False)
            engine.stop()
        self.engines = []
        if self.registry:
            self.registry.close()
            self.registry = None
        while self.namespaces:
            subprocess.run(["ip", "netns", "delete", self.namespaces.pop()], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def mirrored(image: str) -> str:
    """Where the registry, as a Docker Hub mirror, keeps a Docker Hub image (official images
    under library/)."""
    official = "/" not in image.split(":")[0]
    return f"docker://{REGISTRY}/{'library/' if official else ''}{image}"


def delete_abandoned_namespaces() -> None:
    """Namespaces a killed run left behind (named after a process that no longer exists)."""
    for line in run("ip", "netns", "list").stdout.splitlines():
        match = re.match(r"(hcsw(\d+)-\S+)", line)
        if match and not Path(f"/proc/{match[2]}").exists():
            subprocess.run(["ip", "netns", "delete", match[1]], capture_output=True)


def kernel_has_ipvs() -> bool:
    """Swarm balances a service's virtual IP with IPVS; without it (some minimal kernels) only
    the names tasks.<service> and services with `endpoint_mode: dnsrr` reach the tasks."""
    if shutil.which("modprobe"):
        subprocess.run(["modprobe", "ip_vs"], capture_output=True)
    return Path("/proc/net/ip_vs").exists()


def kernel_has_esp(namespace: str) -> bool:
    """Encrypted overlay networks need ESP with AES-GCM (IPsec); without it their traffic between
    nodes is dropped. Probed by adding a security association inside namespace (no host change)."""
    key = "0x" + "11" * 20  # 16 bytes of key, 4 of salt
    state = ["ip", "-n", namespace, "xfrm", "state", "add", "src", f"{SUBNET}.1", "dst", f"{SUBNET}.2", "proto", "esp",
             "spi", "0x100", "mode", "transport", "aead", "rfc4106(gcm(aes))", key, "64"]  # fmt: skip
    added = subprocess.run(state, capture_output=True).returncode == 0
    subprocess.run(["ip", "-n", namespace, "xfrm", "state", "flush"], capture_output=True)
    return added
