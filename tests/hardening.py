"""The hardening rules every generated stack must satisfy, checked on the resolved Compose model."""

from pathlib import Path

DATA_SERVICES = {"postgres", "redis"}
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")


def numeric_uid(user: str) -> int:
    uid = user.split(":")[0]
    assert uid.isdigit(), f"user {user!r} is not numeric"
    return int(uid)


def service_problems(name: str, svc: dict, secret_values: list[str]) -> list[str]:
    problems = []

    def require(condition: bool, message: str) -> None:
        if not condition:
            problems.append(f"{name}: {message}")

    require(svc.get("cap_drop") == ["ALL"], f"cap_drop is {svc.get('cap_drop')}")
    require(not svc.get("cap_add"), f"adds capabilities {svc.get('cap_add')}")
    require("no-new-privileges:true" in (svc.get("security_opt") or []), "no-new-privileges missing")
    require(svc.get("read_only") is True, "root filesystem not read-only")
    require(svc.get("init") is True, "no init")
    require(svc.get("restart") == "unless-stopped", f"restart is {svc.get('restart')}")
    require(numeric_uid(svc.get("user") or "0") != 0, f"runs as {svc.get('user') or 'root'}")
    logging = svc.get("logging") or {}
    require(logging.get("driver") == "json-file" and {"max-size", "max-file"} <= set(logging.get("options", {})), "log rotation")
    require("nofile" in (svc.get("ulimits") or {}), "no nofile ulimit")
    resources = (svc.get("deploy") or {}).get("resources") or {}
    limits, reservations = resources.get("limits") or {}, resources.get("reservations") or {}
    require(all(limits.get(k) for k in ("cpus", "memory", "pids")), f"limits incomplete: {limits}")
    require(all(reservations.get(k) for k in ("cpus", "memory")), f"reservations incomplete: {reservations}")
    test = (svc.get("healthcheck") or {}).get("test") or []
    require(bool(test) and test != ["NONE"], "no healthcheck")
    require("curl" not in " ".join(test), "healthcheck needs curl")
    for mount in svc.get("tmpfs") or []:
        options = mount.partition(":")[2].split(",")
        require({"noexec", "nosuid"} <= set(options), f"tmpfs {mount} lacks noexec/nosuid")
        require(any(o.startswith("size=") for o in options), f"tmpfs {mount} has no size")
        require(any(o.startswith("uid=") for o in options), f"tmpfs {mount} has no owner (root-owned, unwritable)")
    for dep, spec in (svc.get("depends_on") or {}).items():
        require(spec.get("condition") == "service_healthy", f"depends on {dep} without service_healthy")
    for key, value in (svc.get("environment") or {}).items():
        require(not (any(w in key for w in SECRET_WORDS) and not key.endswith("_FILE")), f"secret-like variable {key}")
        require(not any(s in str(value) for s in secret_values), f"secret value in {key}")
    if name in DATA_SERVICES:
        require(not svc.get("ports"), "data service publishes ports")
    return problems


def stack_problems(model: dict, project: Path, *, test: bool, proxy_mode: str, entry: str) -> list[str]:
    secret_values = [p.read_text().strip() for p in (project / "secrets").glob("*") if p.name != "README.md"]
    problems = []
    networks = model.get("networks") or {}
    own_images = {svc["image"] for svc in model["services"].values() if "build" in svc}
    for name, svc in model["services"].items():
        problems += service_problems(name, svc, secret_values)
        for port in svc.get("ports") or []:
            public = not test and name == "proxy" and proxy_mode == "nginx-certbot"
            if not public and port.get("host_ip") != "127.0.0.1":
                problems.append(f"{name}: port {port.get('published')} bound to {port.get('host_ip') or 'all interfaces'}")
        joined = svc.get("networks") or {}
        if name in DATA_SERVICES:
            outside = [n for n in joined if not networks[n].get("internal")]
            if outside:
                problems.append(f"{name}: on non-internal networks {outside}")
        external = [n for n in joined if networks[n].get("external")]
        if external and (test or name != entry):
            problems.append(f"{name}: joins external networks {external}")
        image = svc.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if image not in own_images and tag in ("", "latest"):
            problems.append(f"{name}: third-party image {image!r} has no fixed tag")
    if proxy_mode == "npm" and not test:
        members = [n for n, s in model["services"].items() if any(networks[x].get("external") for x in s.get("networks") or {})]
        if members != [entry]:
            problems.append(f"npm network members are {members}, expected only {entry}")
    for name, spec in (model.get("secrets") or {}).items():
        if not Path(spec["file"]).is_file():
            problems.append(f"secret {name}: file {spec['file']} missing")
    return problems
