"""A real container registry on 127.0.0.1 for the digest tests and the benchmark.

- `Registry`: Debian's docker-registry (CNCF Distribution 2.8), optionally with token
  authentication backed by `TokenServer` (a tiny JWT issuer the registry trusts).
- `push_image`: builds a tiny image in memory (OCI index, Docker manifest list or a single
  manifest) and pushes it over the registry HTTP API; no container engine needed.
- `FaultProxy`: forwards to the registry, adding latency or faults (429s, a missing
  Docker-Content-Digest header, hanging, redirecting elsewhere) and counting requests.

TokenServer and FaultProxy run in this process: their socket listens before the constructor
returns, so they answer from then on (no start-up to wait for, nothing left behind at exit).
The registry is a server process: started, waited for and ended through tests/servers.py.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import http.server
import io
import json
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from servers import end_server, free_port, http_status, start_server, wait_ready

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues RS256 JWTs granting what was asked, signed by a key whose certificate the registry trusts.

    tls: (certificate, key) to serve https with instead of http."""

    def __init__(
        self, directory: Path, service: str = "test-registry", issuer: str = "test-issuer", tls: tuple[Path, Path] | None = None
    ) -> None:
        self.service, self.issuer = service, issuer
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-signer")])
        now = time.time()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - 3600))
            .not_valid_after(_utc(now + 86400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests = 0
        self.authorizations: list[str | None] = []  # the Authorization header of each request
        self.deny = False
        self.port = free_port()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                server.authorizations.append(self.headers.get("Authorization"))
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                if server.deny:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": server.token(query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/token"

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": "tester",
            "aud": self.service,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": f"{now}-{self.requests}",
            "access": access,
        }
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _utc(timestamp: float):
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC)


class Registry:
    """docker-registry serving on 127.0.0.1; with a TokenServer it demands bearer tokens.

    namespace: serve on `address` inside that network namespace instead (for engines that run in
    network namespaces of their own, tests/swarm_cluster.py)."""

    def __init__(
        self,
        directory: Path,
        tokens: TokenServer | None = None,
        realm: str | None = None,
        namespace: str | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        self.port = free_port() if namespace is None else 5000  # nothing else listens in a namespace of its own
        self.address = address
        self.tokens = tokens
        config = {
            "version": 0.1,
            "log": {"level": "error"},
            "storage": {"filesystem": {"rootdirectory": str(directory / "storage")}, "delete": {"enabled": True}},
            "http": {"addr": f"{address}:{self.port}", "secret": "test-only-secret"},
        }
        if tokens:
            config["auth"] = {
                "token": {
                    "realm": realm or tokens.realm,
                    "service": tokens.service,
                    "issuer": tokens.issuer,
                    "rootcertbundle": str(tokens.cert_path),
                }
            }
        path = directory / "registry.json"
        path.write_text(json.dumps(config))  # JSON is YAML
        enter = ["nsenter", f"--net=/run/netns/{namespace}"] if namespace else []
        self.process = start_server([*enter, "docker-registry", "serve", path], directory / "registry.log")
        # The API root answers 200, or 401 with a token challenge when tokens are required.
        expected = 401 if tokens else 200
        if namespace:
            probe = [*enter, "curl", "--silent", "--output", "/dev/null", "--write-out", "%{http_code}", f"{self.url}/v2/"]
            wait_ready(self.process, lambda: subprocess.run(probe, capture_output=True, text=True).stdout == str(expected))
        else:
            wait_ready(self.process, lambda: http_status(self.port, "/v2/") == expected)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def auth_header(self, repository: str) -> dict[str, str]:
        if not self.tokens:
            return {}
        return {"Authorization": f"Bearer {self.tokens.token([f'repository:{repository}:pull,push'])}"}

    def close(self) -> None:
        end_server(self.process)


def _layer(seed: str) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = f"hello from {seed}\n".encode()
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def push_image(registry: Registry, repository: str, tag: str, kind: str = "oci-index", seed: str = "") -> str:
    """Build and push a tiny image; return the digest of what the tag points to.

    kind: "oci-index" (multi-arch OCI index), "docker-list" (multi-arch Docker manifest list),
    "single" (one OCI manifest, no index)."""
    docker = kind == "docker-list"
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    children = []
    for os_name, arch in PLATFORMS[: 1 if kind == "single" else 2]:
        tar = _layer(f"{repository}:{tag}:{seed}:{arch}")
        layer = gzip.compress(tar, mtime=0)
        config = json.dumps(
            {"architecture": arch, "os": os_name, "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]}}
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json"
                    if docker
                    else "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"
                        if docker
                        else "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": sha256(layer),
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        for blob in (layer, config):
            _put_blob(registry, repository, blob)
        digest = _put_manifest(registry, repository, sha256(manifest), manifest, manifest_type)
        children.append(
            {
                "mediaType": manifest_type,
                "digest": digest,
                "size": len(manifest),
                "platform": {"os": os_name, "architecture": arch},
            }
        )
    if kind == "single":
        return _put_manifest(registry, repository, tag, manifest, manifest_type)
    index_type = DOCKER_LIST if docker else OCI_INDEX
    index = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": children}).encode()
    return _put_manifest(registry, repository, tag, index, index_type)


def _request(
    registry: Registry, method: str, url: str, repository: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    request = urllib.request.Request(
        url,
        data=body if method != "POST" else b"",
        method=method,
        headers={**registry.auth_header(repository), **(headers or {})},
    )
    return urllib.request.urlopen(request, timeout=10)


def _put_blob(registry: Registry, repository: str, blob: bytes) -> None:
    with _request(registry, "POST", f"{registry.url}/v2/{repository}/blobs/uploads/", repository) as response:
        location = response.headers["Location"]
    location = urllib.parse.urljoin(registry.url, location)
    separator = "&" if "?" in location else "?"
    url = f"{location}{separator}digest={urllib.parse.quote(sha256(blob))}"
    with _request(registry, "PUT", url, repository, blob, {"Content-Type": "application/octet-stream"}):
        pass


def _put_manifest(registry: Registry, repository: str, reference: str, manifest: bytes, media_type: str) -> str:
    url = f"{registry.url}/v2/{repository}/manifests/{reference}"
    with _request(registry, "PUT", url, repository, manifest, {"Content-Type": media_type}) as response:
        return response.headers["Docker-Content-Digest"]


@dataclass
class Faults:
    """What FaultProxy does to the traffic; changeable while it runs."""

    latency: float = 0.0
    status_first: int | None = None  # answer this status (e.g. 429) to the first `status_count` requests
    status_count: int = 0
    strip_digest_header: bool = False
    hang_seconds: float = 0.0
    redirect_to: str | None = None  # answer 307 to this URL + the request's path
    log: list[tuple[str, str, int, int]] = field(default_factory=list)  # method, path, status, bytes


class FaultProxy:
    """HTTP proxy in front of a registry (or token server) that injects latency and faults."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        self.upstream = urllib.parse.urlparse(upstream)
        self.faults = faults or Faults()
        self.port = free_port()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self.forward()

            def do_GET(self) -> None:
                self.forward()

            def forward(self) -> None:
                f = proxy.faults
                time.sleep(f.latency + f.hang_seconds)
                with proxy.lock:
                    injected = f.status_first if f.status_count > 0 else None
                    if injected:
                        f.status_count -= 1
                if f.redirect_to:
                    f.log.append((self.command, self.path, 307, 0))
                    self.send_response(307)
                    self.send_header("Location", f.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if injected:
                    f.log.append((self.command, self.path, injected, 0))  # before answering: no race
                    self.send_response(injected)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=10)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request(self.command, self.path, headers=headers)
                    response = conn.getresponse()
                    body = response.read()
                    conn.close()
                except OSError:  # upstream gone (e.g. the test is over)
                    self.send_error(502)
                    return
                f.log.append((self.command, self.path, response.status, len(body)))
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() in ("connection", "transfer-encoding", "content-length"):
                        continue
                    if f.strip_digest_header and key.lower() == "docker-content-digest":
                        continue
                    self.send_header(key, value.replace(f"{proxy.upstream.netloc}", f"127.0.0.1:{proxy.port}"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
