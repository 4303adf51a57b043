#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the Debian packages (as root) and the
# PyPI packages the tests use, lints the template's own code, then runs every test.
# Usage: bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A packages=(
    [nginx]=nginx-light [openssl]=openssl [git]=git [setpriv]=util-linux [curl]=curl
    [docker-registry]=docker-registry [skopeo]=skopeo [redis-server]=redis-server
    [pebble]=pebble [certbot]=certbot [psql]=postgresql [node]=nodejs [npm]=npm
    [dockerd]=docker.io [debootstrap]=debootstrap [iptables]=iptables [ip]=iproute2 [pipx]=pipx [age]=age
)
missing=()
for command in "${!packages[@]}"; do
    command -v "$command" >/dev/null || missing+=("${packages[$command]}")
done
# Debian's python3 refuses `pip install` outside a virtual environment (PEP 668) and ships venv
# support separately.
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "run.sh: missing ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The test tools live in a virtual environment of their own (.venv, gitignored, reused by later runs).
[ -x .venv/bin/python3 ] || python3 -m venv .venv
.venv/bin/python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
export PATH="$PWD/.venv/bin:$PATH"
# The MDN HTTP Observatory (npm; versions and hashes locked in tests/graders) in a gitignored
# cache, reinstalled when the lock file changes. Without its install scripts: they download a CA
# bundle (the tests trust their own CA), the HSTS preload list and the TLD list, of which the
# scanner only needs the files (the tests scan one name under .test).
graders=tests/.cache/graders
if ! cmp -s tests/graders/package-lock.json "$graders/installed.lock"; then
    rm -rf "$graders" && mkdir -p "$graders"
    cp tests/graders/package.json tests/graders/package-lock.json "$graders/"
    (cd "$graders" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    observatory_conf="$graders/node_modules/@mdn/mdn-http-observatory/conf"
    echo '{}' >"$observatory_conf/hsts-preload.json"
    echo '["TEST"]' >"$observatory_conf/tld-list.json"
    cp tests/graders/package-lock.json "$graders/installed.lock"
fi

ruff check hooks tests benchmarks tools
ruff format --check hooks tests benchmarks tools
# loadgroup: the boot tests share one Docker engine, so they run in one worker.
python3 -m pytest -n auto --dist loadgroup "$@"
