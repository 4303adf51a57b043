"""Bad answers: a clear one-line message naming the field, non-zero exit, nothing written."""

from pathlib import Path

import pytest

from conftest import compose_model, copier_cli, render

# (answers, the start of the message the user sees)
BAD_ANSWERS = [
    ({"project_name": "x\ny: 1"}, "project_name: must start with a letter"),
    ({"project_name": "{{ 7*7 }}"}, "project_name: must start with a letter"),
    ({"project_slug": "My-App"}, "project_slug: must be 2-40 characters"),
    ({"project_slug": "a; rm -rf /"}, "project_slug: must be 2-40 characters"),
    ({"description": 'say "hi"; $(reboot)'}, "description: only letters"),
    ({"description": "line\nbreak"}, "description: only letters"),
    ({"domain": "example.org; return 200"}, "domain: must be a lowercase fully-qualified"),
    ({"domain": "example.org\n"}, "domain: must be a lowercase fully-qualified"),
    ({"domain": "localhost"}, "domain: must be a lowercase fully-qualified"),
    ({"domain": "Example.ORG"}, "domain: must be a lowercase fully-qualified"),
    ({"domain": "*.example.org"}, "domain: must be a lowercase fully-qualified"),
    ({"domain": "-bad.example.org"}, "domain: must be a lowercase fully-qualified"),
    ({"extra_domains": "www.app.example.org; return 200"}, "extra_domains: must be comma-separated lowercase"),
    ({"extra_domains": "www.app.example.org\nserver_name evil.org"}, "extra_domains: must be comma-separated lowercase"),
    ({"extra_domains": "www.app.example.org, app.example.net"}, "extra_domains: must be comma-separated lowercase"),
    ({"extra_domains": "www.app.example.org,"}, "extra_domains: must be comma-separated lowercase"),
    ({"extra_domains": "*.app.example.org"}, "extra_domains: must be comma-separated lowercase"),
    ({"extra_domains": "WWW.app.example.org"}, "extra_domains: must be comma-separated lowercase"),
    ({"extra_domains": "$(reboot).example.org"}, "extra_domains: must be comma-separated lowercase"),
    ({"extra_domains": "localhost"}, "extra_domains: must be comma-separated lowercase"),
    ({"extra_domains": "www.app.example.org,app.example.org"}, "extra_domains: app.example.org is the domain itself"),
    ({"extra_domains": "a.example.org,b.example.org,a.example.org"}, "extra_domains: each name may appear only once"),
    ({"extra_domains": ",".join(f"n{i}.example.org" for i in range(21))}, "extra_domains: at most 20 names"),
    ({"email": "Admin <admin@example.org>"}, "email: must be a plain address"),
    ({"email": "admin@example.org\nBcc: x@y.org"}, "email: must be a plain address"),
    ({"email": "admin"}, "email: must be a plain address"),
    ({"backend": "existing", "asgi_app": "app.main:app; import os"}, "asgi_app: must look like"),
    ({"backend": "existing", "asgi_app": "app.main"}, "asgi_app: must look like"),
    ({"python_version": "3.12; echo"}, "python_version: must be 3.11 or newer"),
    ({"python_version": "2.7"}, "python_version: must be 3.11 or newer"),
    ({"node_version": "latest"}, "node_version: must be a Node.js major version"),
    ({"services": ["celery_worker"]}, "services: celery needs redis"),
    ({"services": ["postgres", "celery_beat"]}, "services: celery needs redis"),
    ({"services": ["redis", "celery_worker"], "celery_queues": "default,Long"}, "celery_queues: must be 1-8"),
    ({"services": ["redis", "celery_worker"], "celery_queues": "a,a"}, "celery_queues: queue names must be unique"),
    ({"services": ["redis", "celery_worker"], "celery_queues": "default;touch x"}, "celery_queues: must be 1-8"),
    ({"backend": "existing", "services": ["redis", "celery_beat"], "celery_app": "app:x:y"}, "celery_app: must look like"),
    (
        {"backend": "existing", "services": ["postgres"], "migrate_command": "alembic upgrade head; rm -rf /"},
        "migrate_command: must be",
    ),
    ({"backend": "existing", "services": ["postgres"], "migrate_command": "sh -c 'x'"}, "migrate_command: must be"),
    ({"backend": "existing", "services": ["postgres"], "migrate_command": "alembic  upgrade"}, "migrate_command: must be"),
    ({"backend": "existing", "services": ["postgres"], "migrate_command": "alembic\nupgrade"}, "migrate_command: must be"),
    ({"backend": "existing", "services": ["postgres"], "migrate_command": "${HOME}/migrate"}, "migrate_command: must be"),
    ({"backend": "existing", "backend_context": "../secrets"}, "backend_context: must be up to 32 paths"),
    ({"backend": "existing", "backend_context": ".env"}, "backend_context: must be up to 32 paths"),
    ({"backend": "existing", "backend_context": "templates/../../x"}, "backend_context: must be up to 32 paths"),
    ({"backend": "existing", "backend_context": "*"}, "backend_context: must be up to 32 paths"),
    ({"backend": "existing", "backend_context": "!secrets"}, "backend_context: must be up to 32 paths"),
    ({"backend": "existing", "backend_context": "/etc"}, "backend_context: must be up to 32 paths"),
    ({"backend": "existing", "backend_context": "a  b"}, "backend_context: must be up to 32 paths"),
    ({"backend": "existing", "backend_context": "manage.py\n**"}, "backend_context: must be up to 32 paths"),
    ({"proxy_mode": "npm", "npm_network": "net work"}, "npm_network: must be a Docker network name"),
    ({"proxy_mode": "npm", "npm_network": "null"}, "npm_network: 'null' reads as a YAML keyword"),
    ({"proxy_mode": "npm", "npm_network": "Yes"}, "npm_network: 'Yes' reads as a YAML keyword"),
    ({"project_slug": "true"}, "project_slug: 'true' reads as a YAML keyword"),
    ({"cors_origins": "*"}, "cors_origins: '*' is not an exact origin"),
    ({"cors_origins": "https://a.example.org/path"}, "cors_origins: 'https://a.example.org/path' is not an exact origin"),
    ({"cors_origins": "https://a.example.org, https://b.example.org"}, "is not an exact origin"),
    ({"cors_origins": "https://ok.example.org,javascript://x"}, "cors_origins: 'javascript://x' is not an exact origin"),
    ({"postgres_version": "17-alpine"}, "postgres_version: must be a PostgreSQL major version"),
    ({"redis_version": "latest"}, "redis_version: must be a Redis version"),
    ({"redis_version": "6.2"}, "redis_version: must be a Redis version from 7 on"),
    ({"redis_version": "6"}, "redis_version: must be a Redis version from 7 on"),
    ({"nginx_version": "1.27;"}, "nginx_version: must be an nginx version"),
    ({"host_memory_gb": "0"}, "host_memory_gb: must be a whole number of GB"),
    ({"host_memory_gb": "1.5"}, "host_memory_gb: must be a whole number of GB"),
    ({"host_memory_gb": "2; reboot"}, "host_memory_gb: must be a whole number of GB"),
    (
        {"services": ["postgres", "redis", "celery_worker"], "celery_queues": "q1,q2,q3,q4,q5,q6,q7,q8", "host_memory_gb": "2"},
        "host_memory_gb: 2 GB leaves 1536 MiB for the containers, and these services need at least",
    ),
    ({"host_cpus": "0"}, "host_cpus: must be a whole number of CPUs"),
    ({"host_cpus": "two"}, "host_cpus: must be a whole number of CPUs"),
    ({"proxy_mode": "traefik"}, "Invalid choice"),
    ({"trivy_severity": "LOW"}, "Invalid choice"),
]


@pytest.mark.parametrize(("answers", "message"), BAD_ANSWERS, ids=[str(a) for a, _ in BAD_ANSWERS])
def test_bad_answer_is_rejected_and_writes_nothing(answers: dict, message: str, tmp_path: Path) -> None:
    destination = tmp_path / "project"
    with pytest.raises(ValueError) as error:
        render(destination, **answers)
    assert message in str(error.value)
    assert not destination.exists()


def test_good_edge_answers_are_accepted(tmp_path: Path) -> None:
    project = render(
        tmp_path / "project",
        project_name="A.b_c-d 1",
        domain="xn--bcher-kva.example.co.uk",
        extra_domains="www.xn--bcher-kva.example.co.uk,example-2.org",
        email="ops+alerts@example.org",
        cors_origins="https://app.example.org,http://localhost:5173",
        services=["redis", "celery_worker"],
        celery_queues="default,long_running,q3",
        redis_version="8.0",
    )
    assert "worker_long_running:" in (project / "compose.yaml").read_text()
    assert (project / ".copier-answers.yml").read_text().count("www.xn--bcher-kva.example.co.uk,example-2.org") == 1


def test_answers_that_look_like_yaml_syntax_stay_strings(tmp_path: Path) -> None:
    """Valid answers that YAML would misread unquoted ('%' starts a directive, 'n' is a
    boolean in YAML 1.1): every Compose value keeps the exact text."""
    project = render(tmp_path / "p", proxy_mode="nginx-certbot", email="%x@example.org", project_slug="n1")
    model = compose_model(project, "compose.yaml")
    assert model["name"] == "n1"
    assert model["services"]["certbot"]["environment"]["CERTBOT_EMAIL"] == "%x@example.org"
    npm = render(tmp_path / "npm", proxy_mode="npm", npm_network="0x1F")
    assert compose_model(npm, "compose.yaml")["networks"]["npm"]["name"] == "0x1F"


def test_cli_prints_one_line_message_and_exits_non_zero(tmp_path: Path) -> None:
    destination = tmp_path / "project"
    result = copier_cli(destination, "--data", "domain=evil.org;include /etc/passwd")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "domain: must be a lowercase fully-qualified domain name" in last_line
    assert not destination.exists()


def test_host_memory_default_is_a_small_vps_or_the_least_the_services_fit_in(tmp_path: Path) -> None:
    """Without an answer: 2 GB, unless the chosen services need more (then the smallest that fits),
    so `--defaults` (and `copier update` adding the question) never stops on it."""
    small = render(tmp_path / "small", tasks=False)
    assert "host_memory_gb: '2'" in (small / ".copier-answers.yml").read_text()
    queues = "q1,q2,q3,q4,q5,q6,q7,q8"
    big = render(tmp_path / "big", tasks=False, services=["postgres", "redis", "celery_worker"], celery_queues=queues)
    assert "host_memory_gb: '3'" in (big / ".copier-answers.yml").read_text()
