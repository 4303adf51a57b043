"""Run rendered nginx configurations outside a container.

The one place where a rendered file is changed before a test uses it: container paths are moved
under a temporary root, upstream service names become loopback addresses, and (optionally)
listen ports become free local ports. Nothing else in the files is touched, so what nginx parses
is otherwise byte for byte what users get.
"""

import re
import shutil
from pathlib import Path

# Paths the rendered configs use inside the container, all moved under the staging root.
CONTAINER_PATHS = ("/etc/nginx", "/etc/letsencrypt", "/var/www/certbot", "/usr/share/nginx/html", "/tmp")
_PATH = re.compile(r"(?<![\w/.-])(" + "|".join(map(re.escape, CONTAINER_PATHS)) + r")(?=[/;\s\"']|$)", re.M)
_UPSTREAM_SERVER = re.compile(r"^(\s*server\s+)([a-z][a-z0-9_-]*):(\d+)(\s*;)", re.M)
_LISTEN = re.compile(r"^(\s*listen\s+)(\d+)\b", re.M)
SYSTEM_MIME_TYPES = Path("/etc/nginx/mime.types")


def substitute(text: str, root: Path, upstreams: dict[str, str], ports: dict[int, int]) -> str:
    text = _PATH.sub(lambda m: f"{root}{m.group(1)}", text)
    text = _UPSTREAM_SERVER.sub(lambda m: f"{m.group(1)}{upstreams.get(m.group(2), '127.0.0.1:9')}{m.group(4)}", text)
    return _LISTEN.sub(lambda m: f"{m.group(1)}127.0.0.1:{ports.get(int(m.group(2)), int(m.group(2)))}", text)


def stage(rendered: Path, root: Path, upstreams: dict[str, str] | None = None, ports: dict[int, int] | None = None) -> Path:
    """Copy a rendered nginx/ directory to <root>/etc/nginx with substitutions; return nginx.conf's path."""
    etc = root / "etc" / "nginx"
    shutil.copytree(rendered, etc)
    shutil.copy(SYSTEM_MIME_TYPES, etc / "mime.types")
    for path in etc.rglob("*.conf"):
        path.write_text(substitute(path.read_text(), root, upstreams or {}, ports or {}))
    for name in ("tmp", "etc/letsencrypt", "var/www/certbot", "usr/share/nginx/html", "etc/nginx/locations.d"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return etc / "nginx.conf"
