"""Applying the template to an existing repository renders infrastructure and keeps the user's code."""

from pathlib import Path

from conftest import copier_cli, render

USER_FILES = {
    "backend/app/main.py": "from fastapi import FastAPI\n\napp = FastAPI()  # mine\n",
    "backend/requirements.txt": "fastapi==0.100.0  # mine\nuvicorn==0.30.0\n",
    "frontend/src/main.js": "console.log('mine');\n",
    "frontend/index.html": "<!doctype html><title>mine</title>\n",
    "frontend/package.json": '{"name": "mine", "private": true, "scripts": {"build": "vite build"}}\n',
}


def test_copy_into_existing_repo_keeps_user_code(tmp_path: Path) -> None:
    project = tmp_path / "repo"
    for name, content in USER_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)
    render(project, frontend="spa")
    for name, content in USER_FILES.items():
        assert (project / name).read_text() == content, f"{name} was overwritten"
    assert (project / "backend" / "Dockerfile").is_file()
    assert (project / "compose.yaml").is_file()


def test_existing_app_mode_renders_infrastructure_only(tmp_path: Path) -> None:
    project = render(tmp_path / "p", backend="existing", asgi_app="service.api:application")
    assert not (project / "backend" / "app").exists()
    assert not (project / "backend" / "requirements.txt").exists()
    assert "APP_MODULE=service.api:application" in (project / "backend" / "Dockerfile").read_text()


def test_user_owned_files_survive_a_second_copy(tmp_path: Path) -> None:
    project = render(tmp_path / "p", frontend="spa")
    edits = {
        ".env": "BACKEND_MEMORY=3G\n",
        "compose.override.yaml": 'services:\n  backend:\n    environment:\n      FEATURE_X: "1"\n',
        "nginx/locations.d/extra.conf": 'location = /robots.txt { return 200 "User-agent: *\\n"; }\n',
        "backend/app/main.py": "# edited\n",
    }
    for name, content in edits.items():
        (project / name).write_text(content)
    result = copier_cli(project, "--overwrite")
    assert result.returncode == 0, result.stderr
    for name, content in edits.items():
        assert (project / name).read_text() == content, f"{name} was overwritten"
