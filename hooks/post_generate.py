"""Post-generation task, run by Copier (`_tasks`) inside the generated project.

Runs inside Copier's own Python: standard library (and Copier's PyYAML and Jinja2) only. It must
never lose a project: problems become warnings and the task still succeeds. The work itself is
done by the project's own scripts, the same ones `make secrets` and `make pin` run. It also says
which files of an existing repository the first copy kept (copier.yml's first-copy rule), and, for
an existing app (backend=existing), what the app still lacks to meet the contract of
docs/OPERATIONS.md#your-application, and, for a skeleton updated to schema migrations, which pins
its own requirements.in lacks.
"""

import fnmatch
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jinja2
import yaml

TEMPLATE_ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((TEMPLATE_ROOT / "copier.yml").read_text())
ANSWERS_FILE = CONFIG["_answers_file"]
# What the first lines of every rendered file say (includes/common.jinja's owned() and yours()).
HEADERS = ("Managed by hardened-compose", "Yours: `copier update`")
HEADER_LINES = 5
# Files without a header: JSON has no comments; Copier writes the answers file itself.
WITHOUT_HEADER = (".json", ANSWERS_FILE)
# A requirement line for a distribution (PEP 503 names compare case-insensitively, - _ . alike).
REQUIREMENT = r"^\s*{}\s*(\[[^\]]*\])?\s*(==|>=|~=|<|>|!=|@|;|\\|$)"
# Where a Celery app sets the queue its tasks go to (task_default_queue, old-style
# CELERY_TASK_DEFAULT_QUEUE / CELERY_DEFAULT_QUEUE), as an assignment or a keyword argument.
DEFAULT_QUEUE = re.compile(r"""\b(?:task_default_queue|CELERY_(?:TASK_)?DEFAULT_QUEUE)['"]?\s*[=:]\s*['"]([^'"]+)['"]""")
# Celery's own default queue.
CELERY_DEFAULT_QUEUE = "celery"
# What the skeleton's migrations (backend/migrations/, the migrate service) import.
MIGRATION_PACKAGES = ("alembic", "sqlalchemy")


def run_project_script(project: Path, name: str, function: str, *args: object) -> None:
    try:
        runpy.run_path(str(project / "scripts" / name), run_name="hardened_compose_hook")[function](*args)
    except Exception as exc:  # a failure here must not cost the user the generated project
        print(f"WARNING: scripts/{name} failed ({exc}); run it again in the project.", file=sys.stderr)


def rendered_paths(answers: dict) -> list[str]:
    """The project paths the template renders for these answers (file names only need the answers)."""
    source = TEMPLATE_ROOT / CONFIG["_subdirectory"]
    context = {**answers, "_copier_conf": {"answers_file": ANSWERS_FILE}}
    names = []
    for path in sorted(source.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:  # Copier never renders those
            parts = [jinja2.Template(part).render(context) for part in path.relative_to(source).parts]
            if all(parts):  # a part that renders empty is not rendered at all
                names.append("/".join(parts).removesuffix(CONFIG["_templates_suffix"]))
    return names


def kept_files(project: Path, answers: dict) -> list[str]:
    """Rendered paths holding a file the template did not write: they were there before the copy
    (or the user said no to "Overwrite?"), since every file the template writes has its header."""
    kept = []
    for name in rendered_paths(answers):
        path = project / name
        if name.endswith(WITHOUT_HEADER) or not path.is_file():
            continue
        head = "\n".join(path.read_text(errors="replace").splitlines()[:HEADER_LINES])
        if not any(header in head for header in HEADERS):
            kept.append(name)
    return kept


def user_owned(name: str) -> bool:
    """Whether copier.yml's _skip_if_exists makes name the user's (its patterns are simple globs)."""
    return any(
        name.startswith(pattern.removesuffix("**")) if pattern.endswith("/**") else fnmatch.fnmatchcase(name, pattern)
        for pattern in CONFIG["_skip_if_exists"]
        if "{{" not in pattern  # the first-copy rule, not a path
    )


# The template's README, for a repository that kept its own README.md (see copier.yml `_exclude`).
TEMPLATE_README = "docs/README.hardened-compose.md"


def report_kept(project: Path, kept: list[str], answers: dict) -> None:
    for name in filter(user_owned, kept):
        print(f"KEPT {name}: yours, as it was (the template's starting version was not written).", file=sys.stderr)
    managed = [name for name in kept if not user_owned(name)]
    if not managed:
        return
    for name in managed:
        where = f"; the template's README is {TEMPLATE_README}: link it from yours" if name == "README.md" else ""
        print(f"KEPT {name}: it was here before, so it stays yours: the template did not write it and no "
              f"update or recopy will{where}.", file=sys.stderr)  # fmt: skip
    advice = [
        "They are recorded as adopted_files in " + ANSWERS_FILE + " (docs/OPERATIONS.md#customizing).",
        "The stack uses them as they are: merge into them by hand what it needs from the template's versions "
        "(`copier copy --trust --defaults --data-file " + ANSWERS_FILE + " <template> /tmp/template-view` renders them).",
        "To hand one over to the template instead: `git mv` yours away, delete its line under adopted_files in "
        + ANSWERS_FILE + ", commit, then `copier recopy --trust --defaults --overwrite` and review `git diff`.",
    ]  # fmt: skip
    if ".gitignore" in kept:
        advice.append("Your .gitignore was kept: add `/.env` and `/backups/` to it (secrets/ has its own .gitignore).")
    if answers.get("backend") == "skeleton" and any(name.startswith("backend/app/") for name in kept):
        advice.append("backend/ holds your own app: to render the infrastructure only, `copier recopy --trust "
                      "--defaults --data backend=existing` (docs/OPERATIONS.md#your-application).")  # fmt: skip
    print("\n".join(advice), file=sys.stderr)


def record_adopted(project: Path, kept: list[str]) -> None:
    """The files the repository had before the first copy become adopted_files (copier.yml), in
    the answers file's layout (Copier's to_nice_yaml): the entry replaced, or added to a project
    from before this answer (hooks/migrate.py)."""
    answers = project / ANSWERS_FILE
    text = answers.read_text()
    entry = "adopted_files:" + ("".join(f"\n- {name}" for name in kept) if kept else " []")
    if re.search(r"^adopted_files:", text, re.MULTILINE):
        text = re.sub(r"^adopted_files:.*(\n- .*)*$", lambda _: entry, text, count=1, flags=re.MULTILINE)
    else:
        text = text + ("" if text.endswith("\n") else "\n") + entry + "\n"
    answers.write_text(text)


# Environment files named like the ones that hold real settings (and so, often, secrets), and the
# suffixes of the examples that do not.
ENV_FILE = re.compile(r"(^|/)\.env(\.[^/]+)?$")
ENV_EXAMPLES = (".example", ".sample", ".template", ".dist", ".defaults")


def committed_env_files(project: Path) -> list[str]:
    """The repository's committed .env files other than examples (git's own list; none without git)."""
    if not (project / ".git").exists():
        return []
    git = ["git", "-c", f"core.hooksPath={os.devnull}", "ls-files", "-z"]
    listed = subprocess.run(git, cwd=project, capture_output=True, text=True, check=True).stdout.split("\0")
    return sorted(name for name in listed if ENV_FILE.search(name) and not name.endswith(ENV_EXAMPLES))


def report_committed_env(project: Path) -> None:
    for name in committed_env_files(project):
        print(f"WARNING: {name} is committed to git, and such files usually hold secrets (left as it is): move each "
              "secret into a file under secrets/ read through a *_FILE variable (docs/OPERATIONS.md#secrets), "
              f"its other settings into backend.env, then `git rm --cached {name}` and rotate every secret it held "
              "(git history keeps them).", file=sys.stderr)  # fmt: skip


def module_file(backend: Path, dotted: str) -> Path | None:
    """The file that `import dotted` finds with backend/ (the image's /app) as the working directory."""
    base = backend.joinpath(*dotted.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def names_requirement(requirements: str, distribution: str) -> bool:
    pattern = REQUIREMENT.format(re.sub(r"[-_.]+", "[-_.]+", distribution))
    return re.search(pattern, requirements, re.IGNORECASE | re.MULTILINE) is not None


def contract_problems(project: Path, answers: dict) -> list[str]:
    """What an existing app (backend=existing) still lacks, one sentence each: what to add."""
    backend = project / "backend"
    problems = []
    module, _, attribute = answers["asgi_app"].partition(":")
    if module_file(backend, module) is None:
        path = "backend/" + module.replace(".", "/")
        problems.append(f"{path}.py (or {path}/__init__.py) is missing: add the module that defines your ASGI app "
                        f"`{attribute}` (asgi_app={answers['asgi_app']}), importable from backend/.")  # fmt: skip
    celery = answers.get("celery_app") if {"celery_worker", "celery_beat"} & set(answers.get("services", [])) else None
    celery_file = module_file(backend, celery.partition(":")[0]) if celery else None
    if celery and celery_file is None:
        path = "backend/" + celery.partition(":")[0].replace(".", "/")
        problems.append(f"{path}.py is missing: add the module with your Celery app (celery_app={celery}); "
                        "the workers and beat run `celery --app=" + celery + "`.")  # fmt: skip
    if celery_file is not None and "celery_worker" in answers.get("services", []):
        problems += queue_problems(celery_file.relative_to(project).as_posix(), celery_file.read_text(errors="replace"),
                                   answers["celery_queues"].split(","))  # fmt: skip
    requirements = backend / "requirements.txt"
    if not requirements.is_file():
        problems.append("backend/requirements.txt is missing: list your packages (uvicorn"
                        + (" and celery" if celery else "") + ") in backend/requirements.in and run `make lock`.")  # fmt: skip
        return problems
    text = requirements.read_text(errors="replace")
    for distribution in ["uvicorn"] + (["celery"] if celery else []):
        if not names_requirement(text, distribution):
            problems.append(f"backend/requirements.txt does not name {distribution}: the image runs it; add it to "
                            "backend/requirements.in and run `make lock`.")  # fmt: skip
    if "--hash=sha256:" not in text:
        problems.append("backend/requirements.txt has no hashes: the image installs it with `pip install --require-hashes`; "
                        "compile it from backend/requirements.in with `make lock`.")  # fmt: skip
    return problems


def queue_problems(path: str, source: str, queues: list[str]) -> list[str]:
    """A task waits for ever in a queue no worker reads: the app's task_default_queue (read from
    its Celery module's text) must be one of the answered queues."""
    answer = f"copier update --trust --data celery_queues={','.join(queues)},"
    match = DEFAULT_QUEUE.search(source)
    if match is None:
        if CELERY_DEFAULT_QUEUE in queues:
            return []
        return [f"{path} does not set task_default_queue: unless your configuration sets it elsewhere, your tasks go "
                f"to Celery's default queue `{CELERY_DEFAULT_QUEUE}`, which no worker reads (they read "
                f"{', '.join(queues)}): set task_default_queue to one of those in your Celery app, or "
                f"`{answer}{CELERY_DEFAULT_QUEUE}`."]  # fmt: skip
    if match[1] in queues:
        return []
    return [f"{path} sets task_default_queue '{match[1]}', which no worker reads (they read {', '.join(queues)}): "
            f"`{answer}{match[1]}`, or route the tasks to one of those queues."]  # fmt: skip


def left_out_of_image(project: Path, answers: dict) -> list[str]:
    """The entries of backend/ that backend/.dockerignore keeps out of the image (it admits the
    packages of asgi_app and celery_app, requirements.txt, docker/ and backend_context), leaving
    aside what never belongs there: hidden files, keys, secrets, caches, the Dockerfile. The
    skeleton's are app/, alembic.ini and migrations/."""
    skeleton = answers.get("backend") != "existing"
    modules = ["app"] if skeleton else [answers["asgi_app"], answers.get("celery_app", "")]
    admitted = {"requirements.txt", "docker", "Dockerfile", "requirements.in", "secrets", "__pycache__"}
    admitted |= {"alembic.ini", "migrations"} if skeleton else set()
    admitted |= {module.partition(":")[0].split(".")[0] for module in modules if module}
    admitted |= {path.split("/")[0] for path in str(answers.get("backend_context") or "").split()}
    keys = (".pem", ".key", ".p12", ".pfx", ".pyc")
    entries = [path.name for path in (project / "backend").iterdir()] if (project / "backend").is_dir() else []
    return sorted(
        name
        for name in entries
        if not name.startswith((".", "id_")) and Path(name).suffix not in keys and not {name, name.removesuffix(".py")} & admitted
    )


def report_left_out_of_image(project: Path, answers: dict) -> None:
    left_out = left_out_of_image(project, answers)
    if not left_out:
        return
    remedy = (
        "move them into backend/app/"
        if answers.get("backend") != "existing"
        else "name them in backend_context: copier update --trust --data 'backend_context=<paths>' "
        "(docs/OPERATIONS.md#your-application)"
    )
    print(f"NOTE: not in the backend image (backend/.dockerignore is an allow-list): backend/{', backend/'.join(left_out)}. "
          f"If the app needs any of them at run time, {remedy}.", file=sys.stderr)  # fmt: skip


def report_contract(project: Path, answers: dict) -> None:
    problems = contract_problems(project, answers)
    for problem in problems:
        print(f"EXISTING APP: {problem}", file=sys.stderr)
    if problems:
        print("The image builds once these are in place (docs/OPERATIONS.md#your-application); nothing else "
              "needs to wait for them.", file=sys.stderr)  # fmt: skip


def missing_migration_pins(project: Path) -> list[str]:
    """The template's pins of MIGRATION_PACKAGES that the project's backend/requirements.in lacks:
    a project generated before the migrate service gets backend/migrations/ on update, but its
    requirements.in is the user's and never rewritten."""
    requirements = project / "backend" / "requirements.in"
    if not (project / "backend" / "migrations").is_dir() or not requirements.is_file():
        return []
    text = requirements.read_text(errors="replace")
    template_in = next((TEMPLATE_ROOT / CONFIG["_subdirectory"] / "backend").glob("*requirements.in*"))
    pins = [line for line in template_in.read_text().splitlines() if line.split("==")[0].lower() in MIGRATION_PACKAGES]
    return [pin for pin in pins if not names_requirement(text, pin.split("==")[0])]


def report_missing_migration_pins(project: Path) -> None:
    missing = missing_migration_pins(project)
    if missing:
        print(f"WARNING: the migrate service runs Alembic, but backend/requirements.in (yours: an update never changes it) "
              f"lacks {', '.join(missing)}. Add these lines, run `make lock`, then `make up`; until then `make up` "
              "stops at the migrate service (docs/OPERATIONS.md#schema-migrations).", file=sys.stderr)  # fmt: skip


def refuse(project: Path, answers_file: str) -> int:
    """The destination's answers file is another template's (copier.yml foreign_answers_file):
    nothing was rendered; say how to copy beside it."""
    try:
        source = (yaml.safe_load((project / answers_file).read_text()) or {}).get("_src_path", "unknown")
    except (OSError, yaml.YAMLError, AttributeError):
        source = "unknown"
    print(f"ERROR: {answers_file} belongs to another template ({source}), so nothing was written: copy with an "
          "answers file of this template's own, `copier copy --trust --answers-file .copier-answers.hardened-compose.yml"
          " ...`, and pass the same --answers-file to every later `copier update` and `copier recopy`.",
          file=sys.stderr)  # fmt: skip
    return 1


def main(operation: str) -> int:
    project = Path.cwd()
    # During `copier update`, Copier also runs tasks in throw-away renders of the old and new
    # template versions; only the real project (a git repository) needs secrets and digests.
    if operation == "update" and not (project / ".git").exists():
        return 0
    try:  # messages only: a surprise here must not cost the project
        answers = yaml.safe_load((project / ANSWERS_FILE).read_text()) or {}
        if operation in ("copy", "first-copy"):  # "copy": a second copy or `copier recopy`
            kept = [name for name in kept_files(project, answers) if name not in answers.get("adopted_files", [])]
            if operation == "first-copy":
                record_adopted(project, kept)
                report_committed_env(project)
                if "README.md" not in kept:  # the template's README has its own file only beside the user's
                    (project / TEMPLATE_README).unlink(missing_ok=True)
            report_kept(project, kept, answers)
        if answers.get("backend") == "existing":
            report_contract(project, answers)
        report_left_out_of_image(project, answers)
        report_missing_migration_pins(project)
    except Exception as exc:
        print(f"WARNING: could not check the project's files ({exc}).", file=sys.stderr)
    run_project_script(project, "ensure_secrets.py", "main")
    if os.environ.get("HARDENED_COMPOSE_PIN", "on") == "off":
        print("NOTE: HARDENED_COMPOSE_PIN=off: images stay referenced by tag; pin them with `make pin`.", file=sys.stderr)
    else:
        run_project_script(project, "pin_images.py", "pin", project)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2:  # copier copy --answers-file
        ANSWERS_FILE, WITHOUT_HEADER = sys.argv[2], (".json", sys.argv[2])
    if sys.argv[1:2] == ["refuse"]:
        sys.exit(refuse(Path.cwd(), sys.argv[2]))
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "copy"))
