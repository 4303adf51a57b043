"""One ownership list, `_skip_if_exists` in copier.yml, and everything that tells users about it.

Every rendered file is yours (it matches the list, and says so where its format has comments) or
managed (it says so at the top); the docs list exactly the user-owned paths; and no `copier update`
or `copier recopy` deletes or overwrites a file you own, whatever answer changes. The answer changes
and the user-owned files each one stops rendering are derived from copier.yml and real renders.
"""

import itertools
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pathspec
import pytest
import yaml

from conftest import TEMPLATE, commit, copier, release, render, run

CONFIG = yaml.safe_load((TEMPLATE / "copier.yml").read_text())
# The paths, not the first-copy rule (a Jinja expression; tests/test_existing_repo.py covers it).
USER_OWNED: list[str] = [pattern for pattern in CONFIG["_skip_if_exists"] if "{{" not in pattern]
# Copier matches _skip_if_exists the way git matches .gitignore lines.
IS_USER_OWNED = pathspec.PathSpec.from_lines("gitignore", USER_OWNED).match_file
MANAGED = "Managed by hardened-compose: `copier update` rewrites this file"
YOURS = "Yours: `copier update` never overwrites or deletes this file."
# Files that carry no header: JSON has no comments, and Copier writes its answers file itself.
WITHOUT_HEADER_SUFFIXES = (".json",)
ANSWERS_FILE = CONFIG["_answers_file"]
HEAD_LINES = 5


def choices(question: str) -> list:
    """A question's values: its `choices` (a list or a label -> value map), or yes and no."""
    if CONFIG[question].get("type") == "bool":
        return [True, False]
    listed = CONFIG[question]["choices"]
    return list(listed.values()) if isinstance(listed, dict) else list(listed)


# Every component on: each answer change below is compared with this render.
EVERYTHING_ON = {
    "backend": "skeleton",
    "frontend": "spa",
    "proxy_mode": "nginx-certbot",
    "services": choices("services"),
    "update_bot": "renovate",
    "trivy_severity": CONFIG["trivy_severity"]["default"],
    "letsencrypt_staging": True,
    "swarm": True,
}
# Questions with choices, and yes/no questions a user is asked (not the computed ones).
CHOICE_QUESTIONS = [
    name
    for name, q in CONFIG.items()
    if isinstance(q, dict)
    and ("choices" in q or (q.get("type") == "bool" and q.get("ask", True) is not False and q.get("when", True) is not False))
]


def answer_changes() -> list[tuple[str, object]]:
    """Every other value of every question with choices (for a multiselect: every subset)."""
    changes = []
    for name in CHOICE_QUESTIONS:
        values = choices(name)
        if CONFIG[name].get("multiselect"):
            values = [list(subset) for size in range(len(values) + 1) for subset in itertools.combinations(values, size)]
        changes += [(name, value) for value in values if value != EVERYTHING_ON[name]]
    return changes


ANSWER_CHANGES = answer_changes()


def change_id(change: tuple[str, object]) -> str:
    name, value = change
    return f"{name}=" + ("+".join(value) or "none" if isinstance(value, list) else str(value))


def cli_data(name: str, value: object) -> str:
    return f"--data={name}=" + (f"[{', '.join(value)}]" if isinstance(value, list) else str(value))


def files(project: Path) -> set[str]:
    return {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file() and ".git" not in p.parts}


def user_owned(project: Path) -> set[str]:
    return {name for name in files(project) if IS_USER_OWNED(name)}


def head(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[:HEAD_LINES])


def snapshot(project: Path, names: set[str]) -> dict[str, bytes | None]:
    return {name: (project / name).read_bytes() if (project / name).is_file() else None for name in sorted(names)}


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Render the template's files (no tasks) for some answers, once per answer set."""
    cache: dict[str, Path] = {}

    def render_once(**data: object) -> Path:
        key = repr(sorted(data.items()))
        if key not in cache:
            cache[key] = render(tmp_path_factory.mktemp("render"), tasks=False, **data)
        return cache[key]

    return render_once


def render_change(rendered: Callable[..., Path], name: str, value: object) -> Path:
    try:
        return rendered(**{**EVERYTHING_ON, name: value})
    except ValueError as error:  # copier.yml's validators reject some combinations (celery without redis)
        pytest.skip(f"copier.yml rejects {change_id((name, value))}: {error}")


def test_file_names_depend_only_on_questions_with_choices() -> None:
    """So the answer changes derived above cover every way a file can appear or disappear."""
    names: set[str] = set()
    for path in (TEMPLATE / CONFIG["_subdirectory"]).rglob("*"):
        for expression in re.findall(r"\{[{%](.*?)[%}]\}", path.name):
            names |= set(re.findall(r"(?<![\w.])[a-z][a-z0-9_]*", re.sub(r"'[^']*'", "", expression)))
    assert names, "no conditional file names found: the pattern above is out of date"
    # Except the template's own README beside an adopted one (adopted_files, generated_before: not
    # choices; tests/test_existing_repo.py covers it): a managed file, never one of yours.
    assert names - {"if", "endif", "in", "or", "and", "not"} - {"adopted_files", "generated_before"} <= set(CHOICE_QUESTIONS)


@pytest.mark.parametrize("change", [None, *ANSWER_CHANGES], ids=lambda c: "everything-on" if c is None else change_id(c))
def test_every_file_is_yours_or_managed_and_the_docs_list_yours(rendered: Callable[..., Path], change: tuple | None) -> None:
    project = rendered(**EVERYTHING_ON) if change is None else render_change(rendered, *change)
    for name in sorted(files(project)):
        if name.endswith(WITHOUT_HEADER_SUFFIXES) or name == ANSWERS_FILE:
            continue
        expected = YOURS if IS_USER_OWNED(name) else MANAGED
        assert expected in head(project / name), f"{name}: its first {HEAD_LINES} lines must say {expected!r}"

    # The docs list the user-owned paths this project can have: those inside a directory only
    # when the directory exists ("backend/app/**" written as "backend/app/").
    listed = [p.removesuffix("**") for p in USER_OWNED if "/" not in p or (project / p.split("/")[0]).is_dir()]
    for doc in ("README.md", "docs/OPERATIONS.md"):
        sentence = re.search(r"^Yours: (.+)$", (project / doc).read_text(), re.MULTILINE)
        assert sentence, f"{doc} has no 'Yours:' list"
        assert re.findall(r"`([^`]+)`", sentence[1]) == listed, doc
    # Where OPERATIONS tells users to put their changes, every path it names must be theirs.
    customizing = (project / "docs/OPERATIONS.md").read_text().split("## Customizing", 1)[1].split("\n## ", 1)[0]
    bullets = "\n".join(line for line in customizing.splitlines() if line.startswith("- "))
    for path in re.findall(r"`([^`]+)`", bullets):
        if (project / path.split("*")[0]).exists():
            assert path in listed, f"docs/OPERATIONS.md#customizing tells users to change {path}: not all of it is theirs"


def test_the_top_level_readme_lists_the_user_owned_paths() -> None:
    paragraph = (TEMPLATE / "README.md").read_text().split("\nOwnership:", 1)[1].split("\n\n", 1)[0]
    mentioned = re.findall(r"`([^`]+)`", paragraph)
    paths = [p.removesuffix("**") for p in USER_OWNED]
    assert [m for m in mentioned if m in paths] == paths
    # Any other path it names is not claimed as yours: the list's home, the hook, docs and secrets.
    assert set(mentioned) - set(paths) <= {"_skip_if_exists", "copier.yml", "hooks/migrate.py", "docs/OPERATIONS.md",
                                          "tests/test_ownership.py", "secrets/"}  # fmt: skip


@pytest.fixture(scope="session")
def everything_on_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated project with every component on, committed, from a tagged template release."""
    root = tmp_path_factory.mktemp("everything-on")
    template, project = root / "template", root / "project"
    release(TEMPLATE, template, "v1.0.0")
    copier("copy", "--trust", "--defaults", "--vcs-ref=v1.0.0", *(cli_data(*a) for a in EVERYTHING_ON.items()),
           str(template), str(project))  # fmt: skip
    run("git", "init", "-q", cwd=project)
    commit(project, "generated")
    return project


@pytest.mark.e2e
@pytest.mark.parametrize("change", ANSWER_CHANGES, ids=change_id)
def test_no_answer_change_deletes_or_overwrites_a_user_owned_file(
    rendered: Callable[..., Path], everything_on_project: Path, tmp_path: Path, change: tuple[str, object]
) -> None:
    name, value = change
    lost = user_owned(rendered(**EVERYTHING_ON)) - user_owned(render_change(rendered, name, value))
    if not lost:
        pytest.skip(f"{change_id(change)} still renders every user-owned file")
    project = tmp_path / "project"
    shutil.copytree(everything_on_project, project, symlinks=True)
    for path in lost:
        (project / path).write_text(f"my own version of {path}\n")
    commit(project, "my changes")
    mine = snapshot(project, user_owned(project))

    # The answer change: the template stops rendering `lost`; the user's files stay, listed for removal by hand.
    result = copier("update", "--trust", "--defaults", cli_data(name, value), cwd=project)
    output = result.stdout + result.stderr
    assert snapshot(project, set(mine)) == mine, output
    for path in lost:
        assert path in output, f"the update does not tell the user it kept {path}:\n{output}"
    assert "remove" in output.lower()
    # The message after the update names every user-owned path these answers render, and no other.
    message = output.split("hardened-compose update done", 1)[1]
    promised = message.split("not overwritten or deleted: ", 1)[1].split("\n", 1)[0].split(", ")
    now_rendered = files(render_change(rendered, name, value))
    has = [p for p in USER_OWNED if any(pathspec.PathSpec.from_lines("gitignore", [p]).match_files(now_rendered))]
    assert all(p.removesuffix("**") in promised for p in has), promised
    for path in promised:
        if "/" in path and not path.startswith("backend/"):  # a component's directory (frontend/, nginx/)
            assert any(f.startswith(path.split("/")[0] + "/") for f in now_rendered), f"{path}: not in this project"
    commit(project, f"{change_id(change)}")

    # And back: the template renders these files again, but never over the user's versions.
    copier("update", "--trust", "--defaults", cli_data(name, EVERYTHING_ON[name]), cwd=project)
    assert snapshot(project, set(mine)) == mine
    # (A render without the task also has the template's README for an adopted one: the task
    # removes it when the template's README.md was written.)
    assert files(project) >= files(rendered(**EVERYTHING_ON)) - {"docs/README.hardened-compose.md"}
    commit(project, "everything on again")

    # `copier recopy` with the change renders afresh over the project: it deletes nothing either.
    copier("recopy", "--trust", "--defaults", "--overwrite", cli_data(name, value), cwd=project)
    assert snapshot(project, set(mine)) == mine
