"""Re-record tests/data/swarm_nodes.json, what `make swarm-verify` reads about the cluster itself.

    sudo python3 tests/record_swarm_nodes.py     (root: a throw-away two-node swarm; ~1 minute)

Makes the two-node swarm of the Swarm boot tests (tests/swarm_cluster.py, initialised as
docs/SWARM.md says: --autolock, private listen and advertise addresses) and stores, untrimmed,
`docker node ls --format '{{json .}}'` and `docker info --format '{{json .Swarm}}'` from the
manager, with autolock on and, after `docker swarm update --autolock=false`, off.
tests/test_swarm.py judges them with the project's scripts/swarm.py.
"""

import json
from pathlib import Path

from swarm_cluster import Cluster

OUTPUT = Path(__file__).resolve().parent / "data" / "swarm_nodes.json"


def main() -> None:
    cluster = Cluster(size=2)
    try:
        manager = cluster.manager
        nodes = [json.loads(line) for line in manager.docker("node", "ls", "--format", "{{json .}}").stdout.splitlines()]
        autolock = json.loads(manager.docker("info", "--format", "{{json .Swarm}}").stdout)
        manager.docker("swarm", "update", "--autolock=false")
        no_autolock = json.loads(manager.docker("info", "--format", "{{json .Swarm}}").stdout)
    finally:
        cluster.close()
    OUTPUT.write_text(json.dumps({"nodes": nodes, "swarm": {"autolock": autolock, "no_autolock": no_autolock}}, indent=1) + "\n")
    print(f"recorded {len(nodes)} nodes into {OUTPUT}")


if __name__ == "__main__":
    main()
