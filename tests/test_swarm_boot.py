"""Docker Swarm for real: engines in network namespaces joined into one swarm (tests/swarm_cluster.py).

Root only; marked `boot`. The nodes' engines live in network namespaces of their own; the images
are built on the boot tests' engine (tests/conftest.py), so these tests share its xdist group
("docker"): a second engine in the host's namespace would delete its docker0 bridge.
"""

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from docker_engine import STANDIN_TAGS, Engine
from registry import Registry
from servers import wait_until
from swarm_cluster import REGISTRY, Cluster, kernel_has_esp, kernel_has_ipvs, missing_prerequisites

from conftest import COST, render

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("docker")]

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
def image_builder(engine: Engine) -> Engine:
    """The boot tests' engine (tests/conftest.py) builds the images and pushes them."""
    if reason := missing_prerequisites():
        pytest.skip(reason)
    return engine


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
        # A node learns of the other node's task through gossip, a moment after it runs: wait for both.
        fetch_all = (
            "import socket, time, urllib.request\n"
            "for _ in range(60):\n"
            "    ips = sorted(socket.gethostbyname_ex('tasks.probe')[2])\n"
            "    if len(ips) == 2:\n"
            "        break\n"
            "    time.sleep(0.5)\n"
            "for ip in ips:\n"
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
    ipvs, esp = kernel_has_ipvs(), kernel_has_esp(cluster.hub)
    lines = [f"{seconds:6.1f} s  {phase}" for phase, seconds in COSTS.items()]
    lines.append(f"kernel: IPVS: {'yes' if ipvs else 'no'}, ESP: {'yes' if esp else 'no'}")
    if not ipvs:
        lines.append("NOT EXERCISED (no IPVS): service virtual IPs; the stack was deployed with endpoint_mode dnsrr")
    if not esp:
        lines.append("NOT EXERCISED (no ESP): encrypted overlay traffic between nodes; deployed without `encrypted`"
                     " (the rendered stack.yaml requests it: checked)")  # fmt: skip
    record_property(COST, "\n".join(lines))


# --- The project's own stack on the swarm -------------------------------------------------------
# SPA, postgres, redis and a Celery worker, proxy `none`: the entry is the frontend on the
# attachable edge overlay network, reached from a probe container attached to it.

ANSWERS = {"project_name": "Swarm Demo", "python_version": "3.11", "swarm": True, "proxy_mode": "none",
           "frontend": "spa", "services": ["postgres", "redis", "celery_worker"]}  # fmt: skip
STACK = "swarm_demo"
TAG = "swarmtest"
# Test-only placement labels: the API on one node, the Celery worker on the other.
API_LABEL, WORKER_LABEL = "hc-test.api", "hc-test.worker"
EXPECTED_TASKS = {"postgres": 1, "redis": 1, "backend": 2, "worker_default": 2, "frontend": 2}


class Deployment:
    """The rendered project deployed on the cluster, and how to run its make targets."""

    def __init__(self, cluster: Cluster, project: Path, push_registry: str) -> None:
        self.cluster = cluster
        self.project = project
        self.push_registry = push_registry  # the builder's address of the registry
        self.ipvs = kernel_has_ipvs()
        self.esp = kernel_has_esp(cluster.hub)

    def make(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        """A make target on the manager, as docs/SWARM.md runs it (REGISTRY as the nodes reach it)."""
        settings = {**self.cluster.manager.env, "REGISTRY": REGISTRY, "IMAGE_TAG": TAG,
                    "SWARM_DOCKER_HOSTS": f"unix://{self.cluster.engines[1].socket}", **env}  # fmt: skip
        result = subprocess.run(["make", "-s", *args], cwd=self.project, env=settings, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"make {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.manager.docker(*args, check=check)

    def replicas(self) -> dict[str, str]:
        lines = self.docker("service", "ls", "--filter", f"label=com.docker.stack.namespace={STACK}",
                            "--format", "{{.Name}} {{.Replicas}}").stdout.splitlines()  # fmt: skip
        return {name.removeprefix(f"{STACK}_"): replicas for name, replicas, *_ in (line.split() for line in lines)}

    def converged(self) -> bool:
        """Every service has all its tasks running (healthy: a task with a healthcheck runs only once healthy)."""
        return self.replicas() == {name: f"{count}/{count}" for name, count in EXPECTED_TASKS.items()}

    def wait_converged(self, timeout: float = 420) -> None:
        if not wait_until(self.converged, timeout=timeout, interval=2):
            tasks = self.docker(
                "stack", "ps", "--no-trunc", "--format", "{{.Name}} {{.Node}} {{.CurrentState}} {{.Error}}", STACK
            )
            raise AssertionError(f"not converged: {self.replicas()}\n{tasks.stdout[-5000:]}")

    def container_spec(self, service: str) -> dict:
        spec = json.loads(self.docker("service", "inspect", f"{STACK}_{service}").stdout)[0]["Spec"]
        return spec["TaskTemplate"]["ContainerSpec"]

    def restart_entry_if_dnsrr(self) -> None:
        """Without IPVS (endpoint_mode dnsrr) nginx keeps the backend addresses it resolved at its
        start: after backend tasks were replaced or moved, the frontend restarts to learn the new
        ones (docs/SWARM.md). With a virtual IP nothing is needed."""
        if not self.ipvs:
            before = set(self.tasks("frontend"))
            self.docker("service", "update", "--detach", "--force", f"{STACK}_frontend")
            renewed = lambda: self.converged() and (now := set(self.tasks("frontend"))) and not now & before  # noqa: E731
            assert wait_until(renewed, timeout=240, interval=2), self.docker("service", "ps", f"{STACK}_frontend").stdout

    def tasks(self, service: str) -> list[tuple[str, str]]:
        return running_tasks(self.cluster, f"{STACK}_{service}")

    def through_entry(self, *requests: tuple[str, str]) -> list[tuple[int, str]]:
        """(status, body) of each (method, path) sent to the entry service (frontend:8080) from a
        probe container on the edge overlay network, on the data node (never drained here). A
        connection error is retried: DNS round robin may still list a task that just went away."""
        script = (
            "import json, sys, time, urllib.error, urllib.request\n"
            "answers = []\n"
            "for method, path in json.loads(sys.argv[1]):\n"
            "    request = urllib.request.Request('http://frontend:8080' + path, method=method)\n"
            "    for attempt in range(10):\n"
            "        try:\n"
            "            with urllib.request.urlopen(request, timeout=40) as response:\n"
            "                answers.append((response.status, response.read().decode()))\n"
            "            break\n"
            "        except urllib.error.HTTPError as error:\n"
            "            answers.append((error.code, error.read().decode()))\n"
            "            break\n"
            "        except OSError:\n"
            "            time.sleep(1)\n"
            "    else:\n"
            "        answers.append((0, 'unreachable'))\n"
            "print(json.dumps(answers))\n"
        )
        engine = self.cluster.engines[1]
        result = engine.docker("run", "--rm", "--network", f"{STACK}_edge", STANDIN_TAGS["python"],
                               "python3", "-c", script, json.dumps(requests))  # fmt: skip
        return [tuple(answer) for answer in json.loads(result.stdout)]


def override_for_tests(deployment: Deployment) -> dict:
    """stack.override.yaml for the test: APP_ENV development (the demo task endpoint exists only
    there), the API and the worker on different nodes, and, on a kernel without IPVS (no
    service virtual IPs), every service resolved by DNS round robin."""
    services: dict[str, dict] = {name: {"deploy": {}} for name in EXPECTED_TASKS}
    services["backend"] |= {"environment": {"APP_ENV": "development"}}
    services["backend"]["deploy"]["placement"] = {"constraints": [f"node.labels.{API_LABEL} == true"]}
    services["worker_default"]["deploy"]["placement"] = {"constraints": [f"node.labels.{WORKER_LABEL} == true"]}
    if not deployment.ipvs:
        for service in services.values():
            service["deploy"]["endpoint_mode"] = "dnsrr"
    return {"services": services}


ENCRYPTED = '    driver_opts:\n      encrypted: "true"\n'


@pytest.fixture(scope="session")
def deployment(cluster: Cluster, image_builder: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    project = render(tmp_path_factory.mktemp("swarm-stack") / "project", **ANSWERS)
    # The rendered stack encrypts every overlay network (the kernel may not let us deploy it so).
    networks = yaml.safe_load((project / "stack.yaml").read_text())["networks"]
    assert networks and all(n["driver_opts"] == {"encrypted": "true"} for n in networks.values()), networks

    with timed("project images built on the builder"):
        model = json.loads(image_builder.compose(project, "compose.yaml", "config", "--format", "json", IMAGE_TAG=TAG).stdout)
        for service in model["services"].values():
            if "build" in service:
                context = Path(service["build"]["context"])
                image_builder.build(service["image"], context, context / service["build"]["dockerfile"])

    # The builder (host network namespace) cannot reach the registry's address in the hub: a
    # second registry process on 127.0.0.1 serves the same storage to it.
    (cluster.root / "storage").mkdir(exist_ok=True)
    (cluster.root / "push").mkdir()
    (cluster.root / "push" / "storage").symlink_to(cluster.root / "storage")
    push_registry = Registry(cluster.root / "push")
    deployment = Deployment(cluster, project, f"127.0.0.1:{push_registry.port}")
    try:
        with timed("project images pushed (scripts/swarm.py push)"):
            # `make swarm-push` = `docker compose build` (done above, with BuildKit) + this.
            env = {**image_builder.env, "REGISTRY": deployment.push_registry, "IMAGE_TAG": TAG}
            push = subprocess.run(["python3", "scripts/swarm.py", "push"], cwd=project, env=env, capture_output=True, text=True)
            assert push.returncode == 0, push.stdout + push.stderr

        with timed("secrets, labels, deploy, all healthy"):
            if not deployment.esp:
                stack = project / "stack.yaml"
                stack.write_text(stack.read_text().replace(ENCRYPTED, "    driver_opts: {}\n"))
                assert "encrypted:" not in stack.read_text()
            (project / "stack.override.yaml").write_text(yaml.safe_dump(override_for_tests(deployment)))
            deployment.make("swarm-secrets")
            # docs/SWARM.md's node set-up: the data node; then the test's own placement labels.
            api, data = cluster.nodes
            deployment.docker("node", "update", "--label-add", f"{STACK}.data=true", "--label-add", f"{WORKER_LABEL}=true", data)
            deployment.docker("node", "update", "--label-add", f"{API_LABEL}=true", api)
            deployment.make("swarm-config")
            deployment.make("swarm-deploy")
            deployment.wait_converged()
        yield deployment
    finally:
        push_registry.close()


def test_stack_deploys_healthy_verified_and_serves_across_nodes(
    deployment: Deployment, cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    start = time.monotonic()
    try:
        verified = deployment.make("swarm-verify")
        assert f"{sum(EXPECTED_TASKS.values())} tasks on 2 nodes, 0 failed" in verified.stdout, verified.stdout

        # Through the entry point: nginx (frontend) -> backend -> postgres, redis, and a Celery task.
        answers = deployment.through_entry(
            ("GET", "/api/health/db"), ("GET", "/api/health/redis"), ("POST", "/api/tasks/add?a=2&b=3")
        )
        assert answers == [(200, '{"status":"ok"}'), (200, '{"status":"ok"}'), (200, '{"result":5}')], answers
        api, data = cluster.nodes
        assert {node for node, _ in deployment.tasks("backend")} == {api}
        workers = deployment.tasks("worker_default")
        assert {node for node, _ in workers} == {data} and {node for node, _ in deployment.tasks("redis")} == {data}
        # The task ran on the other node than the API that enqueued it.
        logs = "".join(cluster.engine_of(node).docker("logs", container).stderr for node, container in workers)
        assert re.search(r"Task app\.celery_app\.add\[[0-9a-f-]+\] succeeded in [0-9.e-]+s: 5", logs), logs[-3000:]

        # Secrets inside the containers: owned by the service's user, mode 0400 (Compose cannot).
        for service in ("postgres", "redis", "backend", "worker_default"):
            spec = json.loads(deployment.docker("service", "inspect", f"{STACK}_{service}").stdout)[0]["Spec"]["TaskTemplate"][
                "ContainerSpec"
            ]
            node, container = deployment.tasks(service)[0]
            files = [f"/run/secrets/{ref['File']['Name']}" for ref in spec["Secrets"]]
            stats = cluster.engine_of(node).docker("exec", container, "stat", "-c", "%u:%g %a", *files).stdout.split("\n")
            assert stats[:-1] == [f"{spec['User']} 400"] * len(files), (service, files, stats)
            assert not spec["User"].startswith("0:"), service
    finally:
        COSTS["verify, requests, celery across nodes, secrets"] = time.monotonic() - start
        record_costs(cluster, record_property)


def test_swarm_verify_fails_on_a_weakened_service(deployment: Deployment) -> None:
    with timed("weakened backend: verify red, rolled back"):
        # Polled, not `--detach=false`: that also waits out each update's 60 s monitor period.
        deployment.docker("service", "update", "--detach", "--cap-add", "NET_ADMIN", f"{STACK}_backend")
        try:
            red = lambda: (r := deployment.make("swarm-verify", check=False)) and "8 tasks on 2 nodes, 2 failed" in r.stdout and r  # noqa: E731
            weakened = wait_until(red, timeout=240, interval=3)
            assert weakened and weakened.returncode != 0, deployment.make("swarm-verify", check=False).stdout
            failed = [line for line in weakened.stdout.splitlines() if line.endswith("FAIL")]
            assert len(failed) == 2 and all(line.startswith(f"{STACK}_backend.") for line in failed), weakened.stdout
            assert "    - adds capabilities ['NET_ADMIN'] (the template needs none)" in weakened.stdout.splitlines()
        finally:
            deployment.docker("service", "rollback", "--detach", f"{STACK}_backend")
        green = lambda: "8 tasks on 2 nodes, 0 failed" in deployment.make("swarm-verify", check=False).stdout  # noqa: E731
        assert wait_until(green, timeout=240, interval=3), deployment.make("swarm-verify", check=False).stdout
        deployment.restart_entry_if_dnsrr()
        assert deployment.through_entry(("GET", "/api/health/db")) == [(200, '{"status":"ok"}')]


def update_state(deployment: Deployment, service: str) -> str:
    status = json.loads(deployment.docker("service", "inspect", f"{STACK}_{service}").stdout)[0].get("UpdateStatus") or {}
    return status.get("State", "")


def test_a_broken_backend_image_is_rolled_back_automatically(
    deployment: Deployment, image_builder: Engine, tmp_path: Path
) -> None:
    with timed("broken backend image rolled back"):
        # The backend image, but its process dies at start (as an import error would).
        (tmp_path / "Dockerfile").write_text(
            f'FROM {STACK}-backend:{TAG}\nCMD ["python", "-c", "raise SystemExit(\'broken on purpose\')"]\n'
        )
        image_builder.build(f"{deployment.push_registry}/{STACK}-backend:broken", tmp_path)
        image_builder.docker("push", f"{deployment.push_registry}/{STACK}-backend:broken")
        before = json.loads(deployment.docker("service", "inspect", f"{STACK}_backend").stdout)[0]["Spec"]["TaskTemplate"][
            "ContainerSpec"
        ]["Image"]

        deployment.docker("service", "update", "--detach", "--image", f"{REGISTRY}/{STACK}-backend:broken", f"{STACK}_backend")
        finished = ("rollback_completed", "rollback_paused", "completed")
        state = wait_until(lambda: (s := update_state(deployment, "backend")) in finished and s, timeout=300, interval=2)
        assert state == "rollback_completed", state
        after = json.loads(deployment.docker("service", "inspect", f"{STACK}_backend").stdout)[0]["Spec"]["TaskTemplate"][
            "ContainerSpec"
        ]["Image"]
        assert after == before and ":broken" not in after
        deployment.wait_converged(timeout=120)
        assert deployment.through_entry(("GET", "/api/health/db")) == [(200, '{"status":"ok"}')]


def test_draining_a_node_moves_its_stateless_tasks(
    deployment: Deployment, cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    api, data = cluster.nodes
    try:
        with timed("node drained, stateless tasks moved"):
            # Let the API run on the other node too, then drain its node.
            deployment.docker("node", "update", "--label-add", f"{API_LABEL}=true", data)
            deployment.docker("node", "update", "--availability", "drain", api)

            def moved() -> bool:
                placed = [{node for node, _ in deployment.tasks(service)} for service in EXPECTED_TASKS]
                return deployment.converged() and all(placed) and not any(api in nodes for nodes in placed)

            assert wait_until(moved, timeout=300, interval=2), deployment.docker("stack", "ps", STACK).stdout
            assert {node for node, _ in deployment.tasks("backend")} == {data}
            deployment.restart_entry_if_dnsrr()
            assert deployment.through_entry(("GET", "/api/health/db"), ("POST", "/api/tasks/add?a=1&b=1")) == [
                (200, '{"status":"ok"}'), (200, '{"result":2}')]  # fmt: skip
    finally:
        deployment.docker("node", "update", "--availability", "active", api, check=False)
        record_costs(cluster, record_property)
