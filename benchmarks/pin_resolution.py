"""Benchmark: resolving a full-topology project's image references through a slow registry.

A real docker-registry with token authentication on 127.0.0.1, behind proxies that add 50 ms
to every request (registry and token endpoint). Resolves cold (new resolver, no cached token)
sequentially and with the concurrent pool, and prints wall time, requests and bytes per
reference, and the Docker Hub pulls it would have consumed (manifest GETs; HEADs are free).
A benchmark, not a test: it prints figures and asserts nothing about time.
Usage: python3 benchmarks/pin_resolution.py   (needs docker-registry, like the test suite)
"""

import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from registry import FaultProxy, Faults, Registry, TokenServer, push_image

from conftest import render

LATENCY = 0.050
ROUNDS = 5
FULL = {"frontend": "spa", "proxy_mode": "nginx-certbot", "services": ["postgres", "redis", "celery_worker", "celery_beat"]}
# Two more images a project commonly adds in compose.override.yaml, so the run covers 8 tags.
EXTRA = {"docker.io/library/busybox:1.37": "image: busybox:1.37", "docker.io/grafana/alloy:v1.5.0": "image: grafana/alloy:v1.5.0"}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pin-bench-"))
    tokens = TokenServer(work)
    slow_tokens = FaultProxy(f"http://127.0.0.1:{tokens.port}", Faults(latency=LATENCY))
    registry = Registry(work, tokens, realm=f"{slow_tokens.url}/token")
    slow_registry = FaultProxy(registry.url, Faults(latency=LATENCY))
    try:
        project = render(work / "project", **FULL)
        (project / "compose.override.yaml").write_text(
            "services:\n" + "".join(f"  extra{i}:\n    {line}\n" for i, line in enumerate(EXTRA.values()))
        )
        pin = runpy.run_path(str(project / "scripts" / "pin_images.py"))
        found = [m.group(g) for p in pin["find_files"](project) for m, g in pin["references_in"](p, p.read_text())]
        found += [line.split(": ", 1)[1] for line in EXTRA.values()]
        tags = sorted(set(found))
        for tagged in tags:
            ref = pin["Reference"].parse(tagged)
            push_image(registry, ref.repository, ref.tag)

        def cold_resolver():
            return pin["Resolver"](mirrors={"docker.io": slow_registry.url})

        sequential, concurrent = [], []
        for _ in range(ROUNDS):
            resolver = cold_resolver()
            start = time.perf_counter()
            for tagged in tags:
                resolver.resolve(pin["Reference"].parse(tagged))
            sequential.append(time.perf_counter() - start)

            resolver = cold_resolver()
            slow_registry.faults.log.clear()
            start = time.perf_counter()
            with pin["concurrent"].futures.ThreadPoolExecutor(max_workers=pin["MAX_WORKERS"]) as pool:
                list(pool.map(lambda t, r=resolver: r.resolve(pin["Reference"].parse(t)), tags))
            concurrent.append(time.perf_counter() - start)
            requests, received = resolver.requests, resolver.bytes_received
            pulls = sum(1 for method, path, *_ in slow_registry.faults.log if method == "GET" and "/manifests/" in path)
    finally:
        slow_registry.close()
        registry.close()
        slow_tokens.close()
        tokens.close()

    print(
        f"{len(found)} image references, {len(tags)} distinct tags; {LATENCY * 1000:.0f} ms added per request; "
        f"token auth; cold; median of {ROUNDS} rounds"
    )
    print(f"  sequential: {statistics.median(sequential):.2f} s")
    print(f"  concurrent: {statistics.median(concurrent):.2f} s  ({pin['MAX_WORKERS']} workers)")
    print(f"  requests per tag: {requests / len(tags):.1f} (registry and token endpoint)")
    print(f"  bytes per tag:    {received / len(tags):.0f} B")
    print(f"  Docker Hub pulls consumed: {pulls} (manifest GETs; HEAD requests are not counted)")


if __name__ == "__main__":
    main()
