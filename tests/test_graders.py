"""Independent graders of the rendered self-hosted edge (proxy_mode=nginx-certbot): the MDN HTTP
Observatory and sslyze, run as an outside visitor runs them, against the real proxy (in front of
the SPA's nginx, or of the backend alone) with a certificate from a throw-away CA.

The Observatory scans ports 80 and 443 only, so the proxy listens on 127.0.0.1:80 and :443: root
only (the proxy itself still runs as nobody, with the one capability to bind low ports a
container's user has), and one edge at a time on this machine, under a file lock. The proxy
serves only its configured domain: a name under .test (reserved for testing) that node resolves
to 127.0.0.1 through a preloaded module, with no DNS or /etc/hosts change. The tools are
installed by tests/run.sh (tests/graders/package-lock.json, tests/requirements.txt).
"""

import datetime
import fcntl
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from servers import (
    AS_ROOT,
    Processes,
    as_unprivileged,
    free_port,
    http_status,
    server_root,
    wait_ready,
    writable_by_server,
)
from test_e2e_acme import SYSTEM_PATH, served_certificate
from test_e2e_nginx import start_backend

from conftest import GRADE, TESTS, render
from nginx_stage import build_spa, stage, stage_entrypoint

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.xdist_group("ports-80-443"),
    pytest.mark.skipif(not AS_ROOT, reason="the Observatory scans ports 80 and 443, which only root may hand out"),
]

RecordProperty = Callable[[str, object], None]
DOMAIN = "app.example.test"
OBSERVATORY = TESTS / ".cache/graders/node_modules/@mdn/mdn-http-observatory"
PORTS_LOCK = Path(tempfile.gettempdir()) / "hardened-compose-ports-80-443.lock"
# node resolves DOMAIN to 127.0.0.1 (loaded with --require before the Observatory); every other
# name as usual.
RESOLVE_TO_LOOPBACK = """
const dns = require("node:dns");
const lookup = dns.lookup;
dns.lookup = function (hostname, options, callback) {
  if (hostname !== process.env.LOOPBACK_NAME) return lookup.apply(this, arguments);
  if (typeof options === "function") [options, callback] = [{}, options];
  const all = typeof options === "object" && options.all;
  if (all) process.nextTick(callback, null, [{ address: "127.0.0.1", family: 4 }]);
  else process.nextTick(callback, null, "127.0.0.1", 4);
};
"""


@dataclass
class Edge:
    frontend: str
    ca: Path  # the throw-away CA's certificate, which the graders are told to trust
    root: Path


@contextmanager
def ports_80_443() -> Iterator[None]:
    """Held while an edge listens on 127.0.0.1:80/443, by whichever test run on this machine."""
    with PORTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def issue_certificate(directory: Path, certificate: Path, key: Path) -> Path:
    """A throw-away CA and, signed by it, a certificate for DOMAIN shaped like Let's Encrypt's
    (ECDSA P-256, 90 days, server authentication), written where the proxy reads it (certbot's
    files, owned by the proxy's user). Returns the CA's certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hardened-compose test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certificate.parent.mkdir(parents=True, exist_ok=True)
    certificate.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key.parent.mkdir(parents=True, exist_ok=True)
    pem_key = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key.write_bytes(pem_key)
    for path in {certificate.parent, key.parent}:
        writable_by_server(path)
    key.chmod(0o600)
    ca_file = directory / "test-ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_file


def certificate_paths(root: Path) -> tuple[Path, Path]:
    """Where the proxy staged under root reads its certificate and key (its HTTPS mode's
    ssl_certificate*), as the rendered configuration says: whatever directory that is."""
    found = {}
    for conf in (root / "etc/nginx").rglob("*.conf"):
        found.update(re.findall(r"^\s*(ssl_certificate(?:_key)?)\s+(\S+);", conf.read_text(), re.M))
    paths = Path(found["ssl_certificate"]), Path(found["ssl_certificate_key"])
    assert all(path.is_relative_to(root) for path in paths), f"{paths}: not staged (nginx_stage.CONTAINER_PATHS)"
    return paths


def start_frontend(processes: Processes, root: Path, project: Path, backend: int) -> int:
    """The SPA's nginx (its image's entrypoint, then nginx) on a free port, as nobody."""
    port = free_port()
    conf = stage(project, "frontend", root, upstreams={"backend": f"127.0.0.1:{backend}"}, ports={8080: port})
    shutil.copytree(build_spa(project), root / "usr/share/nginx/html", dirs_exist_ok=True)
    entrypoint, env = stage_entrypoint(project, "frontend", root)
    writable_by_server(root / "tmp")
    command = as_unprivileged(["sh", entrypoint, "nginx", "-e", "stderr", "-c", conf, "-g", "daemon off;"])
    nginx = processes.start(command, root / "frontend.log", env={"PATH": SYSTEM_PATH, **env})
    wait_ready(nginx, lambda: http_status(port, "/health") == 200)
    return port


@pytest.fixture(scope="module", params=["spa", "none"], ids=["proxy-spa-backend", "proxy-backend"])
def edge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """The rendered proxy in HTTPS mode on 127.0.0.1:80/443, in front of the SPA's nginx and the
    backend (a stand-in), or of the backend alone."""
    frontend = request.param
    destination = tmp_path_factory.mktemp("graders") / "p"
    project = render(destination, proxy_mode="nginx-certbot", frontend=frontend, domain=DOMAIN, email="ops@example.test")
    processes = Processes()
    with ports_80_443(), server_root("graders") as root:
        try:
            backend = start_backend(processes, root, project)
            upstreams = {"backend": f"127.0.0.1:{backend}"}
            if frontend == "spa":
                upstreams["frontend"] = f"127.0.0.1:{start_frontend(processes, root / 'front', project, backend)}"
            conf = stage(project, "proxy", root / "edge", upstreams=upstreams, ports={8080: 80, 8443: 443})
            ca = issue_certificate(root, *certificate_paths(root / "edge"))
            entrypoint, env = stage_entrypoint(project, "proxy", root / "edge")
            writable_by_server(root / "edge/tmp")
            command = ["sh", entrypoint, "nginx", "-e", "stderr", "-c", conf, "-g", "daemon off;"]
            env = {"PATH": SYSTEM_PATH, **env}
            proxy = processes.start(as_unprivileged(command, low_ports=True), root / "proxy.log", env=env)
            # Started with a certificate in place, the entrypoint chose the HTTPS mode at once.
            wait_ready(proxy, lambda: served_certificate(443, server_name=DOMAIN) is not None)
            yield Edge(frontend, ca, root)
        finally:
            processes.stop_all()


def test_observatory_grades_the_edge_a_plus_with_no_failed_test(edge: Edge, record_property: RecordProperty) -> None:
    """A+, and no failed test: a missing header fails its test while bonus points may keep the grade."""
    preload = edge.root / "resolve-to-loopback.cjs"
    preload.write_text(RESOLVE_TO_LOOPBACK)
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": str(edge.root),
        "NODE_EXTRA_CA_CERTS": str(edge.ca),
        "NODE_OPTIONS": f"--require {preload}",
        "LOOPBACK_NAME": DOMAIN,
    }
    scanner = OBSERVATORY / "src/scan.js"
    assert scanner.exists(), f"{scanner} is missing: tests/run.sh installs it"
    result = subprocess.run(["node", scanner, DOMAIN], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr  # e.g. {"error": "The site seems to be down."}
    report = json.loads(result.stdout)
    scan, tests = report["scan"], report["tests"]
    lines = [f"MDN HTTP Observatory: grade {scan['grade']}, score {scan['score']}/100, "
             f"{scan['testsPassed']} of {scan['testsQuantity']} tests passed"]  # fmt: skip
    lines += [f"  {'pass' if test['pass'] else 'FAIL'} {name}: {test['result']} ({test['scoreModifier']:+d})"
              for name, test in tests.items()]  # fmt: skip
    record_property(GRADE, "\n".join(lines))  # printed at the end (conftest.py)
    failed = {name: test["result"] for name, test in tests.items() if not test["pass"]}
    assert scan["grade"] == "A+" and not failed, failed


def test_sslyze_finds_the_edge_compliant_with_mozilla_intermediate(edge: Edge, record_property: RecordProperty) -> None:
    """Every check of the profile, none excused: certificate trust passes because the test CA is
    handed to sslyze (--certinfo_ca_file: a trust store of its own beside Mozilla's and the
    others), and the certificate is as short-lived and of the same key type as Let's Encrypt's."""
    target = f"{DOMAIN}:443{{127.0.0.1}}"  # SNI and certificate name DOMAIN, connecting to 127.0.0.1
    command = [sys.executable, "-m", "sslyze", "--mozilla_config=intermediate", f"--certinfo_ca_file={edge.ca}", target]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    compliance = result.stdout.partition("COMPLIANCE AGAINST TLS CONFIGURATION")[2]
    verdict = compliance[max(compliance.find(f"{DOMAIN}:443:"), 0) :].strip()  # the verdict and any issues
    record_property(GRADE, f"sslyze --mozilla_config=intermediate: {verdict}")
    assert result.returncode == 0 and verdict == f"{DOMAIN}:443: OK - Compliant.", f"{verdict}\n\n{result.stdout}{result.stderr}"
