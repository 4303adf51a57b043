"""Start real programs on 127.0.0.1 for the end-to-end tests, as a non-root user, and clean up.

When the tests run as root (CI), servers run as nobody (65534) through setpriv, in a directory
tree nobody can read; only the paths a container would have on tmpfs are writable to it.

Every server is started by start_server (in its own process group, recorded until it has ended),
waited for by wait_ready with a protocol-level probe, and ended, with everything it started, by
end_server: from the fixture's finalizer, or from the handlers that run when the test run is
interrupted (Ctrl-C, SIGTERM to pytest or to an xdist worker).
"""

from __future__ import annotations

import atexit
import http.client
import os
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

NOBODY = 65534
T = TypeVar("T")
AS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_unprivileged(command: Sequence[str | Path], groups: Sequence[int] = (), low_ports: bool = False) -> list[str]:
    """The command, run as nobody with only these supplementary groups, when we are root.

    low_ports: it may also bind ports below 1024, as any user in a container may (Docker sets
    net.ipv4.ip_unprivileged_port_start=0 there): the capability NET_BIND_SERVICE and no other."""
    membership = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    capability = ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"] if low_ports else []
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", membership, *capability] if AS_ROOT else []
    return prefix + [str(c) for c in command]


def writable_by_server(path: Path) -> Path:
    """Create path (a container's tmpfs or volume) and give it to the server's user."""
    path.mkdir(parents=True, exist_ok=True)
    if AS_ROOT:
        for sub in [path, *path.rglob("*")]:
            os.chown(sub, NOBODY, NOBODY)
    return path


@contextmanager
def server_root(prefix: str) -> Iterator[Path]:
    """A directory the unprivileged server can traverse (pytest's tmp dirs are root-only).

    The servers' logs are printed when it is removed: pytest shows them for failed tests."""
    root = Path(tempfile.mkdtemp(prefix=f"hc-{prefix}-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for log in sorted(root.rglob("*.log")):
            print(f"==> {log.relative_to(root)}\n{log.read_text(errors='replace')[-3000:]}")
        shutil.rmtree(root, ignore_errors=True)


class ServerNotReady(RuntimeError):
    """A server did not answer in time, or exited: the message carries its log's last lines."""


def wait_until(condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.2) -> T:
    """Poll condition() until it returns a truthy value; return that value (or the last one at timeout).

    The one polling loop of the tests: readiness (wait_ready) and ending servers use it too."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_ready(process: subprocess.Popen, answers: Callable[[], object], timeout: float = 30.0) -> None:
    """Return once the server started as `process` really answers, as shown by answers(): a probe
    at the protocol level (a query, a PING, an HTTP request), never only an open port, which
    servers open before they can serve (PostgreSQL then answers "the database system is
    starting up"). Exceptions from answers() mean "not yet". Fails at once if the process exits."""
    last_error: Exception | None = None

    def ready() -> bool:
        nonlocal last_error
        try:
            answered = bool(answers())
        except Exception as error:  # refused, reset, timed out, starting up: not yet
            answered, last_error = False, error
        if process.poll() is not None:
            raise ServerNotReady(_describe(process, f"exited with code {process.returncode} before it answered"))
        return answered

    if not wait_until(ready, timeout, interval=0.05):
        problem = f"still running but not answering after {timeout:g} s (last probe: {last_error!r})"
        raise ServerNotReady(_describe(process, problem))


def _describe(process: subprocess.Popen, problem: str) -> str:
    log: Path | None = getattr(process, "log", None)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log and log.exists() else "(no log)"
    return f"{shlex.join(map(str, process.args))} {problem}\n==> last lines of {log}:\n{tail}"


# Protocol-level probes for wait_ready: each one returns whether the server answered properly, or raises.


def http_status(port: int, path: str, cafile: Path | None = None) -> int:
    """The status of `GET path` on 127.0.0.1:port; over HTTPS trusting only cafile, when given."""
    if cafile:
        context = ssl.create_default_context(cafile=cafile)
        connection: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def redis_answers(port: int) -> bool:
    """PING is answered PONG, or NOAUTH when a password is required (not LOADING or silence)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
        connection.sendall(b"PING\r\n")
        return connection.recv(64).startswith((b"+PONG", b"-NOAUTH"))


def postgres_answers(host: str | Path, port: int, user: str, database: str = "postgres") -> bool:
    """`select 1` succeeds as `user` (host: a socket directory or an address with trust auth)."""
    command = ["psql", "-h", str(host), "-p", str(port), "-U", user, "-d", database, "-w", "-tAc", "select 1"]
    env = {"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=10)
    if result.returncode != 0:
        raise ConnectionError(result.stderr.strip())  # e.g. "the database system is starting up"
    return result.stdout.strip() == "1"


def dns_answers(port: int, name: str) -> bool:
    """An A query for name over UDP gets an answer without error (e.g. from pebble-challtestsrv)."""
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    query = struct.pack(">6H", 0x6863, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">2H", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.5)
        udp.connect(("127.0.0.1", port))
        udp.send(query)
        reply = udp.recv(512)
    ident, flags, _, answer_count = struct.unpack(">4H", reply[:8])
    return ident == 0x6863 and flags & 0x000F == 0 and answer_count > 0


# Every server runs in its own process group, recorded here until the whole group has ended: by
# the fixture that started it, or, when a run is interrupted, by the SIGTERM/SIGHUP handler or at
# exit (SIGINT raises KeyboardInterrupt, after which pytest runs the fixtures' finalizers).
@dataclass
class _Running:
    process: subprocess.Popen
    after: Callable[[], None] | None  # clean-up once the group has ended (e.g. unmount)
    grace: float  # seconds between SIGTERM and SIGKILL


_RUNNING: dict[int, _Running] = {}
_handlers_installed = False
_terminating = False


def start_server(
    command: Sequence[str | Path],
    log: Path,
    after: Callable[[], None] | None = None,
    grace: float = 10.0,
    **popen: Any,
) -> subprocess.Popen:
    """Start command in a new process group (output to log) and record it until end_server.

    after: clean-up to run once the group has ended (e.g. unmount what the server mounted);
    grace: how long end_server waits after the signal before it kills the group."""
    end_servers_when_interrupted()
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [str(c) for c in command], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    process.log = log
    _RUNNING[process.pid] = _Running(process, after, grace)
    return process


def group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes in process group pgid."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rpartition(")")[2].split()[:3]
        except OSError:  # the process ended meanwhile
            continue
        if int(group) == pgid and state not in "ZX":
            members.append(int(stat.parent.name))
    return members


def end_server(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send sig to the server's process group, SIGKILL whatever is left after its grace time,
    reap it, run its clean-up. Safe to call again, and from the interrupt handler while a call
    is under way."""
    running = _RUNNING.get(process.pid)
    if running is None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    if not wait_until(lambda: not group_members(process.pid), running.grace, interval=0.05):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        wait_until(lambda: not group_members(process.pid), 10, interval=0.05)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    if _RUNNING.pop(process.pid, None) and running.after:
        running.after()


def end_all_servers() -> None:
    for running in reversed(list(_RUNNING.values())):
        end_server(running.process)


def _on_termination(signum: int, frame: object) -> None:
    global _terminating
    if _terminating:  # a second signal (e.g. to the whole process group) while ending them
        return
    _terminating = True
    end_all_servers()
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")  # pytest then runs the finalizers


def end_servers_when_interrupted() -> None:
    """Install the clean-up for interrupted runs (once): at exit, and on SIGTERM/SIGHUP, which
    would otherwise end Python without running any finalizer and leave the servers running."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True
    atexit.register(end_all_servers)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _on_termination)


class Processes:
    """The servers one test or fixture starts; stop_all() ends them (and their children)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, command: Sequence[str | Path], log: Path, **kwargs: Any) -> subprocess.Popen:
        log.touch()
        if AS_ROOT:
            # Like runc, which gives a container's stdio to its user: nginx reopens /dev/stderr.
            os.chown(log, NOBODY, NOBODY)
        process = start_server(command, log, **kwargs)
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        end_server(process, sig)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            self.stop(process)
