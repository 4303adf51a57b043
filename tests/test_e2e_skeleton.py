"""The FastAPI skeleton as the backend image runs it (uvicorn), in production and test mode."""

import http.client
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import Processes, free_port, http_status, server_root, wait_ready, wait_until
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import backend_command, render

pytestmark = pytest.mark.e2e

ORIGIN = "https://app.example.org"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("skeleton") / "p", services=["redis", "celery_worker"], cors_origins=ORIGIN)


@pytest.fixture(params=["production", "test", "development"])
def backend(request: pytest.FixtureRequest, project: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, "APP_ENV": request.param, "CORS_ORIGINS": ORIGIN}
    processes = Processes()
    with server_root("skeleton") as root:
        try:
            command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
            process = processes.start(command, root / "uvicorn.log", cwd=project / "backend", env=env)
            wait_ready(process, lambda: http_status(port, "/api/health") == 200)
            yield request.param, port
        finally:
            processes.stop_all()


def test_docs_exist_outside_production_and_the_unauthenticated_demo_routes_only_in_development(
    backend: tuple[str, int],
) -> None:
    """The test stack runs on the production server (APP_ENV=test): no demo route there either."""
    mode, port = backend
    assert http_status(port, "/api/openapi.json") == (404 if mode == "production" else 200)
    if mode == "development":
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/openapi.json", timeout=5) as response:
            assert "/api/tasks/add" in json.load(response)["paths"]
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("POST", "/api/tasks/add?a=1&b=2")
        assert connection.getresponse().status == 404  # not routed at all: no broker is asked
        connection.close()


def test_websocket_refuses_pages_of_other_origins(backend: tuple[str, int]) -> None:
    _, port = backend
    url = f"ws://127.0.0.1:{port}/ws"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin="https://evil.example", open_timeout=5)
    assert refused.value.response.status_code == 403
    for origin in (ORIGIN, None):  # the app's own pages; clients that are not browsers
        with connect(url, origin=origin, open_timeout=5) as socket:
            socket.send("hello")
            assert socket.recv(timeout=5) == "hello"


# Fake cgroup files, WEB_CONCURRENCY -> uvicorn worker processes the image's command starts.
USABLE_CPUS = len(os.sched_getaffinity(0))
WORKERS = {
    "one-cpu": ({"cpu.max": "100000 100000\n"}, None, 1),
    "one-and-a-half-cpus": ({"cpu.max": "150000 100000\n"}, None, min(2, USABLE_CPUS)),
    "web-concurrency-wins": ({"cpu.max": "100000 100000\n"}, "3", 3),
}


@pytest.mark.parametrize("case", WORKERS)
def test_image_command_starts_workers_for_the_cpu_limit_and_outlives_nginx_keepalive(project: Path, case: str) -> None:
    """The image's command counts uvicorn's workers at start (WEB_CONCURRENCY, else the CPU
    limit), and keeps an idle connection open past uvicorn's default 5 s (longer than nginx keeps
    its idle upstream connections: see the upstream blocks' keepalive_timeout)."""
    files, web_concurrency, expected = WORKERS[case]
    port = free_port()
    processes = Processes()
    with server_root("workers") as root:
        try:
            for name, content in files.items():
                (root / "cgroup").mkdir(exist_ok=True)
                (root / "cgroup" / name).write_text(content)
            env = {**os.environ, "APP_ENV": "production", "APP_MODULE": "app.main:app", "CGROUP_DIR": str(root / "cgroup")}
            env.pop("WEB_CONCURRENCY", None)
            if web_concurrency:
                env["WEB_CONCURRENCY"] = web_concurrency
            log = root / "uvicorn.log"
            process = processes.start(backend_command(project, port), log, cwd=project / "backend", env=env)
            wait_ready(process, lambda: log.read_text().count("Application startup complete") == expected)
            assert wait_until(lambda: log.read_text().count("Started server process") == expected, timeout=5)
            if case != "one-cpu":
                return
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/api/health")
            assert connection.getresponse().read() == b'{"status":"ok"}'
            idle = connection.sock
            time.sleep(6)
            connection.request("GET", "/api/health")
            assert connection.getresponse().status == 200 and connection.sock is idle
            connection.close()
        finally:
            processes.stop_all()


def test_image_command_refuses_a_bad_web_concurrency(project: Path) -> None:
    env = {**os.environ, "APP_MODULE": "app.main:app", "WEB_CONCURRENCY": "0"}
    with server_root("workers") as root:
        processes = Processes()
        try:
            process = processes.start(
                backend_command(project, free_port()), root / "uvicorn.log", cwd=project / "backend", env=env
            )
            assert process.wait(timeout=20) != 0
            assert "WEB_CONCURRENCY must be a whole number from 1" in (root / "uvicorn.log").read_text()
        finally:
            processes.stop_all()
