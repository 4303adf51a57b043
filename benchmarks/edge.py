"""Benchmark: the generated edge against references, on 127.0.0.1, in one run.

Real programs throughout: Debian's nginx runs the rendered configurations (the SPA's nginx and the
self-hosted TLS proxy, staged and started through their images' entrypoints as the tests do them),
uvicorn runs the skeleton app with the backend image's command, and a stock nginx (the semantics
of Debian's default /etc/nginx/nginx.conf and site) serves the same built files. wrk loads the
static files; h2load (nghttp2) loads /api/health over HTTP/1.1 and HTTP/2, at full speed and at a
fixed rate with per-request timings; TLS handshakes are timed from Python's ssl module.

Every comparison is measured in the same run, its two sides alternated (A/B, then B/A), and
printed as the median over the rounds. Every server gets all CPUs of this machine (outside a
container there is no CPU limit to size them by). The rate limit on /api is raised far above
what the run sends (the benchmark measures the edge, not the limiter) and every 429 is counted.
A benchmark, not a test: it prints figures and asserts nothing about time.
Usage: python3 benchmarks/edge.py [--quick]   (--quick: one short round, for the smoke test)
"""

import argparse
import os
import platform
import random
import re
import shutil
import socket
import ssl
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import Processes, as_unprivileged, free_port, http_status, wait_ready, writable_by_server

from conftest import backend_command, render
from nginx_stage import build_spa, stage, stage_entrypoint

DOMAIN = "edge.example.test"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/bin"
STATIC_CONNECTIONS = 32
API_CONNECTIONS = 32
FIXED_RATE_CLIENTS = 4
FIXED_RATE = 200  # requests per second in total, spread over FIXED_RATE_CLIENTS connections
NO_LIMIT = "1000000"  # API_RATE_LIMIT for the run: far above anything it sends
# The labels of every figure line, in print order (tests/test_e2e_benchmark_edge.py checks them).
LABELS = (
    "static main.js",
    "static style.css",
    "static index.html",
    "api latency direct",
    "api latency spa-nginx",
    "api latency proxy-tls-h1",
    "api latency proxy-tls-h2",
    "api throughput direct",
    "api throughput spa-nginx",
    "api throughput proxy-tls-h1",
    "api throughput proxy-tls-h2",
    "tls handshakes TLSv1.3",
    "tls handshakes TLSv1.2",
    "rate limit",
)


@dataclass
class Settings:
    rounds: int
    seconds: int  # per load run


# Built files shaped like a real SPA's: a minified JS bundle (~280 KB, gzip -9 about 3.4x) and a
# stylesheet (~52 KB), made from a fixed seed so every run serves the same bytes.
def synthetic_js(size: int, rng: random.Random) -> str:
    names = ["".join(rng.choice(string.ascii_letters) for _ in range(rng.choice((1, 1, 2, 2, 3, 5, 8)))) for _ in range(600)]
    words = ["function", "return ", "const ", "let ", "if", "else ", "for", "new ", "this", "null", "void 0", "typeof ",
             "===", "!==", "&&", "||", "=>", ".prototype", ".length", ".push", ".call", "Object", "Array", "Promise",
             ".then", "createElement", "props", "children", "default", "exports", "undefined", "Symbol.iterator"]  # fmt: skip
    punctuation = ["(", ")", "{", "}", ",", ";", ".", "=", ":", "?", "[", "]", "+", "!", " "]

    def phrase() -> str:
        tokens = (
            rng.choice(names) if rng.random() < 0.45 else rng.choice(words) + rng.choice(punctuation)
            for _ in range(rng.randint(3, 12))
        )
        return "".join(tokens)

    phrases = [phrase() for _ in range(1500)]
    weights = [1 / (i + 1) ** 0.4 for i in range(len(phrases))]
    out: list[str] = []
    while sum(map(len, out)) < size:
        prefix = rng.choice(names) + rng.choice(punctuation) if rng.random() < 0.9 else ""
        out.append(prefix + rng.choices(phrases, weights)[0])
    return "".join(out)[:size]


def synthetic_css(size: int, rng: random.Random) -> str:
    properties = ["display:flex", "margin:0", "padding:0 8px", "color:#1f2328", "background:#fff", "border:1px solid #d0d7de",
                  "font-size:14px", "line-height:1.5", "position:relative", "width:100%", "align-items:center",
                  "border-radius:6px", "transition:color .2s ease", "z-index:10", "overflow:hidden",
                  "grid-template-columns:repeat(3,1fr)", "justify-content:space-between"]  # fmt: skip
    out: list[str] = []
    while sum(map(len, out)) < size:
        selector = "." + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))
        selector += rng.choice(["", ":hover", ">div", " .btn", "__item", "--active"])
        out.append(selector + "{" + ";".join(rng.sample(properties, rng.randint(2, 6))) + "}")
    return "".join(out)[:size]


def add_bundles(project: Path) -> None:
    """The skeleton SPA's sources replaced by a real application's sizes (build.mjs hashes them)."""
    rng = random.Random(20261124)
    src = project / "frontend" / "src"
    (src / "main.js").write_text(synthetic_js(280_000, rng))
    (src / "style.css").write_text(synthetic_css(52_000, rng))


# Servers.


def stock_nginx_conf(root: Path, html: Path, port: int) -> Path:
    """Debian's default nginx.conf and default site, as far as they decide what is measured here:
    workers "auto", sendfile, tcp_nopush, `gzip on` with no gzip_types (so text/html only, at level
    1), access log to a file, try_files. Only paths (pid, logs, temp) move under root so that
    it runs as an unprivileged user."""
    conf = root / "nginx.conf"
    temp = "\n".join(f"    {kind}_temp_path {root}/{kind}_temp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{
    worker_connections 768;
}}
http {{
    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {root}/access.log;
    gzip on;
{temp}
    server {{
        listen 127.0.0.1:{port} default_server;
        root {html};
        index index.html index.htm index.nginx-debian.html;
        server_name _;
        location / {{
            try_files $uri $uri/ =404;
        }}
    }}
}}
""")
    return conf


def ecdsa_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for DOMAIN (the key type certbot issues by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / "privkey.pem", directory / "fullchain.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", f"/CN={DOMAIN}", "-addext", f"subjectAltName=DNS:{DOMAIN}",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)  # fmt: skip
    return cert, key


def tls_context(ca: Path, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if version:
        context.minimum_version = context.maximum_version = version
    return context


def https_health(port: int, ca: Path) -> bool:
    raw = socket.create_connection(("127.0.0.1", port), timeout=2)
    with tls_context(ca).wrap_socket(raw, server_hostname=DOMAIN) as tls:
        tls.sendall(f"GET /health HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        return tls.recv(64).startswith(b"HTTP/1.1 200")


@dataclass
class Edge:
    backend: int
    spa: int
    stock: int
    proxy: int  # TLS
    ca: Path
    html: Path


def start_nginx_image(
    processes: Processes, project: Path, image: str, root: Path, upstreams: dict, ports: dict
) -> subprocess.Popen:
    """The rendered image's nginx, through its entrypoint, as an unprivileged user."""
    conf = stage(project, image, root, upstreams=upstreams, ports=ports)
    entrypoint, env = stage_entrypoint(project, image, root)
    cgroup = root / "cgroup"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("max 100000\n")  # no CPU limit: a worker per CPU
    env |= {"PATH": SYSTEM_PATH, "CGROUP_DIR": str(cgroup), "API_RATE_LIMIT": NO_LIMIT, "API_RATE_BURST": NO_LIMIT}
    writable_by_server(root / "tmp")
    command = as_unprivileged(["sh", entrypoint, "nginx", "-e", "stderr", "-c", conf, "-g", "daemon off;"])
    return processes.start(command, root / "nginx.log", env=env)


def start_edge(processes: Processes, work: Path) -> Edge:
    project = render(work / "project", frontend="spa", proxy_mode="nginx-certbot", services=[], domain=DOMAIN)
    add_bundles(project)
    dist = build_spa(project)

    backend = free_port()
    cgroup = work / "backend-cgroup"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("max 100000\n")
    env = {**os.environ, "APP_ENV": "production", "APP_MODULE": "app.main:app", "CGROUP_DIR": str(cgroup)}
    env.pop("WEB_CONCURRENCY", None)
    uvicorn = processes.start(backend_command(project, backend), work / "uvicorn.log", cwd=project / "backend", env=env)
    wait_ready(uvicorn, lambda: http_status(backend, "/api/health") == 200)

    spa, stock, proxy = free_port(), free_port(), free_port()
    front = work / "front"
    html = front / "usr/share/nginx/html"
    shutil.copytree(dist, html)
    spa_server = start_nginx_image(processes, project, "frontend", front, {"backend": f"127.0.0.1:{backend}"}, {8080: spa})
    wait_ready(spa_server, lambda: http_status(spa, "/health") == 200)

    stock_root = writable_by_server(work / "stock")
    stock_html = work / "stock-html"
    shutil.copytree(dist, stock_html, ignore=shutil.ignore_patterns("*.gz"))  # a stock build has no gzip copies
    conf = stock_nginx_conf(stock_root, stock_html, stock)
    command = as_unprivileged(["nginx", "-e", "stderr", "-c", conf, "-g", "daemon off;"])
    stock_server = processes.start(command, stock_root / "nginx.log")
    wait_ready(stock_server, lambda: http_status(stock, "/") == 200)

    edge = work / "edge"
    upstreams = {"backend": f"127.0.0.1:{backend}", "frontend": f"127.0.0.1:{spa}"}
    ca, _ = ecdsa_certificate(edge / "etc/tls")
    writable_by_server(edge / "etc/tls")
    (edge / "etc/tls/privkey.pem").chmod(0o600)
    proxy_server = start_nginx_image(processes, project, "proxy", edge, upstreams, {8080: free_port(), 8443: proxy})
    wait_ready(proxy_server, lambda: https_health(proxy, ca))
    return Edge(backend, spa, stock, proxy, ca, html)


# Load generators and what they report.


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@dataclass
class Load:
    rate: float  # requests per second
    refused: int  # 429 answers
    other_errors: int  # other non-2xx answers, failed or errored requests
    latencies: list[float]  # seconds, fixed-rate runs only


def wrk(url: str, seconds: int) -> Load:
    out = run(["wrk", "-t2", f"-c{STATIC_CONNECTIONS}", f"-d{seconds}s", "-H", "Accept-Encoding: gzip", url])
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = sum(map(int, re.findall(r"(?:connect|read|write|timeout) (\d+)", out)))
    return Load(rate, 0, (int(errors[1]) if errors else 0) + socket_errors, [])


def h2load(url: str, seconds: int, h2: bool, connections: int, rps: int | None = None, log: Path | None = None) -> Load:
    command = ["h2load", f"-c{connections}", "-m1", f"-D{seconds}", f"--threads={min(2, connections)}"]
    command += [] if h2 else ["--h1"]
    command += [f"--rps={rps}"] if rps else []
    command += [f"--log-file={log}"] if log else []
    if url.startswith("https://"):
        command += [f"--connect-to=127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}"]
    out = run([*command, url])
    rate = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)[1])
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    failed = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    latencies = []
    if log:
        latencies = [int(line.split("\t")[2]) / 1e6 for line in log.read_text().splitlines() if line.split("\t")[1] == "200"]
        log.unlink()
    # h2load counts 4xx together: on /api/health here they can only be the rate limit's 429.
    return Load(rate, int(codes[3]), int(codes[2]) + int(codes[4]) + int(failed[1]) + int(failed[2]), latencies)


def wire_bytes(port: int, path: str) -> int:
    """Bytes of one complete response (status line, headers, body) to a gzip-accepting GET."""
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request.encode())
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return len(received)


def handshakes(port: int, ca: Path, version: ssl.TLSVersion, resume: bool, seconds: float) -> tuple[float, float]:
    """TLS connections per second from one client, each with one small request, full handshakes
    or resuming the previous session; and the share of connections that really resumed."""
    context = tls_context(ca, version)
    session, count, resumed = None, 0, 0
    request = f"GET /health HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode()
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as browsers: no Nagle delay between flights
        with context.wrap_socket(raw, server_hostname=DOMAIN, session=session if resume else None) as tls:
            tls.sendall(request)
            while tls.recv(4096):  # read to the end: a TLS 1.3 session ticket arrives after the handshake
                pass
            resumed += tls.session_reused
            session = tls.session
        count += 1
    return count / (time.perf_counter() - start), resumed / count


# The run.


def alternated(rounds: int, sides: dict[str, Callable[[], object]]) -> dict[str, list]:
    """Each side measured once per round, in an order that rotates from round to round."""
    names, results = list(sides), {name: [] for name in sides}
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(sides[name]())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    uvicorn = subprocess.run(["uvicorn", "--version"], capture_output=True, text=True).stdout.split()[2]
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}; nginx {nginx}, "
            f"uvicorn {uvicorn} ({loop}), wrk and h2load on the same CPUs")  # fmt: skip


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of 1 s runs (smoke test)")
    settings = Settings(1, 1) if parser.parse_args().quick else Settings(3, 3)
    for tool in ("nginx", "wrk", "h2load", "openssl"):
        if not shutil.which(tool, path=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}"):
            sys.exit(f"edge.py: {tool} is missing (tests/run.sh installs it)")
    processes = Processes()
    work = Path(tempfile.mkdtemp(prefix="hc-edge-bench-"))
    work.chmod(0o755)
    try:
        edge = start_edge(processes, work)
        print(f"edge benchmark: {machine()}")
        print(f"{settings.rounds} rounds of {settings.seconds} s runs per figure, sides alternated, medians")
        measure(edge, settings)
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


class Counter:
    """429s and other errors seen by every load run."""

    def __init__(self) -> None:
        self.refused = self.errors = 0

    def __call__(self, load: Load) -> Load:
        self.refused += load.refused
        self.errors += load.other_errors
        return load


def measure_static(edge: Edge, settings: Settings, count: Counter) -> None:
    print(f"\nstatic files, Accept-Encoding: gzip, wrk {STATIC_CONNECTIONS} connections: rendered SPA nginx "
          "(build-time gzip copies) vs stock Debian nginx (default configuration) serving the same build")  # fmt: skip
    assets = edge.html / "assets"
    files = [next(assets.glob("main.*.js")), next(assets.glob("style.*.css")), edge.html / "index.html"]
    servers = {"spa": edge.spa, "stock": edge.stock}
    for file in files:
        path = "/" + str(file.relative_to(edge.html))

        def run_wrk(port: int, path: str = path) -> Load:
            return count(wrk(f"http://127.0.0.1:{port}{path}", settings.seconds))

        loads = alternated(settings.rounds, {side: lambda p=port: run_wrk(p) for side, port in servers.items()})
        rate = {side: median([load.rate for load in results]) for side, results in loads.items()}
        size = {side: wire_bytes(port, path) for side, port in servers.items()}
        name = re.sub(r"\.[0-9a-f]{12}\.", ".", file.name)  # without the content hash
        print(f"  static {name:<10} {file.stat().st_size / 1000:6.1f} KB: {rate['spa']:8.0f} vs {rate['stock']:8.0f} req/s "
              f"= {rate['spa'] / rate['stock']:5.2f}x;  {size['spa']:7d} vs {size['stock']:7d} B on the wire "
              f"= {size['spa'] / size['stock']:5.2f}x")  # fmt: skip


def measure_api(edge: Edge, settings: Settings, count: Counter) -> None:
    targets = {
        "direct": (f"http://127.0.0.1:{edge.backend}/api/health", False),
        "spa-nginx": (f"http://127.0.0.1:{edge.spa}/api/health", False),
        "proxy-tls-h1": (f"https://{DOMAIN}:{edge.proxy}/api/health", False),
        "proxy-tls-h2": (f"https://{DOMAIN}:{edge.proxy}/api/health", True),
    }
    log = Path(tempfile.mkdtemp(prefix="hc-edge-h2load-")) / "requests.log"

    def fixed_rate(url: str, h2: bool) -> Load:
        return count(h2load(url, settings.seconds, h2, FIXED_RATE_CLIENTS, FIXED_RATE // FIXED_RATE_CLIENTS, log))

    def full_speed(url: str, h2: bool) -> Load:
        return count(h2load(url, settings.seconds, h2, API_CONNECTIONS))

    print(f"\n/api/health at a fixed {FIXED_RATE} req/s ({FIXED_RATE_CLIENTS} connections, h2load): latency through "
          "the edge vs uvicorn direct (the backend image's command), and what the edge adds")  # fmt: skip
    fixed = alternated(settings.rounds, {name: lambda t=target: fixed_rate(*t) for name, target in targets.items()})
    shutil.rmtree(log.parent)
    p50 = {name: median([percentile(load.latencies, 0.50) for load in loads]) * 1000 for name, loads in fixed.items()}
    p99 = {name: median([percentile(load.latencies, 0.99) for load in loads]) * 1000 for name, loads in fixed.items()}
    measured = median([len(load.latencies) for load in fixed["direct"]])
    direct = f"p50 {p50['direct']:6.2f} ms   p99 {p99['direct']:6.2f} ms"
    print(f"  api latency direct           {direct}   ({measured} requests a run)")
    for name in list(targets)[1:]:
        added = f"added: p50 {p50[name] - p50['direct']:+6.2f} ms   p99 {p99[name] - p99['direct']:+6.2f} ms"
        print(f"  api latency {name:<16} p50 {p50[name]:6.2f} ms   p99 {p99[name]:6.2f} ms   {added}")

    print(f"\n/api/health at full speed ({API_CONNECTIONS} connections, h2load; HTTP/2 with one stream per "
          "connection): throughput vs uvicorn direct")  # fmt: skip
    full = alternated(settings.rounds, {name: lambda t=target: full_speed(*t) for name, target in targets.items()})
    rate = {name: median([load.rate for load in loads]) for name, loads in full.items()}
    print(f"  api throughput direct        {rate['direct']:8.0f} req/s")
    for name in list(targets)[1:]:
        print(f"  api throughput {name:<13} {rate[name]:8.0f} req/s = {rate[name] / rate['direct']:5.2f}x direct")


def measure_tls(edge: Edge, settings: Settings) -> None:
    print("\nTLS handshakes per second, one client, each connection with one small request: full vs resumed session")
    for label, version in (("TLSv1.3", ssl.TLSVersion.TLSv1_3), ("TLSv1.2", ssl.TLSVersion.TLSv1_2)):

        def connect(resume: bool, version: ssl.TLSVersion = version) -> tuple[float, float]:
            return handshakes(edge.proxy, edge.ca, version, resume, settings.seconds)

        timed = alternated(settings.rounds, {resume: lambda r=resume: connect(r) for resume in (False, True)})
        full = median([rate for rate, _ in timed[False]])
        resumed = median([rate for rate, _ in timed[True]])
        share = min(share for _, share in timed[True])
        print(f"  tls handshakes {label}: full {full:6.0f}/s, resumed {resumed:6.0f}/s = {resumed / full:4.2f}x; "
              f"sessions resumed: {share:.0%}")  # fmt: skip


def measure(edge: Edge, settings: Settings) -> None:
    count = Counter()
    measure_static(edge, settings, count)
    measure_api(edge, settings, count)
    measure_tls(edge, settings)
    print(f"\n  rate limit (API_RATE_LIMIT={NO_LIMIT} for the run): {count.refused} answers 429, {count.errors} other errors")


if __name__ == "__main__":
    main()
