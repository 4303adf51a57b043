"""The SPA's runtime configuration is written at start into the tmpfs and cannot be injected."""

import subprocess
from pathlib import Path

import pytest

from conftest import render
from nginx_stage import stage_entrypoint


@pytest.fixture(scope="module")
def entrypoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("spa") / "p", frontend="spa") / "frontend" / "docker" / "entrypoint.sh"


def start(entrypoint: Path, runtime_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    staged, nginx = stage_entrypoint(entrypoint.parents[2], "frontend", runtime_dir)
    return subprocess.run(
        ["sh", str(staged), "echo", "started"],
        env={"PATH": "/usr/bin:/bin", **nginx, "RUNTIME_CONFIG_DIR": str(runtime_dir), **env},
        capture_output=True,
        text=True,
    )


def test_runtime_config_is_written_then_command_runs(entrypoint: Path, tmp_path: Path) -> None:
    result = start(entrypoint, tmp_path, API_BASE_URL="https://api.example.org/v1", WS_URL="/socket", APP_ENV="staging")
    assert result.returncode == 0 and result.stdout.strip() == "started"
    config = (tmp_path / "config.js").read_text()
    assert '"apiBaseUrl": "https://api.example.org/v1"' in config
    assert '"wsUrl": "/socket"' in config and '"environment": "staging"' in config


@pytest.mark.parametrize("value", ['x"});alert(1);//', "</script><script>alert(1)</script>", "a b", "$(id)", "a\nb"])
def test_runtime_config_refuses_injection(entrypoint: Path, tmp_path: Path, value: str) -> None:
    result = start(entrypoint, tmp_path, API_BASE_URL=value)
    assert result.returncode == 1
    assert "API_BASE_URL may only contain" in result.stderr
    assert not (tmp_path / "config.js").exists() and "started" not in result.stdout


@pytest.mark.parametrize("value", ["10r/s; allow all", "-1", "1.5", "$(id)"])
def test_rate_limit_refuses_anything_but_a_whole_number(entrypoint: Path, tmp_path: Path, value: str) -> None:
    """The rate and per-client limits become nginx directives: nothing else can get in."""
    for name in ("API_RATE_LIMIT", "API_RATE_BURST", "CLIENT_CONNECTION_LIMIT", "CLIENT_TIMEOUT"):
        result = start(entrypoint, tmp_path, **{name: value})
        assert result.returncode == 1 and "started" not in result.stdout
        assert f"{name} must be a whole number" in result.stderr
        assert not list((tmp_path / "tmp" / "nginx").glob("*limit*"))


def test_client_timeout_of_zero_is_refused(entrypoint: Path, tmp_path: Path) -> None:
    """nginx reads 0s as no wait at all: every request would time out."""
    result = start(entrypoint, tmp_path, CLIENT_TIMEOUT="0")
    assert result.returncode == 1 and "CLIENT_TIMEOUT must be at least 1" in result.stderr
    assert not list((tmp_path / "tmp" / "nginx").glob("*limit*"))
