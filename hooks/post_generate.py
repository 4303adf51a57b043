"""Post-generation task, run by Copier (`_tasks`) inside the generated project.

Runs inside Copier's own Python: standard library (and Copier's PyYAML) only. It must never lose
a project: problems become warnings and the task still succeeds. The work itself is done by the
project's own scripts, the same ones `make secrets` and `make pin` run.
"""

import os
import re
import runpy
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1]
# What the skeleton's migrations (backend/migrations/, the migrate service) import.
MIGRATION_PACKAGES = ("alembic", "sqlalchemy")


def run_project_script(project: Path, name: str, function: str, *args: object) -> None:
    try:
        runpy.run_path(str(project / "scripts" / name), run_name="hardened_compose_hook")[function](*args)
    except Exception as exc:  # a failure here must not cost the user the generated project
        print(f"WARNING: scripts/{name} failed ({exc}); run it again in the project.", file=sys.stderr)


def missing_migration_pins(project: Path) -> list[str]:
    """The template's pins of MIGRATION_PACKAGES that the project's backend/requirements.in lacks:
    a project generated before the migrate service gets backend/migrations/ on update, but its
    requirements.in is the user's and never rewritten."""
    requirements = project / "backend" / "requirements.in"
    if not (project / "backend" / "migrations").is_dir() or not requirements.is_file():
        return []
    lines = [line.strip() for line in requirements.read_text().splitlines()]
    listed = {re.split(r"[^A-Za-z0-9._-]", line, maxsplit=1)[0].lower() for line in lines if line and not line.startswith("#")}
    template_in = next((TEMPLATE / "template" / "backend").glob("*requirements.in*"))
    pins = [line for line in template_in.read_text().splitlines() if line.split("==")[0].lower() in MIGRATION_PACKAGES]
    return [pin for pin in pins if pin.split("==")[0].lower() not in listed]


def main(operation: str) -> int:
    project = Path.cwd()
    # During `copier update`, Copier also runs tasks in throw-away renders of the old and new
    # template versions; only the real project (a git repository) needs secrets and digests.
    if operation == "update" and not (project / ".git").exists():
        return 0
    run_project_script(project, "ensure_secrets.py", "main")
    missing = missing_migration_pins(project)
    if missing:
        print(f"WARNING: the migrate service runs Alembic, but backend/requirements.in (yours: an update never changes it) "
              f"lacks {', '.join(missing)}. Add these lines, run `make lock`, then `make up`; until then `make up` "
              "stops at the migrate service (docs/OPERATIONS.md#schema-migrations).", file=sys.stderr)  # fmt: skip
    if os.environ.get("HARDENED_COMPOSE_PIN", "on") == "off":
        print("NOTE: HARDENED_COMPOSE_PIN=off: images stay referenced by tag; pin them with `make pin`.", file=sys.stderr)
    else:
        run_project_script(project, "pin_images.py", "pin", project)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "copy"))
