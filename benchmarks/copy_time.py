"""Benchmark: how long `copier copy` takes for the full topology, as a user runs it.

Three cases, interleaved in one run so that they share the machine's load: digest pinning off,
a registry that refuses connections (a mirror on a closed 127.0.0.1 port) and a registry whose
host name does not resolve (a reserved `.invalid` name). Prints the median, min and max of N runs
of the real CLI each (default 7), template hook included, and each median's ratio to "off".
A benchmark, not a test: it prints figures and asserts nothing about time.
Usage: python3 benchmarks/copy_time.py [runs]
"""

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1]
FULL_TOPOLOGY = [
    "--data=frontend=spa",
    "--data=proxy_mode=nginx-certbot",
    "--data=services=[postgres, redis, celery_worker, celery_beat]",
    "--data=celery_queues=default,long",
]
MIRRORS = "HARDENED_COMPOSE_REGISTRY_MIRRORS"


def closed_port() -> int:
    """A port nothing listens on (just released by the kernel): connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    "pinning off": {"HARDENED_COMPOSE_PIN": "off"},
    "registry refuses connections": {"HARDENED_COMPOSE_PIN": "on", MIRRORS: f"docker.io=http://127.0.0.1:{closed_port()}"},
    "registry name does not resolve": {"HARDENED_COMPOSE_PIN": "on", MIRRORS: "docker.io=http://registry.invalid:5000"},
}


def one_copy(destination: Path, env: dict[str, str]) -> float:
    command = ["copier", "copy", "--quiet", "--trust", "--defaults", "--vcs-ref=HEAD", *FULL_TOPOLOGY]
    start = time.perf_counter()
    subprocess.run([*command, str(TEMPLATE), str(destination)], check=True, capture_output=True, env={**os.environ, **env})
    return time.perf_counter() - start


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    times: dict[str, list[float]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            for number, (name, env) in enumerate(CASES.items()):
                times[name].append(one_copy(Path(tmp) / f"run{run}-{number}", env))
        files = sum(1 for p in (Path(tmp) / "run0-0").rglob("*") if p.is_file())
    print(f"copier copy, full topology ({files} files), {runs} runs per case:")
    off = statistics.median(times["pinning off"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:<32} median {median:5.2f} s   min {min(values):5.2f} s   max {max(values):5.2f} s"
            f"   {median / off:4.2f} x off ({median - off:+.2f} s)"
        )


if __name__ == "__main__":
    main()
