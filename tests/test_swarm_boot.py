"""Docker Swarm for real: engines in network namespaces joined into one swarm (tests/swarm_cluster.py).

Root only; marked `boot`, in an xdist group of its own ("swarm"): its engines live in namespaces
of their own, so it runs beside the boot tests' engine without sharing anything with it.
"""

import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from docker_engine import STANDIN_TAGS, Engine, build_standins
from servers import wait_until
from swarm_cluster import Cluster, builder, kernel_has_esp, kernel_has_ipvs, missing_prerequisites

from conftest import COST

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("swarm")]

# The nodes' /etc/docker/daemon.json as docs/SWARM.md's node set-up writes it: Swarm drops a
# service's security_opt, so the engine gives every container no-new-privileges.
NODE_DAEMON_CONFIG = {"no-new-privileges": True, "log-driver": "json-file", "log-opts": {"max-size": "10m", "max-file": "5"}}
# The stand-ins that run on the nodes (node:22-alpine only builds the SPA, on the builder).
RUNTIME_IMAGES = [tag for name, tag in STANDIN_TAGS.items() if name != "node"]
COSTS: dict[str, float] = {}  # seconds per phase, printed in the terminal summary


class timed:
    """Adds the seconds its block takes to COSTS[phase]."""

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        COSTS[self.phase] = COSTS.get(self.phase, 0.0) + time.monotonic() - self.start


@pytest.fixture(scope="session")
def image_builder() -> Iterator[Engine]:
    if reason := missing_prerequisites():
        pytest.skip(reason)
    with timed("builder engine and stand-in images"):
        engine = builder()
        try:
            build_standins(engine)
        except BaseException:
            engine.stop()
            raise
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def cluster(image_builder: Engine) -> Iterator[Cluster]:
    with timed("two-node swarm and registry"):
        cluster = Cluster(size=2, daemon_config=NODE_DAEMON_CONFIG)
    try:
        with timed("stand-ins pushed to the registry"):
            cluster.push(image_builder, RUNTIME_IMAGES)
        yield cluster
    finally:
        cluster.close()


def running_tasks(cluster: Cluster, service: str) -> list[tuple[str, str]]:
    """(node hostname, container id) of each running task of service."""
    tasks = cluster.manager.docker("service", "ps", service, "--no-trunc", "--filter", "desired-state=running",
                                   "--format", "{{.Node}} {{.ID}} {{.CurrentState}}").stdout.split("\n")  # fmt: skip
    found = []
    for line in filter(None, tasks):
        node, task, state = line.split(" ", 2)
        if not state.startswith("Running"):
            return []
        engine = cluster.engine_of(node)
        container = engine.docker("ps", "--quiet", "--filter", f"label=com.docker.swarm.task.id={task}").stdout.strip()
        found.append((node, container))
    return found


def test_two_engines_form_a_swarm_with_an_overlay_network_a_registry_and_no_new_privileges(
    cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    start = time.monotonic()
    nodes = cluster.manager.docker("node", "ls", "--format", "{{.Hostname}} {{.Status}} {{.ManagerStatus}}").stdout
    assert sorted(nodes.splitlines()) == sorted([f"{cluster.nodes[0]} Ready Leader", f"{cluster.nodes[1]} Ready "])

    # Two replicas, one per node, on an overlay network, from the image in the local registry.
    manager = cluster.manager
    manager.docker("network", "create", "--driver", "overlay", "probe-net")
    image = STANDIN_TAGS["python"]
    manager.docker("service", "create", "--detach", "--name", "probe", "--replicas", "2", "--replicas-max-per-node", "1",
                   "--network", "probe-net", "--init", image, "python3", "-m", "http.server", "8000")  # fmt: skip
    try:
        tasks = wait_until(lambda: (t := running_tasks(cluster, "probe")) and len(t) == 2 and t, timeout=120, interval=0.5)
        assert tasks and {node for node, _ in tasks} == set(cluster.nodes), manager.docker("service", "ps", "probe").stdout

        # Each task reaches every task (itself and the one on the other node) over the overlay.
        # tasks.<service> lists the tasks' addresses, whether or not the kernel has IPVS for the VIP.
        fetch_all = (
            "import socket, urllib.request\n"
            "for ip in sorted(socket.gethostbyname_ex('tasks.probe')[2]):\n"
            "    print(ip, urllib.request.urlopen(f'http://{ip}:8000/', timeout=10).status)\n"
        )
        for node, container in tasks:
            engine = cluster.engine_of(node)
            answers = engine.docker("exec", container, "python3", "-c", fetch_all).stdout.split("\n")
            assert [line.split()[1] for line in filter(None, answers)] == ["200", "200"], f"{node}: {answers}"
            # no-new-privileges comes from the node's daemon.json: the service did not ask for it.
            status = engine.docker("exec", container, "grep", "NoNewPrivs", "/proc/1/status").stdout
            assert status.split() == ["NoNewPrivs:", "1"], f"{node}: {status}"
            # Both nodes pulled the very bytes the registry holds (Swarm pins the tag's digest).
            pinned = f"{image.split(':')[0]}@{cluster.registry_digest(image)}"
            assert engine.docker("image", "inspect", pinned, check=False).returncode == 0, f"{node}: {pinned} missing"

        # The engines changed only their own namespaces: Swarm's bridge and rules are in the
        # nodes' namespaces, not in the host's.
        for node in cluster.nodes:
            rules = subprocess.run(["ip", "netns", "exec", node, "iptables-save"], capture_output=True, text=True).stdout
            assert "docker_gwbridge" in rules, node
        host_rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        host_links = subprocess.run(["ip", "-brief", "link"], capture_output=True, text=True).stdout
        assert "docker_gwbridge" not in host_rules + host_links and "192.168.213." not in host_rules
    finally:
        manager.docker("service", "rm", "probe", check=False)
        COSTS["overlay, registry and no-new-privileges checks"] = time.monotonic() - start
        record_costs(cluster, record_property)


def record_costs(cluster: Cluster, record_property: Callable[[str, object], None]) -> None:
    kernel = f"IPVS: {'yes' if kernel_has_ipvs() else 'no'}, ESP: {'yes' if kernel_has_esp(cluster.hub) else 'no'}"
    record_property(COST, "\n".join([*(f"{seconds:6.1f} s  {phase}" for phase, seconds in COSTS.items()), f"kernel: {kernel}"]))
