"""Start real programs on 127.0.0.1 for the end-to-end tests, as a non-root user, and clean up.

When the tests run as root (CI), servers run as nobody (65534) through setpriv, in a directory
tree nobody can read; only the paths a container would have on tmpfs are writable to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

NOBODY = 65534
AS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_unprivileged(command: Sequence[str | Path], groups: Sequence[int] = ()) -> list[str]:
    """The command, run as nobody with only these supplementary groups, when we are root."""
    membership = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", membership] if AS_ROOT else []
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


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}") from None
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def wait_until(condition, timeout: float = 20.0, interval: float = 0.2):
    """Poll condition() until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class Processes:
    """Every process a test starts; all of them (and their children) are stopped at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, command: Sequence[str | Path], log: Path, **kwargs: object) -> subprocess.Popen:
        handle = log.open("ab")
        if AS_ROOT:
            # Like runc, which gives a container's stdio to its user: nginx reopens /dev/stderr.
            os.chown(log, NOBODY, NOBODY)
        process = subprocess.Popen(
            [str(c) for c in command], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        process.log = log
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            self.stop(process)
