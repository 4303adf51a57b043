"""Run rendered nginx configurations outside a container.

The one place where a rendered file is changed before a test uses it: container paths are moved
under a temporary root, upstream service names become loopback addresses, and (optionally)
listen ports become free local ports. Nothing else in the files is touched, so what nginx parses
is otherwise byte for byte what users get. Which files go where under /etc/nginx is read from the
image's Dockerfile (its COPY lines), so a test sees the image's layout, not a copy of it.
"""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

# Paths the rendered configs use inside the container, all moved under the staging root.
CONTAINER_PATHS = ("/etc/nginx", "/etc/tls", "/var/www/certbot", "/usr/share/nginx/html", "/tmp")
_PATH = re.compile(r"(?<![\w/.-])(" + "|".join(map(re.escape, CONTAINER_PATHS)) + r")(?=[/;\s\"']|$)", re.M)
_UPSTREAM_SERVER = re.compile(r"^(\s*server\s+)([a-z][a-z0-9_-]*):(\d+)(\s*;)", re.M)
_LISTEN = re.compile(r"^(\s*listen\s+)(\d+)\b", re.M)
SYSTEM_MIME_TYPES = Path("/etc/nginx/mime.types")
NGINX_DIR = "/etc/nginx"


def substitute(text: str, root: Path, upstreams: dict[str, str], ports: dict[int, int]) -> str:
    text = _PATH.sub(lambda m: f"{root}{m.group(1)}", text)
    text = _UPSTREAM_SERVER.sub(lambda m: f"{m.group(1)}{upstreams.get(m.group(2), '127.0.0.1:9')}{m.group(4)}", text)
    return _LISTEN.sub(lambda m: f"{m.group(1)}127.0.0.1:{ports.get(int(m.group(2)), int(m.group(2)))}", text)


def dockerfile_copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """The Dockerfile's COPY instructions from the build context: (sources, destination)."""
    copies = []
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        if any(w.startswith("--from=") for w in words):
            continue
        *sources, destination = [w for w in words[1:] if not w.startswith("--")]
        copies.append((sources, destination))
    return copies


def nginx_copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """The Dockerfile's COPY instructions from the build context into /etc/nginx: (sources, destination)."""
    return [(sources, destination) for sources, destination in dockerfile_copies(dockerfile) if destination.startswith(NGINX_DIR)]


def install(context: Path, sources: list[str], destination: Path, into_directory: bool) -> None:
    """Docker's COPY semantics: a directory's contents merge into the destination directory; a file
    lands in it (destination ending in /) or at it."""
    for source in (context / s for s in sources):
        if source.is_dir():
            shutil.copytree(source, destination, dirs_exist_ok=True)
        else:
            target = destination / source.name if into_directory else destination
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)


def stage(
    context: Path, image: str, root: Path, upstreams: dict[str, str] | None = None, ports: dict[int, int] | None = None
) -> Path:
    """Lay out <root>/etc/nginx as <context>/<image>/Dockerfile does, with substitutions; return nginx.conf's path.

    context: the image's build context (the project root for the nginx images)."""
    etc = root / NGINX_DIR.lstrip("/")
    copies = nginx_copies(context / image / "Dockerfile")
    assert copies, f"{image}/Dockerfile copies nothing into {NGINX_DIR}"
    for sources, destination in copies:
        install(context, sources, root / destination.lstrip("/"), destination.endswith("/"))
    shutil.copy(SYSTEM_MIME_TYPES, etc / "mime.types")
    for path in etc.rglob("*.conf"):
        path.write_text(substitute(path.read_text(), root, upstreams or {}, ports or {}))
    for name in ("tmp", "etc/tls", "var/www/certbot", "usr/share/nginx/html", "etc/nginx/locations.d"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return etc / "nginx.conf"


def stage_entrypoint(context: Path, image: str, root: Path) -> tuple[Path, dict[str, str]]:
    """The image's ENTRYPOINT script copied to its place under root, and the environment that
    points every setting it defaults to a path (`${NAME:-/path}`) at the staged tree: files the
    Dockerfile copies in are copied there too, container paths are moved under root.

    context, image, root: as for stage()."""
    dockerfile = context / image / "Dockerfile"
    copied = {destination: context / sources[0] for sources, destination in dockerfile_copies(dockerfile) if len(sources) == 1}

    def staged_copy(destination: str) -> Path:
        target = root / destination.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(copied[destination], target))

    exec_form = next(line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT "))
    entrypoint = staged_copy(json.loads(exec_form.removeprefix("ENTRYPOINT "))[0])
    env = {}
    for name, path in re.findall(r"\$\{(\w+):-(/[^}]*)\}", entrypoint.read_text()):
        if path in copied:
            env[name] = str(staged_copy(path))
        elif _PATH.match(path):
            env[name] = _PATH.sub(lambda m: f"{root}{m.group(1)}", path)
    return entrypoint, env


def build_spa(project: Path) -> Path:
    """Build the SPA as its image does: the build stage's last RUN (the build, then the gzip copies)
    run in frontend/ (the stage's WORKDIR, holding what `COPY frontend/ ./` copied). Returns dist/."""
    dockerfile = (project / "frontend" / "Dockerfile").read_text()
    build_stage = dockerfile.split("\nFROM ")[1]
    command = [line for line in build_stage.splitlines() if line.startswith("RUN ")][-1].removeprefix("RUN ")
    subprocess.run(["sh", "-c", command], cwd=project / "frontend", check=True, capture_output=True)
    return project / "frontend" / "dist"
