"""Post-generation task, run by Copier (`_tasks`) inside the generated project.

Runs inside Copier's own Python: standard library (and Copier's PyYAML) only. It must never lose
a project: problems become warnings and the task still succeeds. The work itself is done by the
project's own scripts, the same ones `make secrets` and `make pin` run.
"""

import os
import runpy
import sys
from pathlib import Path


def run_project_script(project: Path, name: str, function: str, *args: object) -> None:
    try:
        runpy.run_path(str(project / "scripts" / name), run_name="hardened_compose_hook")[function](*args)
    except Exception as exc:  # a failure here must not cost the user the generated project
        print(f"WARNING: scripts/{name} failed ({exc}); run it again in the project.", file=sys.stderr)


def main(operation: str) -> int:
    project = Path.cwd()
    # During `copier update`, Copier also runs tasks in throw-away renders of the old and new
    # template versions; only the real project (a git repository) needs secrets and digests.
    if operation == "update" and not (project / ".git").exists():
        return 0
    run_project_script(project, "ensure_secrets.py", "main")
    if os.environ.get("HARDENED_COMPOSE_PIN", "on") == "off":
        print("NOTE: HARDENED_COMPOSE_PIN=off: images stay referenced by tag; pin them with `make pin`.", file=sys.stderr)
    else:
        run_project_script(project, "pin_images.py", "pin", project)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "copy"))
