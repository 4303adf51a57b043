"""Benchmark: backend image build time, first build and rebuild after an app-code change.

Starts a throw-away Docker engine with the stand-in base images (as the boot tests do; root
only), renders a project and builds its backend image twice: cold, then after editing
backend/app/main.py. The Dockerfile copies requirements.txt and installs dependencies (with a
BuildKit cache mount) before it copies the code, so the rebuild must not reinstall anything.
A benchmark, not a test: it prints figures and asserts nothing about time.
Usage: sudo python3 benchmarks/build_time.py
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from docker_engine import Engine, build_standins

from conftest import render


def timed_build(engine: Engine, tag: str, context: Path) -> float:
    start = time.perf_counter()
    engine.build(tag, context)
    return time.perf_counter() - start


def main() -> None:
    engine = Engine()
    try:
        start = time.perf_counter()
        build_standins(engine)
        print(f"stand-in base images: {time.perf_counter() - start:.0f} s (not part of the figures below)")
        project = render(Path(tempfile.mkdtemp()) / "p", python_version="3.11", services=["postgres", "redis", "celery_worker"])
        backend = project / "backend"
        first = timed_build(engine, "bench-backend:1", backend)
        main_py = backend / "app" / "main.py"
        main_py.write_text(main_py.read_text() + "\n# a code change\n")
        rebuild = timed_build(engine, "bench-backend:2", backend)
        size = int(engine.docker("image", "inspect", "--format", "{{.Size}}", "bench-backend:2").stdout)
    finally:
        engine.stop()
    print("backend image (FastAPI, uvicorn, psycopg, redis, celery):")
    print(f"  first build:              {first:.1f} s")
    print(f"  rebuild after code change: {rebuild:.1f} s (dependency layer reused)")
    print(f"  image size:               {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
