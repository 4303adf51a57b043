"""The API's CORS origins follow the domain answer through `copier update`."""

from pathlib import Path

import pytest

from conftest import TEMPLATE, commit, compose_model, copier, release, run

pytestmark = pytest.mark.e2e


def cors(project: Path) -> list[str]:
    return compose_model(project, "compose.yaml")["services"]["backend"]["environment"]["CORS_ORIGINS"].split(",")


def test_changing_the_domain_moves_the_cors_origin_and_says_what_else_is_allowed(tmp_path: Path) -> None:
    template = tmp_path / "template"
    release(TEMPLATE, template, "v1.0.0")
    project = tmp_path / "p"
    copier("copy", "--trust", "--defaults", "--data", "domain=old.example.org", str(template), str(project))
    assert cors(project) == ["https://old.example.org"]
    run("git", "init", "-q", cwd=project)
    commit(project, "generated")

    update = copier("update", "--trust", "--defaults", "--data", "domain=new.example.org", cwd=project)
    assert cors(project) == ["https://new.example.org"]
    assert "cors_origins also allows" not in update.stdout + update.stderr
    commit(project, "moved")

    # Origins the operator listed stay, and the update message names them.
    update = copier("update", "--trust", "--defaults", "--data", "cors_origins=https://admin.example.org", cwd=project)
    assert cors(project) == ["https://new.example.org", "https://admin.example.org"]
    assert "cors_origins also allows https://admin.example.org" in update.stdout + update.stderr
