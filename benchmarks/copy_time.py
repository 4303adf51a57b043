"""Benchmark: how long `copier copy` takes for the full topology, as a user runs it.

Prints the median, min and max of N runs (default 7) of the real CLI, template hook included.
A benchmark, not a test: it prints figures and asserts nothing about time.
Usage: python3 benchmarks/copy_time.py [runs]
"""

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


def one_copy(destination: Path) -> float:
    command = ["copier", "copy", "--quiet", "--trust", "--defaults", "--vcs-ref=HEAD", *FULL_TOPOLOGY]
    start = time.perf_counter()
    subprocess.run([*command, str(TEMPLATE), str(destination)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    with tempfile.TemporaryDirectory() as tmp:
        times = [one_copy(Path(tmp) / f"run{i}") for i in range(runs)]
        files = sum(1 for p in (Path(tmp) / "run0").rglob("*") if p.is_file())
    print(f"copier copy, full topology ({files} files), {runs} runs:")
    print(f"  median {statistics.median(times):.2f} s   min {min(times):.2f} s   max {max(times):.2f} s")


if __name__ == "__main__":
    main()
