"""The rendered SPA nginx, run for real as a non-root user: what a browser and NPM would see."""

import gzip
import http.client
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import (
    AS_ROOT,
    NOBODY,
    Processes,
    as_unprivileged,
    free_port,
    http_status,
    server_root,
    wait_ready,
    wait_until,
    writable_by_server,
)
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import compose_model, render
from nginx_stage import build_spa, stage, stage_entrypoint

pytestmark = pytest.mark.e2e

SECURITY_HEADERS = (
    "content-security-policy",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "permissions-policy",
    "cross-origin-opener-policy",
)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    header_list: list[tuple[str, str]]  # every header line as received, repeats included

    def repeated_headers(self) -> list[str]:
        names = [name.lower() for name, _ in self.header_list]
        return sorted({name for name in names if names.count(name) > 1})


def fetch(
    port: int, path: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None, source: str = "127.0.0.1"
) -> Response:
    """One request on a new connection from the loopback address source (any of 127.0.0.0/8)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    pairs = response.getheaders()
    result = Response(response.status, {k.lower(): v for k, v in pairs}, response.read(), pairs)
    conn.close()
    return result


def start_backend(processes: Processes, logs: Path, project: Path) -> int:
    """The stand-in app under uvicorn as the backend image runs it: --proxy-headers, believing
    only the proxies the project's Compose file names (FORWARDED_ALLOW_IPS)."""
    port = free_port()
    here = Path(__file__).resolve().parent
    trusted = compose_model(project, "compose.yaml")["services"]["backend"]["environment"]["FORWARDED_ALLOW_IPS"]
    process = processes.start(
        [
            "python3",
            "-m",
            "uvicorn",
            "standin_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "off",
            "--proxy-headers",
        ],
        logs / "backend.log",
        cwd=here,
        env={**os.environ, "FORWARDED_ALLOW_IPS": trusted},
    )
    wait_ready(process, lambda: http_status(port, "/api/echo") == 200)
    return port


def start_nginx(processes: Processes, root: Path, conf: Path, entrypoint: Path, env: dict[str, str], port: int) -> None:
    """The image's ENTRYPOINT (runtime config), then nginx in the foreground, as a non-root user."""
    command = as_unprivileged(["sh", entrypoint, "nginx", "-e", "stderr", "-c", conf, "-g", "daemon off;"])
    process = processes.start(command, root / "logs" / "nginx.log", env={"PATH": "/usr/sbin:/usr/bin:/bin", **env})
    wait_ready(process, lambda: http_status(port, "/health") == 200)


@dataclass
class Spa:
    port: int
    dead_backend_port: int
    root: Path
    backend_port: int


@pytest.fixture(scope="module")
def spa_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = render(tmp_path_factory.mktemp("spa") / "p", frontend="spa", proxy_mode="none", project_name="Nginx Demo")
    build_spa(project)
    return project


@pytest.fixture(scope="module")
def spa(spa_project: Path) -> Iterator[Spa]:
    project = spa_project
    processes = Processes()
    with server_root("spa") as base:
        try:
            backend = start_backend(processes, base, project)
            ports = []
            for name, upstream in (("live", f"127.0.0.1:{backend}"), ("dead", f"127.0.0.1:{free_port()}")):
                root = base / name
                port = free_port()
                conf = stage(project, "frontend", root, upstreams={"backend": upstream}, ports={8080: port})
                shutil.copytree(project / "frontend" / "dist", root / "usr/share/nginx/html", dirs_exist_ok=True)
                entrypoint, staged = stage_entrypoint(project, "frontend", root)
                writable_by_server(root / "tmp")  # the container's only writable path (tmpfs)
                writable_by_server(root / "logs")
                runtime = str(root / "tmp" / "runtime")
                env = {"RUNTIME_CONFIG_DIR": runtime, "API_BASE_URL": "/api", "WS_URL": "/ws", "APP_ENV": "e2e"}
                start_nginx(processes, root, conf, entrypoint, staged | env, port)
                ports.append(port)
            yield Spa(ports[0], ports[1], base / "live", backend)
        finally:
            processes.stop_all()


def test_nginx_serves_spa_with_cache_rules_gzip_and_health(spa: Spa) -> None:
    assert fetch(spa.port, "/health").body == b"ok\n"
    index = fetch(spa.port, "/")
    assert index.status == 200 and b"Nginx Demo" in index.body
    assert index.headers["cache-control"] == "no-cache"
    route = fetch(spa.port, "/orders/42")  # SPA route: falls back to index.html
    assert route.status == 200 and route.body == index.body and route.headers["cache-control"] == "no-cache"
    script = next(p.name for p in (spa.root / "usr/share/nginx/html/assets").glob("main.*.js"))
    asset = fetch(spa.port, f"/assets/{script}", headers={"Accept-Encoding": "gzip"})
    assert asset.status == 200
    assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert asset.headers["content-encoding"] == "gzip" and b"__APP_CONFIG__" in gzip.decompress(asset.body)
    missing = fetch(spa.port, "/assets/missing.0123456789ab.js")
    assert missing.status == 404 and "immutable" not in missing.headers.get("cache-control", "")


def test_nginx_sends_the_build_time_gzip_copies_as_they_are(spa: Spa) -> None:
    """Static files go out as the gzip copies the image's build stored beside them (gzip_static):
    the copy's exact bytes with its Content-Length and its ETag (nginx's modification time - size
    of the .gz file), so nothing is compressed per request. A client without gzip gets the file."""
    html = spa.root / "usr/share/nginx/html"
    script = next((html / "assets").glob("main.*.js"))
    for path, file in ((f"/assets/{script.name}", script), ("/", html / "index.html")):
        copy = file.with_name(file.name + ".gz")
        assert copy.is_file(), f"the build stored no gzip copy of {file.name}"
        stat = copy.stat()
        sent = fetch(spa.port, path, headers={"Accept-Encoding": "gzip"})
        assert sent.headers["content-encoding"] == "gzip" and sent.body == copy.read_bytes()
        assert sent.headers["content-length"] == str(stat.st_size)
        assert sent.headers["etag"] == f'"{int(stat.st_mtime):x}-{stat.st_size:x}"'
        assert sent.headers["vary"] == "Accept-Encoding"
        plain = fetch(spa.port, path)
        assert "content-encoding" not in plain.headers and plain.body == file.read_bytes()
    # Dynamic responses (the API's JSON) are still compressed, on the fly.
    api = fetch(spa.port, "/api/echo", headers={"Accept-Encoding": "gzip"})
    assert api.headers["content-encoding"] == "gzip" and json.loads(gzip.decompress(api.body))["path"] == "/api/echo"


@pytest.mark.parametrize(
    ("case", "method", "path", "body", "status"),
    [
        ("ok", "GET", "/", None, 200),
        ("directory redirect", "GET", "/assets", None, 301),
        ("not found", "GET", "/assets/nope.js", None, 404),
        ("body too large", "POST", "/api/upload", b"x" * (10 * 1024 * 1024 + 1), 413),
        ("backend down", "GET", "/api/items", None, 502),
    ],
)
def test_nginx_security_headers_on_every_status(
    spa: Spa, case: str, method: str, path: str, body: bytes | None, status: int
) -> None:
    port = spa.dead_backend_port if case == "backend down" else spa.port
    response = fetch(port, path, method=method, body=body)
    assert response.status == status
    missing = [h for h in SECURITY_HEADERS if h not in response.headers]
    assert not missing, f"{case}: {missing} missing"
    assert response.headers["server"] == "nginx", "no version in Server"
    assert "x-xss-protection" not in response.headers
    assert "strict-transport-security" not in response.headers, "plain HTTP: no HSTS"


def test_nginx_directory_redirect_is_relative(spa: Spa) -> None:
    """Behind TLS on 443, an absolute redirect would name http:// and the container port 8080."""
    redirect = fetch(spa.port, "/assets", headers={"Host": "app.example.org", "X-Forwarded-Proto": "https"})
    assert redirect.status == 301 and redirect.headers["location"] == "/assets/"


def test_nginx_runtime_config_is_written_at_start_and_not_cached(spa: Spa) -> None:
    config = fetch(spa.port, "/config.js")
    assert config.status == 200 and config.headers["cache-control"] == "no-store"
    assert b'"environment": "e2e"' in config.body and b'"apiBaseUrl": "/api"' in config.body
    # Written into the tmpfs at start, never into the web root.
    assert (spa.root / "tmp" / "runtime" / "config.js").is_file()
    assert not (spa.root / "usr/share/nginx/html/config.js").exists()


def test_nginx_forwards_api_with_forwarded_headers_and_hsts_behind_tls(spa: Spa) -> None:
    plain = fetch(spa.port, "/api/echo", headers={"Host": "app.example.org"})
    seen = json.loads(plain.body)
    assert seen["path"] == "/api/echo" and seen["headers"]["host"] == "app.example.org"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["headers"]["x-forwarded-proto"] == "http" and seen["headers"]["x-real-ip"] == "127.0.0.1"
    assert plain.headers["cache-control"] == "no-store"
    # Behind Nginx Proxy Manager: TLS ended there and the scheme is passed on.
    behind = fetch(spa.port, "/api/echo", headers={"X-Forwarded-Proto": "https"})
    assert json.loads(behind.body)["headers"]["x-forwarded-proto"] == "https"
    assert behind.headers["strict-transport-security"].startswith("max-age=63072000")


def test_clients_cannot_choose_the_address_the_backend_sees(spa: Spa) -> None:
    """A client claiming another address (X-Forwarded-For, X-Real-IP) from outside the Docker
    networks: the SPA nginx passes on the address it really sees, and uvicorn believes no one
    but the proxies in front of it, so the backend sees the client as it is."""
    forged = {"X-Forwarded-For": "203.0.113.66", "X-Real-IP": "203.0.113.66"}
    seen = json.loads(fetch(spa.port, "/api/echo", headers=forged).body)
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1" and seen["headers"]["x-real-ip"] == "127.0.0.1"
    assert seen["client"] == "127.0.0.1"
    # Straight to uvicorn (as a published API-only backend would be reached): not believed either.
    assert json.loads(fetch(spa.backend_port, "/api/echo", headers=forged).body)["client"] == "127.0.0.1"


def test_nginx_upgrades_websockets_to_the_backend(spa: Spa) -> None:
    with connect(f"ws://127.0.0.1:{spa.port}/ws", open_timeout=10) as socket:
        socket.send("hello")
        assert socket.recv(timeout=10) == "echo: hello"


def test_nginx_runs_without_root(spa: Spa) -> None:
    pid = int((spa.root / "tmp" / "nginx.pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid == (NOBODY if AS_ROOT else os.geteuid())
    # Everything it wrote is under its tmpfs path.
    written = {p.relative_to(spa.root).parts[0] for p in spa.root.rglob("*") if p.stat().st_uid == NOBODY}
    assert written <= {"tmp", "logs"}


# Fake cgroup files (CGROUP_DIR) -> how many nginx workers the entrypoint must start: the CPU
# limit rounded up, never more than the CPUs this process may use, one when no limit is readable.
USABLE_CPUS = len(os.sched_getaffinity(0))
CPU_LIMITS = {
    "v2-half-a-cpu": ({"cpu.max": "50000 100000\n"}, 1),
    "v2-one-and-a-half": ({"cpu.max": "150000 100000\n"}, min(2, USABLE_CPUS)),
    "v2-more-than-usable": ({"cpu.max": f"{(USABLE_CPUS + 2) * 100000} 100000\n"}, USABLE_CPUS),
    "v2-unlimited": ({"cpu.max": "max 100000\n"}, USABLE_CPUS),
    "v1-two-cpus": ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, min(2, USABLE_CPUS)),
    "v1-one-cpu": ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    "v1-unlimited": ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, USABLE_CPUS),
    "no-cgroup-files": ({}, 1),
}


def worker_pids(master: int) -> list[int]:
    """nginx worker processes whose parent is this master."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == master and cmdline.startswith(b"nginx: worker process"):
            pids.append(int(stat.parent.name))
    return pids


def open_files_limit(pid: int) -> tuple[int, int]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


@pytest.mark.parametrize("name", CPU_LIMITS)
def test_nginx_workers_follow_the_container_cpu_and_file_limits(spa_project: Path, name: str) -> None:
    """The real entrypoint computes worker_processes from (fake) cgroup files; the real nginx
    includes it and starts that many workers, each with the container's nofile soft limit."""
    files, expected = CPU_LIMITS[name]
    ulimit = compose_model(spa_project, "compose.yaml")["services"]["frontend"]["ulimits"]["nofile"]
    processes = Processes()
    with server_root("workers") as root:
        try:
            for relative, content in files.items():
                (root / "cgroup" / relative).parent.mkdir(parents=True, exist_ok=True)
                (root / "cgroup" / relative).write_text(content)
            port = free_port()
            conf = stage(spa_project, "frontend", root, upstreams={"backend": f"127.0.0.1:{free_port()}"}, ports={8080: port})
            writable_by_server(root / "tmp")
            writable_by_server(root / "logs")
            entrypoint, staged = stage_entrypoint(spa_project, "frontend", root)
            env = {"CGROUP_DIR": str(root / "cgroup"), "RUNTIME_CONFIG_DIR": str(root / "tmp" / "runtime")}
            start_nginx(processes, root, conf, entrypoint, staged | env, port)

            # nginx -t as the server's user, its output in a file that user owns (nginx reopens /dev/stderr).
            report = root / "logs" / "nginx-t.log"
            report.touch()
            writable_by_server(root / "logs")
            with report.open("w") as out:
                test = as_unprivileged(["nginx", "-t", "-e", "/dev/stderr", "-c", conf])
                checked = subprocess.run(test, stdout=out, stderr=out)
            assert checked.returncode == 0, report.read_text()
            master = int((root / "tmp" / "nginx.pid").read_text())
            workers = wait_until(lambda: len(found := worker_pids(master)) == expected and found, timeout=10)
            assert workers, f"{len(worker_pids(master))} workers started, {expected} wanted"
            assert all(open_files_limit(pid) == (ulimit["soft"], ulimit["soft"]) for pid in workers)
            assert (root / "tmp/nginx/workers.conf").read_text() == f"worker_processes {expected};\n"
            connections = re.search(r"worker_connections (\d+);", conf.read_text())
            assert connections and 2 * int(connections[1]) <= ulimit["soft"] <= ulimit["hard"]
        finally:
            processes.stop_all()


@pytest.fixture(scope="module")
def proxy_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("proxy") / "p", proxy_mode="nginx-certbot", frontend="none")


@pytest.mark.parametrize("image", ["frontend", "proxy"])
def test_api_rate_limit_answers_429_per_client_address(
    spa_project: Path, proxy_project: Path, image: str, tmp_path: Path
) -> None:
    """The nginx that sees the client's address (the SPA's, or the self-hosted proxy, here in its
    local-test HTTP mode) limits /api and /ws handshakes per address at the rate the operator set
    in .env (API_RATE_LIMIT, API_RATE_BURST): a client beyond it gets 429, with the security
    headers, while another address is served."""
    project = spa_project if image == "frontend" else proxy_project
    processes = Processes()
    with server_root("rate") as root:
        try:
            backend = start_backend(processes, root, project)
            port = free_port()
            conf = stage(project, image, root, upstreams={"backend": f"127.0.0.1:{backend}"}, ports={8080: port})
            entrypoint, env = stage_entrypoint(project, image, root)
            writable_by_server(root / "tmp")
            writable_by_server(root / "logs")
            env |= {"API_RATE_LIMIT": "1", "API_RATE_BURST": "5", "PROXY_HTTP_ONLY": "1"}
            start_nginx(processes, root, conf, entrypoint, env, port)

            statuses = [fetch(port, "/api/echo").status for _ in range(15)]
            # The burst (5) above the first request passes at once; then one per second.
            assert statuses[:6] == [200] * 6 and statuses.count(429) >= 8, statuses
            refused = fetch(port, "/api/echo")
            assert refused.status == 429 and all(h in refused.headers for h in SECURITY_HEADERS)
            with pytest.raises(InvalidStatus) as handshake:
                connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10)
            assert handshake.value.response.status_code == 429
            # Another client address is not affected.
            assert [fetch(port, "/api/echo", source="127.0.0.2").status for _ in range(5)] == [200] * 5
            assert json.loads(fetch(port, "/api/echo", source="127.0.0.3").body)["headers"]["x-real-ip"] == "127.0.0.3"
        finally:
            processes.stop_all()


def test_rate_limit_covers_every_backend_route_behind_the_proxy(proxy_project: Path) -> None:
    """API-only (and existing-app) projects behind the self-hosted proxy: `location /` forwards to
    the backend too, so a login route outside /api/ is throttled like /api/ itself."""
    processes = Processes()
    with server_root("rate-root") as root:
        try:
            backend = start_backend(processes, root, proxy_project)
            port = free_port()
            conf = stage(proxy_project, "proxy", root, upstreams={"backend": f"127.0.0.1:{backend}"}, ports={8080: port})
            entrypoint, env = stage_entrypoint(proxy_project, "proxy", root)
            writable_by_server(root / "tmp")
            writable_by_server(root / "logs")
            env |= {"API_RATE_LIMIT": "1", "API_RATE_BURST": "5", "PROXY_HTTP_ONLY": "1"}
            start_nginx(processes, root, conf, entrypoint, env, port)

            statuses = [fetch(port, "/login", method="POST", body=b"user=a&password=b").status for _ in range(15)]
            assert statuses[:6] == [200] * 6 and statuses.count(429) >= 8, statuses
            # One budget per client for every backend route: /api/ is refused too now.
            assert fetch(port, "/api/echo").status == 429
            assert fetch(port, "/login", source="127.0.0.2").status == 200
        finally:
            processes.stop_all()


def hold_slow_uploads(port: int, source: str, count: int) -> list[socket.socket]:
    """count connections from source, each with a complete request header announcing a large body
    and only a few bytes of it: requests nginx must keep open, waiting for the rest."""
    held = []
    for _ in range(count):
        conn = socket.socket()
        conn.settimeout(5)
        conn.bind((source, 0))
        try:
            conn.connect(("127.0.0.1", port))
            conn.sendall(b"POST /api/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\nxxxx")
        except OSError:
            conn.close()
            continue
        held.append(conn)
    return held


def settled_answers(connections: list[socket.socket], quiet: float = 1.0, timeout: float = 15.0) -> dict[int, bytes]:
    """What nginx answered on these connections (by index), once nothing more has come for quiet
    seconds: it has worked through every connection waiting in its listen queue."""
    answered: dict[int, bytes] = {}
    deadline, last_change = time.monotonic() + timeout, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last_change < quiet:
        waiting = [conn for i, conn in enumerate(connections) if i not in answered]
        readable, _, _ = select.select(waiting, [], [], 0.1) if waiting else ([], [], [])
        for conn in readable:
            try:
                answered[connections.index(conn)] = conn.recv(4096)
            except ConnectionResetError:  # closed with the rest of the upload unread
                answered[connections.index(conn)] = b"reset"
            last_change = time.monotonic()
    return answered


def entrypoint_settings(project: Path) -> Path:
    """The rendered nginx/runtime-settings.sh: where the per-client limits' defaults are written."""
    return project / "nginx" / "runtime-settings.sh"


@pytest.mark.parametrize("image", ["frontend", "proxy"])
def test_one_address_holding_slow_requests_does_not_lock_out_another(spa_project: Path, proxy_project: Path, image: str) -> None:
    """A client (127.0.0.2) holding more slow uploads than nginx has connections gets only its
    per-address share (the limit as rendered); another client (127.0.0.3) is still served at once.
    worker_connections is scaled down (one worker) so the test needs hundreds of sockets, not
    thousands; everything else is the rendered configuration."""
    project = spa_project if image == "frontend" else proxy_project
    processes = Processes()
    held: list[socket.socket] = []
    with server_root("conn") as root:
        try:
            backend = start_backend(processes, root, project)
            port = free_port()
            conf = stage(project, image, root, upstreams={"backend": f"127.0.0.1:{backend}"}, ports={8080: port})
            conf.write_text(re.sub(r"worker_connections \d+;", "worker_connections 256;", conf.read_text()))
            (root / "cgroup").mkdir()
            (root / "cgroup" / "cpu.max").write_text("100000 100000\n")  # one worker
            entrypoint, env = stage_entrypoint(project, image, root)
            writable_by_server(root / "tmp")
            writable_by_server(root / "logs")
            # No rate limit here: what refuses 127.0.0.2's extra uploads is the connection limit alone.
            env |= {"API_RATE_LIMIT": "0", "PROXY_HTTP_ONLY": "1", "CGROUP_DIR": str(root / "cgroup")}
            env |= {"RUNTIME_CONFIG_DIR": str(root / "tmp" / "runtime")}
            start_nginx(processes, root, conf, entrypoint, env, port)

            # 127.0.0.2 opens slow uploads in waves, refilling what nginx refused or could not take.
            replies: list[bytes] = []
            for _ in range(3):
                wave = hold_slow_uploads(port, "127.0.0.2", 200)
                answered = settled_answers(wave)
                held += [conn for i, conn in enumerate(wave) if i not in answered]
                replies += answered.values()
                for i in answered:
                    wave[i].close()
            # Another client uploading on several connections at once, as a browser may: all taken.
            other = hold_slow_uploads(port, "127.0.0.3", 10)
            held += other
            assert len(other) == 10 and not settled_answers(other), "127.0.0.3's uploads were refused"
            start = time.monotonic()
            served = fetch(port, "/api/echo", source="127.0.0.3")
            assert served.status == 200 and json.loads(served.body)["headers"]["x-real-ip"] == "127.0.0.3"
            assert time.monotonic() - start < 3
            held = held[: -len(other)]
            # 127.0.0.2 keeps exactly its share; each request beyond it was refused at once.
            limit = int(re.search(r"CLIENT_CONNECTION_LIMIT:-(\d+)", entrypoint_settings(project).read_text())[1])
            assert len(held) == limit and len(replies) == 600 - limit
            # Refused (429), or closed unread while nginx was full for a moment during a wave.
            assert all(reply.startswith(b"HTTP/1.1 429 ") or reply in (b"reset", b"") for reply in replies), {
                r[:12] for r in replies
            }
        finally:
            for conn in held:
                conn.close()
            processes.stop_all()
