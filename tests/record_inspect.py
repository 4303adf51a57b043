"""Re-record tests/data/verify_inspect.json, the running containers the fast verify tests judge.

    sudo python3 tests/record_inspect.py     (root: a throw-away dockerd; debootstrap; ~5 minutes)

Renders the topology in ANSWERS, builds its images on the stand-in bases (tests/standins), boots
its test stack (compose.test.yaml) until every service is healthy (and the one-shot migrate
service has exited 0), and stores, untrimmed, what scripts/verify.py reads from a real engine:
`docker inspect` of every container, exited ones included, and of every network they join.
tests/test_verify.py derives one weakened copy per hardening rule from it.
"""

import json
import sys
import tempfile
from pathlib import Path

from docker_engine import Engine, build_standins
from servers import free_port

from conftest import render

OUTPUT = Path(__file__).resolve().parent / "data" / "verify_inspect.json"
ANSWERS = {
    "project_name": "Verify Demo",
    "python_version": "3.11",
    "proxy_mode": "none",
    "frontend": "none",
    "services": ["postgres", "redis"],
}


def record(engine: Engine, work: Path) -> dict:
    project = render(work / "project", **ANSWERS)
    model = json.loads(engine.compose(project, "compose.test.yaml", "config", "--format", "json").stdout)
    for service in model["services"].values():
        if "build" in service:
            engine.build(service["image"], Path(service["build"]["context"]))
    port = str(free_port())
    engine.compose(
        project, "compose.test.yaml", "up", "--detach", "--wait", "--wait-timeout", "240", "--no-build", HTTP_PORT=port
    )
    try:
        ids = engine.compose(project, "compose.test.yaml", "ps", "--all", "--quiet").stdout.split()
        containers = sorted(engine.inspect("container", *ids), key=lambda c: c["Name"])
        networks = sorted({n for c in containers for n in c["NetworkSettings"]["Networks"]})
        return {"answers": ANSWERS, "containers": containers, "networks": engine.inspect("network", *networks)}
    finally:
        engine.compose(project, "compose.test.yaml", "down", "--volumes", check=False)


def main() -> int:
    engine = Engine()
    try:
        build_standins(engine)
        with tempfile.TemporaryDirectory() as work:
            data = record(engine, Path(work))
    finally:
        engine.stop()
    OUTPUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(data['containers'])} containers and {len(data['networks'])} networks in {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
