"""Self-hosted proxy + certbot against a real ACME server (pebble), all on 127.0.0.1, non-root.

The proxy starts without a certificate, serves the ACME webroot, certbot (the rendered
entrypoint logic) obtains a certificate, the proxy switches to HTTPS by itself, and after a
forced renewal serves the new certificate: nobody signals it, there is no Docker socket.
"""

import http.client
import json
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from servers import (
    Processes,
    as_unprivileged,
    dns_answers,
    free_port,
    http_status,
    server_root,
    wait_ready,
    wait_until,
    writable_by_server,
)
from test_e2e_nginx import SECURITY_HEADERS, fetch, start_backend

from conftest import compose_model, healthcheck_argv, outside_the_image, render, run, self_signed_certificate
from nginx_stage import stage, stage_entrypoint

pytestmark = pytest.mark.e2e

DOMAIN = "app.example.org"
EXTRA_NAMES = ["www.app.example.org", "app.example.net"]  # the extra_domains answer
AS_DOMAIN = {"Host": DOMAIN}
SYSTEM_PATH = "/usr/sbin:/usr/bin:/bin"


@dataclass
class Acme:
    directory: str
    ca_bundle: Path


def start_pebble(processes: Processes, root: Path, http_port: int) -> Acme:
    """pebble with its own TLS certificate, resolving every name to 127.0.0.1 through challtestsrv."""
    self_signed_certificate(root / "pebble.key", root / "pebble.pem")
    dns_port, acme_port = free_port(), free_port()
    dns = processes.start(
        [
            "pebble-challtestsrv",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            f"127.0.0.1:{dns_port}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            f"127.0.0.1:{free_port()}",
        ],
        root / "challtestsrv.log",
    )
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{free_port()}",
            "certificate": str(root / "pebble.pem"),
            "privateKey": str(root / "pebble.key"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    (root / "pebble.json").write_text(json.dumps(config))
    env = {"PATH": SYSTEM_PATH, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0", "PEBBLE_WFE_NONCEREJECT": "0"}
    pebble = processes.start(
        ["pebble", "-config", root / "pebble.json", "-dnsserver", f"127.0.0.1:{dns_port}"], root / "pebble.log", env=env
    )
    wait_ready(dns, lambda: dns_answers(dns_port, DOMAIN))
    wait_ready(pebble, lambda: http_status(acme_port, "/dir", cafile=root / "pebble.pem") == 200)
    return Acme(f"https://127.0.0.1:{acme_port}/dir", root / "pebble.pem")


def served_certificate(port: int, server_name: str = DOMAIN) -> x509.Certificate | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    except OSError:
        return None


def https_get(port: int, path: str, host: str = DOMAIN, sni: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET over TLS with this Host header, and this SNI name (the Host's name unless given)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection(sni or host, port, timeout=10, context=context)
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=sni or host)
    conn.request("GET", path, headers={"Host": host})
    response = conn.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return result


def tls_handshake(port: int, version_flag: str, *options: str) -> str | None:
    """openssl s_client with the client's floor lowered, so only the server can refuse old TLS;
    its report of the session, or None if the handshake failed."""
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            DOMAIN,
            version_flag,
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            *options,
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout if result.returncode == 0 and "Cipher is (NONE)" not in result.stdout else None


def tls_handshake_succeeds(port: int, version_flag: str, *options: str) -> bool:
    return tls_handshake(port, version_flag, *options) is not None


@dataclass
class Proxy:
    root: Path
    project: Path
    http_port: int
    https_port: int
    backend: int


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[Proxy, Processes]]:
    project = render(
        tmp_path / "p",
        proxy_mode="nginx-certbot",
        frontend="none",
        domain=DOMAIN,
        extra_domains=",".join(EXTRA_NAMES),
        email="ops@example.org",
    )
    processes = Processes()
    with server_root("acme") as root:
        try:
            http_port, https_port = free_port(), free_port()
            backend = start_backend(processes, root, project)
            conf = stage(
                project,
                "proxy",
                root,
                upstreams={"backend": f"127.0.0.1:{backend}"},
                ports={8080: http_port, 8443: https_port},
            )
            for path in ("tmp", "logs", "etc/letsencrypt", "etc/tls", "var/www/certbot"):  # tmpfs and named volumes
                writable_by_server(root / path)
            entrypoint, staged = stage_entrypoint(project, "proxy", root)
            env = {
                **staged,  # NGINX_DIR, TLS_DIR, NGINX_TMP_DIR, NGINX_SETTINGS_SCRIPT under root
                "PATH": SYSTEM_PATH,
                "NGINX_ACTIVE_DIR": str(root / "tmp/nginx/active"),
                "CERT_POLL_SECONDS": "1",
            }
            nginx = processes.start(
                as_unprivileged(["sh", entrypoint, "nginx", "-e", "stderr", "-c", conf, "-g", "daemon off;"]),
                root / "logs" / "proxy.log",
                env=env,
            )
            wait_ready(nginx, lambda: http_status(http_port, "/health") == 200)
            yield Proxy(root, project, http_port, https_port, backend), processes
        finally:
            processes.stop_all()


def run_certbot(
    proxy: Proxy, acme: Acme, *extra: str, settings: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The rendered certbot entrypoint (one round), as the proxy's user, against pebble, with the
    certbot service's environment from compose.yaml (names, e-mail), changed by settings."""
    entrypoint = shutil.copy(proxy.project / "certbot" / "entrypoint.sh", proxy.root / "certbot-entrypoint.sh")
    service = compose_model(proxy.project, "compose.yaml")["services"]["certbot"]["environment"]
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": str(proxy.root / "tmp"),
        "REQUESTS_CA_BUNDLE": str(acme.ca_bundle),
        **{name: service[name] for name in ("CERTBOT_DOMAIN", "CERTBOT_EXTRA_DOMAINS", "CERTBOT_EMAIL")},
        **(settings or {}),
        "CERTBOT_SERVER": acme.directory,
        "CERTBOT_CONFIG_DIR": str(proxy.root / "etc/letsencrypt"),
        "CERTBOT_TLS_DIR": str(proxy.root / "etc/tls"),
        "CERTBOT_WORK_DIR": str(proxy.root / "tmp/certbot-work"),
        "CERTBOT_LOGS_DIR": str(proxy.root / "tmp/certbot-logs"),
        "CERTBOT_WEBROOT": str(proxy.root / "var/www/certbot"),
        "CERTBOT_ONESHOT": "1",
    }
    command = ["sh", entrypoint] if not extra else ["certbot", *extra]
    return subprocess.run(as_unprivileged(command), env=env, capture_output=True, text=True, timeout=180)


def proxy_mounts_no_certbot_state(project: Path) -> bool:
    """In compose.yaml, the proxy shares with certbot only volumes certbot does not keep its
    configuration (account key, renewal settings, archive) in, and mounts them read-only."""
    services = compose_model(project, "compose.yaml")["services"]
    certbot_dir = services["certbot"]["environment"].get("CERTBOT_CONFIG_DIR", "/etc/letsencrypt")
    certbot = {v["source"]: v["target"] for v in services["certbot"]["volumes"] if v["type"] == "volume"}
    proxy = [v for v in services["proxy"]["volumes"] if v["type"] == "volume"]
    return all(v.get("read_only") and certbot.get(v["source"]) != certbot_dir for v in proxy)


def test_acme_proxy_starts_without_certificate_obtains_one_and_follows_renewal(proxy: tuple[Proxy, Processes]) -> None:
    p, processes = proxy
    acme = start_pebble(processes, p.root, p.http_port)

    # 1. No certificate yet: ACME challenges and /health work, the rest says so, no HTTPS.
    probe = p.root / "var/www/certbot/.well-known/acme-challenge/probe"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("token-probe")
    writable_by_server(p.root / "var/www/certbot")  # the webroot volume belongs to certbot's user
    assert fetch(p.http_port, "/.well-known/acme-challenge/probe", headers=AS_DOMAIN).body == b"token-probe"
    assert fetch(p.http_port, "/health").status == 200
    assert fetch(p.http_port, "/", headers=AS_DOMAIN).status == 503
    assert served_certificate(p.https_port) is None
    master = (p.root / "tmp/nginx.pid").read_text()

    # 2. certbot obtains a certificate over http-01 through the proxy's webroot.
    result = run_certbot(p, acme)
    assert result.returncode == 0, result.stdout + result.stderr
    first = wait_until(lambda: served_certificate(p.https_port), timeout=20)
    assert first is not None, "the proxy never switched to HTTPS"
    assert DOMAIN in str(first.subject) + str(first.extensions)

    # The proxy sees the certificate chain and its key, and nothing else of certbot's: no account
    # key, no renewal configuration, no archive of past keys.
    assert proxy_mounts_no_certbot_state(p.project)
    view = p.root / "etc/tls"  # what the proxy mounts (/etc/tls, read-only)
    assert sorted(f.name for f in view.iterdir()) == ["fullchain.pem", "privkey.pem"]
    assert stat.S_IMODE((view / "privkey.pem").stat().st_mode) == 0o600
    assert first == x509.load_pem_x509_certificate((view / "fullchain.pem").read_bytes())

    # 2b. A project updated from a version without the tls volume: certbot's live/ certificate, an
    # empty tls volume (the proxy is back to "pending"). certbot's next start fills it from live/,
    # without a new issuance, and the proxy serves the same certificate again after a reload.
    for published in view.iterdir():
        published.unlink()
    assert wait_until(lambda: served_certificate(p.https_port) is None, timeout=20), "HTTPS stayed up without files"
    restart = run_certbot(p, acme)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    again = wait_until(lambda: served_certificate(p.https_port), timeout=20)
    assert again is not None and again.serial_number == first.serial_number, "not the existing certificate"
    archive = p.root / "etc/letsencrypt/archive" / DOMAIN
    assert sorted(f.name for f in archive.glob("cert*.pem")) == ["cert1.pem"], "a new certificate was issued"

    # 3. HTTPS serves the app with HSTS; HTTP redirects, except ACME challenges.
    status, headers, body = https_get(p.https_port, "/api/echo")
    assert status == 200 and json.loads(body)["headers"]["x-forwarded-proto"] == "https"
    assert headers["strict-transport-security"] == "max-age=63072000; includeSubDomains"
    assert all(h in headers for h in SECURITY_HEADERS)
    # Old workers finish their connections after a reload: poll until the new mode answers.
    redirect = wait_until(lambda: (r := fetch(p.http_port, "/some/page?q=1", headers=AS_DOMAIN)).status == 301 and r, timeout=10)
    assert redirect and redirect.status == 301 and redirect.headers["location"] == f"https://{DOMAIN}/some/page?q=1"
    assert "strict-transport-security" not in redirect.headers
    assert fetch(p.http_port, "/.well-known/acme-challenge/probe", headers=AS_DOMAIN).body == b"token-probe"

    # Only the configured name reaches the app: another Host is dropped without an answer on
    # HTTP and told it is misdirected on HTTPS; TLS for another name (SNI) is refused outright.
    with pytest.raises(http.client.RemoteDisconnected):
        fetch(p.http_port, "/", headers={"Host": "evil.example"})
    with pytest.raises(ssl.SSLError):
        https_get(p.https_port, "/", host="evil.example")
    assert https_get(p.https_port, "/api/echo", host="evil.example", sni=DOMAIN)[0] == 421
    assert served_certificate(p.https_port, server_name="evil.example") is None
    assert json.loads(https_get(p.https_port, "/api/echo")[2])["headers"]["host"] == DOMAIN

    # 4. Mozilla intermediate: TLS 1.2 and 1.3 only, key exchange over X25519, P-256 or P-384 only.
    assert tls_handshake_succeeds(p.https_port, "-tls1_2")
    assert tls_handshake_succeeds(p.https_port, "-tls1_3")
    assert not tls_handshake_succeeds(p.https_port, "-tls1_1")
    assert not tls_handshake_succeeds(p.https_port, "-tls1")
    for group in ("X25519", "prime256v1", "secp384r1"):
        assert tls_handshake_succeeds(p.https_port, "-tls1_3", "-groups", group), group
    for group in ("X448", "secp521r1"):
        assert not tls_handshake_succeeds(p.https_port, "-tls1_3", "-groups", group), group
    # TLS 1.2 (where the groups also bound the certificate's curve): P-521 offered first, P-256 used.
    tls12 = tls_handshake(p.https_port, "-tls1_2", "-groups", "secp521r1:prime256v1")
    assert tls12 and "Server Temp Key: ECDH, prime256v1" in tls12, tls12

    # 5. A renewal (forced: pebble's certificates last years) is picked up without a signal.
    renewal = run_certbot(
        p,
        acme,
        "renew",
        "--force-renewal",
        "--no-random-sleep-on-renew",
        "--non-interactive",
        "--server",
        acme.directory,
        "--config-dir",
        str(p.root / "etc/letsencrypt"),
        "--work-dir",
        str(p.root / "tmp/certbot-work"),
        "--logs-dir",
        str(p.root / "tmp/certbot-logs"),
    )
    assert renewal.returncode == 0, renewal.stdout + renewal.stderr
    renewed = wait_until(
        lambda: (c := served_certificate(p.https_port)) is not None and c.serial_number != first.serial_number and c,
        timeout=20,
    )
    assert renewed, "the proxy kept serving the old certificate"
    assert sorted(f.name for f in view.iterdir()) == ["fullchain.pem", "privkey.pem"]
    assert (p.root / "tmp/nginx.pid").read_text() == master, "nginx was restarted instead of reloaded"


def certificate_names(certificate: x509.Certificate) -> set[str]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def test_acme_extra_names_join_the_certificate_and_redirect_to_the_domain(proxy: tuple[Proxy, Processes]) -> None:
    """The extra_domains answer: one certificate for every name (an existing one reissued with the
    new names under the same lineage), and a 301 to https://<domain> from each of them."""
    p, processes = proxy
    acme = start_pebble(processes, p.root, p.http_port)
    lineages = p.root / "etc/letsencrypt/live"

    # A certificate from before the names were added: the domain alone.
    result = run_certbot(p, acme, settings={"CERTBOT_EXTRA_DOMAINS": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    first = wait_until(lambda: served_certificate(p.https_port), timeout=20)
    assert first is not None and certificate_names(first) == {DOMAIN}

    # certbot's next round with the rendered names (its restart after `copier update` added
    # them): reissued at once, not due for renewal, with every name, in the same lineage.
    result = run_certbot(p, acme)
    assert result.returncode == 0, result.stdout + result.stderr
    expanded = wait_until(
        lambda: (c := served_certificate(p.https_port)) is not None and c.serial_number != first.serial_number and c,
        timeout=20,
    )
    assert expanded, "the proxy kept serving the certificate without the extra names"
    assert certificate_names(expanded) == {DOMAIN, *EXTRA_NAMES}
    assert sorted(path.name for path in lineages.iterdir() if path.is_dir()) == [DOMAIN]
    # The same names again: nothing to do until the certificate is due.
    assert run_certbot(p, acme).returncode == 0
    archive = p.root / "etc/letsencrypt/archive" / DOMAIN
    assert sorted(f.name for f in archive.glob("cert*.pem")) == ["cert1.pem", "cert2.pem"]

    for name in EXTRA_NAMES:
        # TLS for the name shows the shared certificate; every request is sent to the domain.
        served = served_certificate(p.https_port, server_name=name)
        assert served is not None and served.serial_number == expanded.serial_number, name
        status, headers, _ = https_get(p.https_port, "/some/page?q=1", host=name)
        assert status == 301 and headers["location"] == f"https://{DOMAIN}/some/page?q=1", (name, status, headers)
        assert headers["strict-transport-security"] == "max-age=63072000; includeSubDomains"
        assert all(h in headers for h in SECURITY_HEADERS)
        redirect = fetch(p.http_port, "/other?x=2", headers={"Host": name})
        assert redirect.status == 301 and redirect.headers["location"] == f"https://{DOMAIN}/other?x=2", name
        # Over HTTP the name still serves ACME challenges (how it got onto the certificate).
        probe = p.root / "var/www/certbot/.well-known/acme-challenge" / f"probe-{name}"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(name)
        assert fetch(p.http_port, f"/.well-known/acme-challenge/probe-{name}", headers={"Host": name}).body == name.encode()
    # The canonical name serves the app; an unknown one is still refused, on both ports.
    assert json.loads(https_get(p.https_port, "/api/echo")[2])["headers"]["host"] == DOMAIN
    with pytest.raises(http.client.RemoteDisconnected):
        fetch(p.http_port, "/", headers={"Host": "evil.example"})
    assert served_certificate(p.https_port, server_name="evil.example") is None
    assert https_get(p.https_port, "/", host="evil.example", sni=EXTRA_NAMES[0])[0] == 421


def test_acme_proxy_chain_to_frontend_in_local_test_mode(tmp_path: Path) -> None:
    """compose.test.yaml's proxy (PROXY_HTTP_ONLY=1) -> SPA nginx -> backend: one set of headers."""
    project = render(tmp_path / "p", proxy_mode="nginx-certbot", frontend="spa", domain=DOMAIN)
    run("node", "build.mjs", cwd=project / "frontend")
    processes = Processes()
    with server_root("chain") as root:
        try:
            backend = start_backend(processes, root, project)
            frontend_port, proxy_port = free_port(), free_port()
            front = stage(
                project,
                "frontend",
                root / "front",
                upstreams={"backend": f"127.0.0.1:{backend}"},
                ports={8080: frontend_port},
            )
            shutil.copytree(project / "frontend" / "dist", root / "front/usr/share/nginx/html", dirs_exist_ok=True)
            edge = stage(
                project,
                "proxy",
                root / "edge",
                upstreams={"backend": f"127.0.0.1:{backend}", "frontend": f"127.0.0.1:{frontend_port}"},
                ports={8080: proxy_port},
            )
            for path in ("front/tmp", "edge/tmp", "logs"):
                writable_by_server(root / path)
            entry, staged = stage_entrypoint(project, "proxy", root / "edge")
            base = {"PATH": SYSTEM_PATH}
            front_process = processes.start(
                as_unprivileged(["nginx", "-e", "stderr", "-c", front, "-g", "daemon off;"]),
                root / "logs" / "front.log",
                env=base,
            )
            env = {
                **base,
                **staged,  # NGINX_DIR, TLS_DIR, NGINX_TMP_DIR, NGINX_SETTINGS_SCRIPT under root/edge
                "PROXY_HTTP_ONLY": "1",
                "NGINX_ACTIVE_DIR": str(root / "edge/tmp/nginx/active"),
            }
            proxy_process = processes.start(
                as_unprivileged(["sh", entry, "nginx", "-e", "stderr", "-c", edge, "-g", "daemon off;"]),
                root / "logs" / "edge.log",
                env=env,
            )
            wait_ready(front_process, lambda: http_status(frontend_port, "/health") == 200)
            wait_ready(proxy_process, lambda: http_status(proxy_port, "/health") == 200)

            page = fetch(proxy_port, "/")
            assert page.status == 200 and page.headers["cache-control"] == "no-cache"
            # The SPA's directory redirect reaches the client relative: no internal host or port.
            redirect = fetch(proxy_port, "/assets", headers={"Host": DOMAIN})
            assert redirect.status == 301 and redirect.headers["location"] == "/assets/"
            # A client's claimed address is replaced at the edge, and the SPA nginx behind it passes
            # on what the edge saw: the backend gets the real client address, once.
            echo = fetch(proxy_port, "/api/echo", headers={"X-Forwarded-For": "198.51.100.9", "X-Real-IP": "198.51.100.9"})
            seen = json.loads(echo.body)["headers"]
            assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-real-ip"] == "127.0.0.1"
            assert json.loads(echo.body)["client"] == "127.0.0.1"
            assert seen["x-forwarded-proto"] == "http"
            # Every header exactly once through both nginx servers (each sets the security headers
            # and may compress), on pages, assets, redirects, errors, the API and /health.
            script = next((project / "frontend/dist/assets").glob("main.*.js")).name
            gzip = {"Accept-Encoding": "gzip"}
            requests = [("/", {}), ("/", gzip), (f"/assets/{script}", gzip), (f"/assets/{script}", {}), ("/assets", {}),
                        ("/assets/missing.js", gzip), ("/api/echo", gzip), ("/health", {})]  # fmt: skip
            for path, headers in requests:
                response = fetch(proxy_port, path, headers=headers)
                assert not response.repeated_headers(), f"{path} {headers}: {response.header_list}"
                assert all(h in response.headers for h in SECURITY_HEADERS), f"{path}: {response.header_list}"
        finally:
            processes.stop_all()


def test_certbot_healthcheck_wants_a_certificate_valid_for_14_more_days(tmp_path: Path) -> None:
    """certbot's healthcheck from the rendered Compose model, against real certificate files."""
    project = render(tmp_path / "p", proxy_mode="nginx-certbot", frontend="none", domain=DOMAIN)
    certbot = compose_model(project, "compose.yaml")["services"]["certbot"]
    check = outside_the_image(healthcheck_argv(certbot), project / "certbot" / "Dockerfile")
    config_dir = tmp_path / "letsencrypt"  # the letsencrypt volume
    env = {**certbot["environment"], "PATH": SYSTEM_PATH, "CERTBOT_CONFIG_DIR": str(config_dir)}

    def healthy() -> bool:
        return subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0

    assert not healthy(), "healthy without a certificate"
    live = config_dir / "live" / DOMAIN
    live.mkdir(parents=True)
    for days, expected in ((15, True), (13, False)):
        run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days",
            str(days), "-subj", f"/CN={DOMAIN}", "-keyout", live / "privkey.pem", "-out", live / "fullchain.pem")  # fmt: skip
        assert healthy() == expected, f"certificate valid for {days} more days"
