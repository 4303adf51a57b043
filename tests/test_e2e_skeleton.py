"""The FastAPI skeleton as the backend image runs it (uvicorn), in production and test mode."""

import http.client
import json
import os
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import Processes, free_port, http_status, server_root, wait_ready
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import render

pytestmark = pytest.mark.e2e

ORIGIN = "https://app.example.org"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("skeleton") / "p", services=["redis", "celery_worker"], cors_origins=ORIGIN)


@pytest.fixture(params=["production", "test"])
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


def test_demo_and_docs_routes_exist_only_outside_production(backend: tuple[str, int]) -> None:
    mode, port = backend
    expected = 404 if mode == "production" else 200
    assert http_status(port, "/api/openapi.json") == expected
    if mode == "test":
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
