"""scripts/verify.py's hardening rules, fast and without an engine.

The running side judges `docker inspect` data recorded once from a real engine (a compliant
stand-in stack: tests/data/verify_inspect.json, re-recorded by tests/record_inspect.py); the
Compose side judges the resolved model of the same topology, rendered here. The compliant stack
passes; each case weakens one service in one way and must fail with exactly that reason.
"""

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from docker_engine import BASE_IMAGE, Engine

from conftest import TESTS, compose_model, render, rendered_verify

RECORDED = json.loads((TESTS / "data" / "verify_inspect.json").read_text())
SECRET = "recorded-secret-value"
# The engine's data root and socket as a running engine reports them (not the default paths).
ENGINE_PATHS = ("/srv/docker", "/srv/run/engine.sock")
# The recording engine runs on cgroup v1, where sharing the host's cgroup namespace is the default.
RECORDED_CGROUPNS_DEFAULT = "host"
# A named volume whose driver options bind-mount the host's root (`docker volume inspect`, and the
# same in the Compose model): mounted by a case below, unused otherwise.
HOST_ROOT_VOLUME = {"Name": "hostroot", "Driver": "local", "Options": {"type": "none", "o": "bind", "device": "/"}}
Mutation = Callable[[dict], object]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("verify") / "project", **RECORDED["answers"])


@pytest.fixture(scope="module")
def verify(project: Path) -> ModuleType:
    return rendered_verify(project)


def judge_containers(
    verify: ModuleType,
    containers: list[dict],
    networks: list[dict],
    *,
    test: bool = True,
    cgroupns_default: str = RECORDED_CGROUPNS_DEFAULT,
) -> dict:
    """service -> reasons, as `make test-verify` finds them (the recording is of the test stack)."""
    own_images = {"verify_demo-backend:local"}  # what compose.test.yaml builds
    by_name = {network["Name"]: network for network in networks}
    volumes = {"hostroot": HOST_ROOT_VOLUME}
    services = [verify.from_inspect(info, by_name, own_images, volumes, cgroupns_default) for info in containers]
    return {svc.name: verify.problems(svc, test=test, secrets=[SECRET], engine_paths=ENGINE_PATHS) for svc in services}


def judge_model(verify: ModuleType, model: dict, *, test: bool = True) -> dict:
    services = verify.from_compose(model)
    return {svc.name: verify.problems(svc, test=test, secrets=[SECRET], engine_paths=ENGINE_PATHS) for svc in services}


def container(containers: list[dict], service: str) -> dict:
    return next(c for c in containers if c["Config"]["Labels"]["com.docker.compose.service"] == service)


def bind(source: str) -> Mutation:
    mount = {"Type": "bind", "Source": source, "Destination": "/mnt/host", "Mode": "", "RW": False, "Propagation": "rprivate"}
    return lambda c: c["Mounts"].append(mount)


def compose_bind(source: str) -> Mutation:
    return lambda s: s.setdefault("volumes", []).append(
        {"type": "bind", "source": source, "target": "/mnt/host", "read_only": True}
    )


def env(entry: str) -> Mutation:
    return lambda c: c["Config"]["Env"].append(entry)


def host(**settings: object) -> Mutation:
    return lambda c: c["HostConfig"].update(settings)


def config(**settings: object) -> Mutation:
    return lambda c: c["Config"].update(settings)


def volume_mount(name: str) -> Mutation:
    mount = {"Type": "volume", "Name": name, "Source": f"/srv/docker/volumes/{name}/_data", "Destination": "/mnt/host",
             "Driver": "local", "Mode": "z", "RW": True, "Propagation": ""}  # fmt: skip
    return lambda c: c["Mounts"].append(mount)


def tmpfs(options: str) -> Mutation:
    return lambda c: c["HostConfig"]["Tmpfs"].update({"/tmp": options})


# (case id, service, weakening of its `docker inspect`, the same in its Compose model or None when
# Compose cannot express it, the one reason expected)
CASES = [
    ("unhealthy", "backend", lambda c: c["State"]["Health"].update(Status="unhealthy"), None, "not healthy (unhealthy)"),
    (
        "stopped",
        "backend",
        lambda c: c["State"].update(Health=None, Running=False, Status="exited", ExitCode=0),
        None,
        "not healthy (exited (0))",
    ),
    # The one-shot migrate service: done only when it exited 0; it never restarts.
    (
        "one-shot-failed",
        "migrate",
        lambda c: c["State"].update(ExitCode=1),
        None,
        "one-shot service did not complete (exited (1))",
    ),
    (
        "one-shot-running",
        "migrate",
        lambda c: c["State"].update(Running=True, Status="running"),
        None,
        "one-shot service did not complete (running)",
    ),
    (
        "one-shot-restarts",
        "migrate",
        host(RestartPolicy={"Name": "unless-stopped", "MaximumRetryCount": 0}),
        lambda s: s.update(restart="unless-stopped"),
        "restart is unless-stopped, not no (a one-shot service runs once)",
    ),
    (
        "one-shot-unlimited",
        "migrate",
        host(Memory=0),
        lambda s: s["deploy"]["resources"]["limits"].pop("memory"),
        "no memory limit",
    ),
    (
        "depends-on-one-shot",
        "backend",
        lambda c: c["Config"]["Labels"].update(
            {"com.docker.compose.depends_on": "postgres:service_healthy:false,migrate:service_started:false"}
        ),
        lambda s: s["depends_on"]["migrate"].update(condition="service_started"),
        "depends on migrate without service_completed_successfully",
    ),
    (
        "privileged",
        "backend",
        host(Privileged=True),
        lambda s: s.update(privileged=True),
        "privileged: every capability and device of the host",
    ),
    (
        "cap-drop",
        "backend",
        host(CapDrop=["NET_RAW"]),
        lambda s: s.update(cap_drop=["NET_RAW"]),
        "cap_drop is ['NET_RAW'], not [ALL]",
    ),
    (
        "cap-add",
        "backend",
        host(CapAdd=["CAP_NET_ADMIN"]),
        lambda s: s.update(cap_add=["NET_ADMIN"]),
        "adds capabilities ['NET_ADMIN'] (the template needs none)",
    ),
    ("no-new-privileges", "backend", host(SecurityOpt=[]), lambda s: s.update(security_opt=[]), "no-new-privileges not set"),
    (
        "no-new-privileges-false",
        "backend",
        host(SecurityOpt=["no-new-privileges:false"]),
        lambda s: s.update(security_opt=["no-new-privileges:false"]),
        "no-new-privileges not set",
    ),
    *[
        (
            f"security-opt-{opt}",
            "backend",
            lambda c, opt=opt: c["HostConfig"]["SecurityOpt"].append(opt),
            lambda s, opt=opt: s["security_opt"].append(opt.replace("=", ":")),
            f"security_opt {opt} turns a protection off",
        )
        for opt in ("seccomp=unconfined", "apparmor=unconfined", "label=disable", "systempaths=unconfined")
    ],
    *[
        (
            f"{kind}-host",
            "backend",
            host(**{inspect_key: "host"}),
            lambda s, key=compose_key: s.update({key: "host"}),
            f"shares the host's {kind} namespace",
        )
        for kind, (compose_key, inspect_key) in {
            "pid": ("pid", "PidMode"),
            "network": ("network_mode", "NetworkMode"),
            "ipc": ("ipc", "IpcMode"),
            "uts": ("uts", "UTSMode"),
            "userns": ("userns_mode", "UsernsMode"),
        }.items()
    ],
    (
        "devices",
        "backend",
        host(Devices=[{"PathOnHost": "/dev/fuse", "PathInContainer": "/dev/fuse", "CgroupPermissions": "rwm"}]),
        lambda s: s.update(devices=[{"source": "/dev/fuse", "target": "/dev/fuse", "permissions": "rwm"}]),
        "host devices ['/dev/fuse']",
    ),
    *[
        (f"bind{source.replace('/', '-')}", "backend", bind(source), compose_bind(source), f"bind-mounts the host's {source}")
        for source in (
            "/",
            "/etc",
            "/proc",
            "/sys/fs/cgroup",
            "/var/run/docker.sock",
            "/run/docker.sock",
            "/var/run",
            "/srv/docker/volumes",
            "/srv/run/engine.sock",
            "/srv/run",
        )
    ],
    # Settings that give a container the host (CIS Docker Benchmark 5.7, 5.17, 5.21, 5.31).
    (
        "volume-driver-bind-root",
        "backend",
        volume_mount("hostroot"),
        lambda s: s.setdefault("volumes", []).append({"type": "volume", "source": "hostroot", "target": "/mnt/host"}),
        "bind-mounts the host's / (volume hostroot)",
    ),
    (
        "device-cgroup-rules",
        "backend",
        host(DeviceCgroupRules=["b 8:* rmw"]),
        lambda s: s.update(device_cgroup_rules=["b 8:* rmw"]),
        "device_cgroup_rules ['b 8:* rmw'] open host devices",
    ),
    (
        "group-add-disk",
        "postgres",
        host(GroupAdd=["10001", "6"]),
        lambda s: s.update(group_add=["10001", "6"]),
        "supplementary groups ['6'] (only the secrets group 10001 may be added)",
    ),
    ("cgroup-host", "backend", None, lambda s: s.update(cgroup="host"), "shares the host's cgroup namespace"),
    (
        "sysctls",
        "backend",
        host(Sysctls={"net.ipv4.ip_forward": "1"}),
        lambda s: s.update(sysctls={"net.ipv4.ip_forward": "1"}),
        "sets kernel parameters (sysctls ['net.ipv4.ip_forward'])",
    ),
    (
        "seccomp-profile",
        "backend",
        lambda c: c["HostConfig"]["SecurityOpt"].append('seccomp={"defaultAction":"SCMP_ACT_ALLOW"}'),
        lambda s: s["security_opt"].append("seccomp:/srv/allow-all.json"),
        "security_opt seccomp replaces the default seccomp profile",
    ),
    *[
        (
            f"{kind}-other-container",
            "backend",
            host(**{inspect_key: "container:0123abcd"}),
            lambda s, key=compose_key: s.update({key: "container:0123abcd"}),
            f"shares the {kind} namespace of container:0123abcd",
        )
        for kind, (compose_key, inspect_key) in {
            "pid": ("pid", "PidMode"),
            "network": ("network_mode", "NetworkMode"),
            "ipc": ("ipc", "IpcMode"),
        }.items()
    ],
    (
        "pid-other-service",
        "backend",
        None,
        lambda s: s.update(pid="service:postgres"),
        "shares the pid namespace of service:postgres",
    ),
    *[
        (f"bind{source.replace('/', '-')}", "backend", bind(source), compose_bind(source), f"bind-mounts the host's {source}")
        for source in (
            "/dev",
            "/dev/sda",
            "/root",
            "/home",
            "/home/admin/.ssh",
            "/boot",
            "/run/containerd/containerd.sock",
            "/var/run/containerd/containerd.sock",
            "/run/crio/crio.sock",
            "/run/podman/podman.sock",
            "/run/user/1000/docker.sock",
            "/var/lib/containerd",
        )
    ],
    # Each service receives only the secrets it reads (the table in includes/common.jinja).
    (
        "secret-not-read",
        "redis",
        lambda c: c["Mounts"].append(
            {
                "Type": "bind",
                "Source": "/srv/app/secrets/postgres_password",
                "Destination": "/run/secrets/postgres_password",
                "Mode": "",
                "RW": False,
                "Propagation": "rprivate",
            }
        ),
        lambda s: s["secrets"].append({"source": "postgres_password", "target": "/run/secrets/postgres_password"}),
        "receives the secret postgres_password, which it does not read",
    ),
    (
        "user-root",
        "backend",
        config(User="0:10001"),
        lambda s: s.update(user="0:10001"),
        "user is 0:10001, not a non-root numeric UID",
    ),
    ("user-unset", "backend", config(User=""), lambda s: s.pop("user"), "user is root (unset), not a non-root numeric UID"),
    (
        "user-name",
        "backend",
        config(User="app:10001"),
        lambda s: s.update(user="app:10001"),
        "user is app:10001, not a non-root numeric UID",
    ),
    (
        "group-root",
        "backend",
        config(User="10001:0"),
        lambda s: s.update(user="10001:0"),
        "user 10001:0 runs with group root (0)",
    ),
    (
        "group-root-name",
        "backend",
        config(User="10001:root"),
        lambda s: s.update(user="10001:root"),
        "user 10001:root runs with group root (0)",
    ),
    (
        "group-unset",
        "backend",
        config(User="10001"),
        lambda s: s.update(user="10001"),
        "user 10001 has no numeric GID (Docker may pick group root): write UID:GID",
    ),
    (
        "group-add-root",
        "postgres",
        host(GroupAdd=["10001", "0"]),
        lambda s: s.update(group_add=["10001", "0"]),
        "supplementary group root (['0'])",
    ),
    (
        "group-add-root-name",
        "postgres",
        host(GroupAdd=["root"]),
        lambda s: s.update(group_add=["root"]),
        "supplementary group root (['root'])",
    ),
    ("writable", "backend", host(ReadonlyRootfs=False), lambda s: s.update(read_only=False), "root filesystem is writable"),
    ("no-init", "backend", host(Init=None), lambda s: s.pop("init"), "no init"),
    (
        "restart",
        "backend",
        host(RestartPolicy={"Name": "always", "MaximumRetryCount": 0}),
        lambda s: s.update(restart="always"),
        "restart is always, not unless-stopped",
    ),
    (
        "log-driver",
        "backend",
        host(LogConfig={"Type": "local", "Config": {}}),
        lambda s: s.update(logging={"driver": "local"}),
        "no log rotation (json-file with max-size and max-file)",
    ),
    (
        "log-unbounded",
        "backend",
        host(LogConfig={"Type": "json-file", "Config": {"max-size": "10m"}}),
        lambda s: s["logging"]["options"].pop("max-file"),
        "no log rotation (json-file with max-size and max-file)",
    ),
    ("ulimits", "backend", host(Ulimits=[]), lambda s: s.pop("ulimits"), "no nofile ulimit"),
    ("cpus", "backend", host(NanoCpus=0, CpuQuota=0), lambda s: s["deploy"]["resources"]["limits"].pop("cpus"), "no cpus limit"),
    ("memory", "backend", host(Memory=0), lambda s: s["deploy"]["resources"]["limits"].pop("memory"), "no memory limit"),
    ("pids", "backend", host(PidsLimit=None), lambda s: s["deploy"]["resources"]["limits"].pop("pids"), "no pids limit"),
    ("pids-unlimited", "backend", host(PidsLimit=-1), None, "no pids limit"),
    ("cpus-reservation", "backend", None, lambda s: s["deploy"]["resources"]["reservations"].pop("cpus"), "no cpus reservation"),
    (
        "memory-reservation",
        "backend",
        host(MemoryReservation=0),
        lambda s: s["deploy"]["resources"]["reservations"].pop("memory"),
        "no memory reservation",
    ),
    ("no-healthcheck", "backend", config(Healthcheck=None), lambda s: s.pop("healthcheck"), "no healthcheck"),
    (
        "healthcheck-none",
        "backend",
        config(Healthcheck={"Test": ["NONE"]}),
        lambda s: s.update(healthcheck={"test": ["NONE"]}),
        "no healthcheck",
    ),
    (
        "healthcheck-curl",
        "backend",
        config(Healthcheck={"Test": ["CMD", "curl", "-f", "http://127.0.0.1:8000/"]}),
        lambda s: s.update(healthcheck={"test": ["CMD", "curl", "-f", "http://127.0.0.1:8000/"]}),
        "healthcheck needs curl",
    ),
    (
        "tmpfs-exec",
        "backend",
        tmpfs("size=64m,uid=10001,nosuid"),
        lambda s: s.update(tmpfs=["/tmp:size=64m,uid=10001,nosuid"]),
        "tmpfs /tmp lacks noexec/nosuid",
    ),
    (
        "tmpfs-size",
        "backend",
        tmpfs("uid=10001,noexec,nosuid"),
        lambda s: s.update(tmpfs=["/tmp:uid=10001,noexec,nosuid"]),
        "tmpfs /tmp has no size",
    ),
    (
        "tmpfs-owner",
        "backend",
        tmpfs("size=64m,noexec,nosuid"),
        lambda s: s.update(tmpfs=["/tmp:size=64m,noexec,nosuid"]),
        "tmpfs /tmp has no owner (root-owned, unwritable)",
    ),
    (
        "depends-on",
        "backend",
        lambda c: c["Config"]["Labels"].update({"com.docker.compose.depends_on": "postgres:service_started:false"}),
        lambda s: s["depends_on"]["postgres"].update(condition="service_started"),
        "depends on postgres without service_healthy",
    ),
    (
        "secret-variable",
        "backend",
        env("API_TOKEN=abc"),
        lambda s: s["environment"].update(API_TOKEN="abc"),
        "secret-like variable API_TOKEN in the environment",
    ),
    (
        "key-variable",
        "backend",
        env("SIGNING_KEY=abc"),
        lambda s: s["environment"].update(SIGNING_KEY="abc"),
        "secret-like variable SIGNING_KEY in the environment",
    ),
    (
        "secret-value",
        "backend",
        env(f"DATABASE_URL=postgres://u:{SECRET}@postgres/db"),
        lambda s: s["environment"].update(DATABASE_URL=f"postgres://u:{SECRET}@postgres/db"),
        "a secret value is in the environment variable DATABASE_URL",
    ),
    (
        "port-every-interface",
        "backend",
        host(PortBindings={"8000/tcp": [{"HostIp": "", "HostPort": "8000"}]}),
        lambda s: s["ports"][0].pop("host_ip"),
        "port 8000/tcp published on every interface",
    ),
    (
        "port-public",
        "backend",
        host(PortBindings={"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8000"}]}),
        lambda s: s["ports"][0].update(host_ip="0.0.0.0"),
        "port 8000/tcp published on 0.0.0.0",
    ),
    (
        "data-port",
        "postgres",
        host(PortBindings={"5432/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5432"}]}),
        lambda s: s.update(ports=[{"target": 5432, "published": "5432", "host_ip": "127.0.0.1", "protocol": "tcp"}]),
        "data service publishes a port",
    ),
    (
        "data-egress",
        "postgres",
        lambda c: c["NetworkSettings"]["Networks"].update(verify_demo_test_edge={}),
        lambda s: s["networks"].update(edge=None),
        "on non-internal networks ['verify_demo_test_edge']",
    ),
    (
        "image-latest",
        "redis",
        config(Image="redis:latest"),
        lambda s: s.update(image="redis:latest"),
        "third-party image 'redis:latest' has no fixed tag",
    ),
    (
        "image-untagged",
        "redis",
        config(Image="redis"),
        lambda s: s.update(image="redis"),
        "third-party image 'redis' has no fixed tag",
    ),
]


def weakened(containers: list[dict], service: str, mutation: Mutation) -> list[dict]:
    copies = copy.deepcopy(containers)
    mutation(container(copies, service))
    return copies


def test_recorded_stack_passes(verify: ModuleType) -> None:
    judged = judge_containers(verify, RECORDED["containers"], RECORDED["networks"])
    assert judged == {"backend": [], "migrate": [], "postgres": [], "redis": []}


def test_rendered_model_passes(verify: ModuleType, project: Path) -> None:
    assert verify.built_images(compose_model(project, "compose.test.yaml")) == {"verify_demo-backend:local"}
    for compose_file, test in (("compose.test.yaml", True), ("compose.yaml", False)):
        assert verify.config_problems(compose_model(project, compose_file), test=test) == []


@pytest.mark.parametrize(
    ("service", "mutation", "reason"), [(s, m, r) for _, s, m, _, r in CASES if m], ids=[c[0] for c in CASES if c[2]]
)
def test_running_container_weakened_fails(verify: ModuleType, service: str, mutation: Mutation, reason: str) -> None:
    judged = judge_containers(verify, weakened(RECORDED["containers"], service, mutation), RECORDED["networks"])
    assert judged.pop(service) == [reason]
    assert judged == {name: [] for name in judged}


@pytest.mark.parametrize(
    ("service", "mutation", "reason"), [(s, m, r) for _, s, _, m, r in CASES if m], ids=[c[0] for c in CASES if c[3]]
)
def test_compose_service_weakened_fails(verify: ModuleType, project: Path, service: str, mutation: Mutation, reason: str) -> None:
    model = compose_model(project, "compose.test.yaml")
    # Mounted by one case only.
    model.setdefault("volumes", {})["hostroot"] = {"name": "hostroot", "driver_opts": HOST_ROOT_VOLUME["Options"]}
    mutation(model["services"][service])
    judged = judge_model(verify, model)
    assert judged.pop(service) == [reason]
    assert judged == {name: [] for name in judged}


def test_harmless_binds_and_public_variables_pass(verify: ModuleType) -> None:
    """Narrow rules: a file of /etc, a project folder, the python image's GPG_KEY, loopback on IPv6."""
    containers = weakened(RECORDED["containers"], "backend", bind("/etc/localtime"))
    for mutation in (bind("/srv/app/uploads"), env("GPG_KEY=0123456789ABCDEF0123456789ABCDEF01234567"),
                     host(PortBindings={"8000/tcp": [{"HostIp": "::1", "HostPort": "8000"}]})):  # fmt: skip
        mutation(container(containers, "backend"))
    assert judge_containers(verify, containers, RECORDED["networks"])["backend"] == []


def test_no_network_is_not_an_outside_network(verify: ModuleType) -> None:
    """network_mode: none shows the engine's "none" network, which connects nothing."""
    containers = weakened(RECORDED["containers"], "postgres", host(NetworkMode="none"))
    container(containers, "postgres")["NetworkSettings"]["Networks"] = {"none": {}}
    none = {"Name": "none", "Internal": False, "Labels": {}}
    assert judge_containers(verify, containers, [*RECORDED["networks"], none])["postgres"] == []


def npm_network(containers: list[dict], service: str) -> list[dict]:
    """The containers with `service` joined to Nginx Proxy Manager's network (created outside the project)."""
    copies = copy.deepcopy(containers)
    container(copies, service)["NetworkSettings"]["Networks"]["npm_proxy_network"] = {}
    return copies


NPM = {"Name": "npm_proxy_network", "Internal": False, "Labels": {}}


def test_external_networks_only_for_the_entry_service_in_production(verify: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    networks = [*RECORDED["networks"], NPM]
    postgres_joined = judge_containers(verify, npm_network(RECORDED["containers"], "postgres"), networks, test=False)
    assert postgres_joined["postgres"] == [
        "on non-internal networks ['npm_proxy_network']",
        "joins external networks ['npm_proxy_network']",
    ]
    backend_joined = npm_network(RECORDED["containers"], "backend")
    assert judge_containers(verify, backend_joined, networks, test=False)["backend"] == []
    assert judge_containers(verify, backend_joined, networks)["backend"] == ["joins external networks ['npm_proxy_network']"]

    # With Nginx Proxy Manager, the entry service must be on its network in production.
    monkeypatch.setattr(verify, "ENTRY_ON_EXTERNAL_NETWORK", True)
    assert judge_containers(verify, RECORDED["containers"], networks, test=False)["backend"] == [
        "entry service is not on the Nginx Proxy Manager network"
    ]
    assert judge_containers(verify, backend_joined, networks, test=False)["backend"] == []


def test_public_services_may_publish_everywhere_in_production_only(verify: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    public = weakened(
        RECORDED["containers"], "backend", host(PortBindings={"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "80"}]})
    )
    monkeypatch.setattr(verify, "PUBLIC_SERVICES", {"backend"})
    assert judge_containers(verify, public, RECORDED["networks"], test=False)["backend"] == []
    assert judge_containers(verify, public, RECORDED["networks"])["backend"] == ["port 8080/tcp published on 0.0.0.0"]


def test_missing_secret_file_fails_the_config_check(verify: ModuleType, project: Path) -> None:
    model = compose_model(project, "compose.test.yaml")
    model["secrets"]["redis_password"]["file"] = str(project / "secrets" / "test" / "absent")
    assert verify.config_problems(model, test=True) == [f"secret redis_password: file {project}/secrets/test/absent missing"]


def test_the_test_stack_may_not_read_the_production_secrets(verify: ModuleType, project: Path) -> None:
    model = compose_model(project, "compose.test.yaml")
    assert verify.config_problems(model, test=True) == []
    model["secrets"]["app_secret_key"]["file"] = str(project / "secrets" / "app_secret_key")  # e.g. by an override
    assert verify.config_problems(model, test=True) == [
        f"secret app_secret_key: the test stack reads {project}/secrets/app_secret_key, not its own secrets/test/app_secret_key"
    ]


def test_config_command_judges_services_added_in_the_override(project: Path, tmp_path: Path) -> None:
    """`make config`'s check, as users run it: the Compose files, the override's services included."""
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(shutil.which("docker-compose") or "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")} | {"DOCKER_CONFIG": str(plugins.parent)}
    (project / "intruder.yaml").write_text(
        'services:\n  intruder:\n    image: "busybox:1.37"\n    privileged: true\n    volumes: ["/:/host:ro"]\n'
    )

    def check(*files: str) -> subprocess.CompletedProcess[str]:
        command = ["python3", "scripts/verify.py", "--config", "--test", *(f"--compose-file={f}" for f in files)]
        return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)

    clean = check("compose.test.yaml")
    assert clean.returncode == 0 and "4 services, 0 problems" in clean.stdout, clean.stdout + clean.stderr
    dangerous = check("compose.test.yaml", "intruder.yaml")
    assert dangerous.returncode == 1, dangerous.stdout + dangerous.stderr
    assert "verify --config: intruder: privileged: every capability and device of the host" in dangerous.stdout.splitlines()
    assert "verify --config: intruder: bind-mounts the host's /" in dangerous.stdout.splitlines()


def test_host_cgroup_namespace_fails_where_the_engine_gives_a_private_one(verify: ModuleType) -> None:
    """On cgroup v2 engines a container gets its own cgroup namespace unless it asks for the
    host's (`cgroup: host`, --cgroupns host); on cgroup v1 (the recording engine) the host's is the
    default, indistinguishable on the running container: the Compose model shows the choice."""
    judged = judge_containers(verify, RECORDED["containers"], RECORDED["networks"], cgroupns_default="private")
    assert judged == {name: ["shares the host's cgroup namespace"] for name in ("backend", "migrate", "postgres", "redis")}


SWARM_ANSWERS = {"project_name": "Verify Demo", "proxy_mode": "nginx-certbot", "services": ["postgres", "redis"], "swarm": True}


@pytest.fixture(scope="module")
def swarm_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("verify-swarm") / "project", tasks=False, **SWARM_ANSWERS)


# (case id, stack.override.yaml, the problem expected) for what Swarm's loader accepts; it refuses
# cgroup, device_cgroup_rules and group_add outright.
SWARM_CASES = [
    (
        "volume-driver-bind-root",
        "services:\n  backend:\n    volumes: [hostroot:/mnt/host]\n"
        "volumes:\n  hostroot:\n    driver_opts: {type: none, o: bind, device: /}\n",
        "backend: bind-mounts the host's / (volume hostroot)",
    ),
    (
        "sysctls",
        "services:\n  backend:\n    sysctls: {net.ipv4.ip_forward: 1}\n",
        "backend: sets kernel parameters (sysctls ['net.ipv4.ip_forward'])",
    ),
    ("bind-dev", "services:\n  backend:\n    volumes: [/dev:/dev]\n", "backend: bind-mounts the host's /dev"),
    ("bind-home", "services:\n  backend:\n    volumes: [/home:/mnt/home:ro]\n", "backend: bind-mounts the host's /home"),
    (
        "bind-containerd",
        "services:\n  backend:\n    volumes: [/run/containerd/containerd.sock:/run/containerd.sock]\n",
        "backend: bind-mounts the host's /run/containerd/containerd.sock",
    ),
    (
        "proxy-database-secret",
        "services:\n  proxy:\n    secrets: [postgres_password]\n",
        "proxy: receives the secret postgres_password, which it does not read",
    ),
]


@pytest.mark.parametrize(("override", "reason"), [c[1:] for c in SWARM_CASES], ids=[c[0] for c in SWARM_CASES])
def test_stack_override_weakened_fails(swarm_project: Path, override: str, reason: str) -> None:
    """stack.yaml with a weakened stack.override.yaml, as `docker stack config` merges them."""
    verify = rendered_verify(swarm_project)
    clean = stack_config(swarm_project, "stack.yaml")
    assert verify.stack_config_problems(clean) == []
    (swarm_project / "weakened.yaml").write_text(override)
    found = verify.stack_config_problems(stack_config(swarm_project, "stack.yaml", "weakened.yaml"))
    assert reason in found, found


def stack_config(project: Path, *files: str) -> dict:
    environment = {**os.environ, "REGISTRY": "registry.example.org:5000/team", "IMAGE_TAG": "1.0.0"}
    command = ["docker", "stack", "config", *(arg for f in files for arg in ("-c", f))]
    result = subprocess.run(command, cwd=project, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize(
    "data",
    [
        {"proxy_mode": "nginx-certbot", "services": ["postgres", "redis"]},
        {"proxy_mode": "nginx-certbot", "frontend": "spa", "services": ["postgres"]},
    ],
    ids=["proxy", "proxy-spa"],
)
@pytest.mark.parametrize("service", ["proxy", "certbot"])
def test_edge_service_given_a_database_secret_fails(tmp_path: Path, data: dict, service: str) -> None:
    """`make config`'s check on a compose.override.yaml that hands the self-hosted proxy (or
    certbot) the database superuser's password."""
    project = render(tmp_path / "p", project_name="Verify Demo", **data)
    verify = rendered_verify(project)
    model = compose_model(project, "compose.yaml")
    assert verify.config_problems(model, test=False) == []
    model["services"][service]["secrets"] = [{"source": "postgres_password", "target": "/run/secrets/postgres_password"}]
    assert verify.config_problems(model, test=False) == [
        f"{service}: receives the secret postgres_password, which it does not read"
    ]


@pytest.mark.boot
@pytest.mark.xdist_group("docker")
def test_running_engine_refuses_sysctls_and_a_volume_binding_the_host(engine: Engine, project: Path) -> None:
    """`make test-verify` on a real engine: a container of the project started with a sysctl, and
    one mounting a named volume whose driver options bind the host's /, fail with their reasons."""
    project_name = compose_model(project, "compose.test.yaml")["name"]
    labels = ["--label", f"com.docker.compose.project={project_name}"]
    engine.docker(
        "volume", "create", "--driver", "local", "--opt", "type=none", "--opt", "o=bind", "--opt", "device=/", "hostroot"
    )
    sysctl = ["--sysctl", "net.ipv4.ip_forward=1"]
    try:
        engine.docker(
            "create", "--name", "sysctl", *labels, "--label", "com.docker.compose.service=sysctl", *sysctl, BASE_IMAGE, "true"
        )
        engine.docker("create", "--name", "hostroot", *labels, "--label", "com.docker.compose.service=hostroot",
                      "--volume", "hostroot:/host:ro", BASE_IMAGE, "true")  # fmt: skip
        result = subprocess.run(
            ["python3", "scripts/verify.py", "--test"], cwd=project, env=engine.env, capture_output=True, text=True
        )
    finally:
        engine.docker("rm", "--force", "sysctl", "hostroot", check=False)
        engine.docker("volume", "rm", "hostroot", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "    - sets kernel parameters (sysctls ['net.ipv4.ip_forward'])" in lines, result.stdout
    assert "    - bind-mounts the host's / (volume hostroot)" in lines, result.stdout
