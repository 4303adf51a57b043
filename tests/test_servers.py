"""The test servers' life cycle (tests/servers.py): ready means answering, and nothing outlives a run.

- wait_ready returns only once a server answers its protocol, not when its port opens (a fake
  server, and a real PostgreSQL held in its "starting up" state).
- A pytest run interrupted mid-test (Ctrl-C, SIGTERM to pytest, to an xdist worker or to the
  xdist controller) leaves no process of the servers its fixtures started.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import suppress
from pathlib import Path

import pytest
from servers import (
    AS_ROOT,
    NOBODY,
    ServerNotReady,
    as_unprivileged,
    end_server,
    free_port,
    group_members,
    http_status,
    postgres_answers,
    server_root,
    start_server,
    wait_ready,
    wait_until,
)
from test_e2e_data import POSTGRES_BIN

from conftest import TESTS

pytestmark = pytest.mark.e2e

# Accepts connections at once but, for its first second, closes them without a word: like a
# server that opened its port before it can serve.
LATE_HTTP_SERVER = """
import socket, sys, time
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
answers_from = time.monotonic() + 1.0
while True:
    connection, _ = listener.accept()
    if time.monotonic() >= answers_from:
        connection.recv(4096)
        connection.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n")
    connection.close()
"""


def port_open(port: int) -> bool:
    """What a TCP port check sees (the readiness test the suite used to rely on)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_wait_ready_returns_once_the_server_answers_not_when_its_port_opens(tmp_path: Path) -> None:
    port = free_port()
    started = time.monotonic()
    process = start_server([sys.executable, "-c", LATE_HTTP_SERVER, port], tmp_path / "late.log")
    try:
        assert wait_until(lambda: port_open(port), timeout=10, interval=0.01)
        assert time.monotonic() - started < 0.9, "the port opens long before the server answers"
        wait_ready(process, lambda: http_status(port, "/") == 200)
        assert time.monotonic() - started >= 1.0
        assert http_status(port, "/") == 200
    finally:
        end_server(process)


def test_wait_ready_failure_tells_whether_the_server_exited_and_shows_its_log(tmp_path: Path) -> None:
    exiting = start_server(["sh", "-c", "echo 'bind: address in use' >&2; exit 3"], tmp_path / "exits.log")
    with pytest.raises(ServerNotReady, match=r"exited with code 3(.|\n)*bind: address in use"):
        wait_ready(exiting, lambda: False)
    end_server(exiting)

    port = free_port()
    silent = start_server(["sh", "-c", f"echo listening on {port}; exec sleep 60"], tmp_path / "silent.log")
    try:
        with pytest.raises(ServerNotReady, match=rf"still running but not answering after 0.5 s(.|\n)*listening on {port}"):
            wait_ready(silent, lambda: http_status(port, "/"), timeout=0.5)
    finally:
        end_server(silent)


def test_postgres_is_ready_only_once_it_accepts_queries_not_while_starting_up() -> None:
    """A standby without hot standby stays in the state a fresh server is in for a moment at
    start-up: its port is open and it refuses every connection ("FATAL: the database system is
    not accepting connections" here, "... is starting up" then) until it is promoted."""
    with server_root("pg-ready") as root:
        data, sockets = root / "data", root / "run"
        for path in (data, sockets):
            path.mkdir(mode=0o700)
            if AS_ROOT:
                os.chown(path, NOBODY, NOBODY)
        initdb = [POSTGRES_BIN / "initdb", "-D", data, "--username=tester", "--auth=trust"]
        subprocess.run(as_unprivileged(initdb), capture_output=True, check=True, env={"LC_ALL": "C.UTF-8"})
        subprocess.run(as_unprivileged(["touch", data / "standby.signal"]), check=True)
        port = free_port()
        command = [POSTGRES_BIN / "postgres", "-D", data, "-h", "127.0.0.1", "-p", port, "-k", sockets, "-c", "hot_standby=off"]
        process = start_server(as_unprivileged(command), root / "postgres.log")
        try:
            assert wait_until(lambda: port_open(port), timeout=20, interval=0.05), "postgres never listened"
            with pytest.raises(ServerNotReady, match=r"FATAL: +the database system is"):
                wait_ready(process, lambda: postgres_answers("127.0.0.1", port, "tester"), timeout=1)

            promote = [POSTGRES_BIN / "pg_ctl", "promote", "-D", data]  # without -w: wait_ready waits
            subprocess.run(as_unprivileged(promote), capture_output=True, check=True)
            wait_ready(process, lambda: postgres_answers("127.0.0.1", port, "tester"))
            query = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "tester", "-d", "postgres", "-tAc", "select 1"]
            assert subprocess.run(query, capture_output=True, text=True).stdout.strip() == "1"
        finally:
            end_server(process)


# A test session like the suite's: its fixture starts a server (a shell and its redis-server, one
# process group) through tests/servers.py, and its test waits until it is interrupted.
INNER_TEST = textwrap.dedent(
    """
    import os
    import threading
    from pathlib import Path

    import pytest
    from servers import Processes, free_port, redis_answers, wait_ready


    @pytest.fixture
    def redis(tmp_path):
        processes = Processes()
        try:
            port = free_port()
            command = ["sh", "-c", f"redis-server --port {port} --save '' --appendonly no & wait"]
            process = processes.start(command, tmp_path / "redis.log")
            wait_ready(process, lambda: redis_answers(port))
            yield process
        finally:
            processes.stop_all()


    def test_interrupted(redis):
        Path(os.environ["SERVER_PIDS"]).write_text(f"{redis.pid} {os.getpid()}\\n")
        threading.Event().wait(120)  # until the outer test interrupts the run
    """
)


@pytest.mark.parametrize(
    ("xdist", "sig", "target"),
    [
        pytest.param(True, signal.SIGINT, "session", id="ctrl-c-in-terminal"),
        pytest.param(False, signal.SIGTERM, "pytest", id="sigterm-to-pytest"),
        pytest.param(True, signal.SIGTERM, "test process", id="sigterm-to-xdist-worker"),
        pytest.param(True, signal.SIGTERM, "pytest", id="sigterm-to-xdist-controller"),
    ],
)
def test_interrupted_run_leaves_no_server_process(tmp_path: Path, xdist: bool, sig: int, target: str) -> None:
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    pids = tmp_path / "pids"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark", "test_inner.py"]
    command += ["-n", "1"] if xdist else []
    env = {**os.environ, "PYTHONPATH": str(TESTS), "SERVER_PIDS": str(pids)}
    log = tmp_path / "inner.log"
    with log.open("wb") as output:
        # A session of its own, like a job started from a shell: Ctrl-C goes to its process group.
        inner = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    server_group: list[int] = []
    try:
        assert wait_until(lambda: pids.exists() and pids.read_text().endswith("\n"), timeout=60), log.read_text()
        server, test_process = map(int, pids.read_text().split())
        server_group = group_members(server)
        assert len(server_group) == 2, "the shell and its redis-server"

        if target == "session":
            os.killpg(inner.pid, sig)
        else:
            os.kill(inner.pid if target == "pytest" else test_process, sig)
        # The interrupted process ends its servers first (how xdist winds down after is its business).
        gone = wait_until(lambda: not group_members(server), timeout=30, interval=0.05)
        assert gone, f"still running: {group_members(server)}\n{log.read_text()}"
    finally:  # whatever is left: the inner session, and the servers if the test failed
        for pid in server_group:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with suppress(ProcessLookupError):
            os.killpg(inner.pid, signal.SIGKILL)
        inner.wait(timeout=10)
