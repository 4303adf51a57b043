"""Run by Copier around every `copier update` (_migrations), in the project.

Usage (from copier.yml): migrate.py <before|after> <version from> <version to>.
- before: the renames of hooks/migrations.yml whose release lies in (from, to] (Copier deletes a
  file the new version no longer renders, even one the user changed, so it must be moved first);
- after: restores every user-owned file (copier.yml `_skip_if_exists`) the update deleted because
  the new version or a changed answer no longer renders it, and says so; then the removals.
Standard library, PyYAML and packaging (from Copier) only; git is there (updates need it).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from packaging.version import Version

TABLE = Path(__file__).with_name("migrations.yml")
SKIP_IF_EXISTS: list[str] = yaml.safe_load(Path(__file__).parents[1].joinpath("copier.yml").read_text())["_skip_if_exists"]
ANSWERS_FILE: str = yaml.safe_load(Path(__file__).parents[1].joinpath("copier.yml").read_text())["_answers_file"]
# The paths only, not the first-copy rule (a Jinja expression).
USER_OWNED = [pattern for pattern in SKIP_IF_EXISTS if "{{" not in pattern]


def applicable(entries: list[dict], stage: str, old: Version, new: Version) -> list[dict]:
    kind = "rename" if stage == "before" else "remove"
    return [e for e in entries if kind in e and old < Version(str(e["version"])) <= new]


def apply(entry: dict, project: Path) -> str | None:
    """Apply one entry; return what was done, or None if there was nothing to do."""
    if "rename" in entry:
        source, target = project / entry["rename"]["from"], project / entry["rename"]["to"]
        if not source.exists() or target.exists():
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        return f"moved {entry['rename']['from']} -> {entry['rename']['to']}"
    path = project / entry["remove"]
    if not path.exists():
        return None
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return f"removed {entry['remove']}"


def git_pathspec(pattern: str) -> str:
    """A _skip_if_exists pattern as a git pathspec. Copier matches them like .gitignore lines, where
    a pattern without an inner slash matches at any depth."""
    return ":(glob)" + (pattern.lstrip("/") if "/" in pattern.rstrip("/") else f"**/{pattern}")


def keep_user_owned(project: Path, moved_or_removed: set[str], pathspecs: list[str] | None = None) -> list[str]:
    """Restore from HEAD the user-owned files missing from the work tree; return their paths.

    Copier deletes every file the old version rendered and the new one does not, user-owned or
    not. It refuses to update a dirty tree, so a tracked file missing now was deleted by this
    update, and HEAD holds the user's version of it. Files this table moved or removed stay so."""
    git = ["git", "-c", f"core.hooksPath={os.devnull}"]
    listed = subprocess.run(
        [*git, "ls-files", "--deleted", "-z", "--", *(pathspecs or map(git_pathspec, USER_OWNED))],
        cwd=project, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    deleted = sorted(set(filter(None, listed.split("\0"))) - moved_or_removed)
    if deleted:
        subprocess.run([*git, "checkout", "HEAD", "--", *deleted], cwd=project, check=True)
    return deleted


def keep_adopted(project: Path) -> None:
    """The update that first records adopted_files (adopt_headerless) still deletes them: the old
    version rendered them and the new one does not. Restore them from HEAD."""
    answers = yaml.safe_load(project.joinpath(ANSWERS_FILE).read_text()) or {}
    adopted = [":(literal)" + path for path in answers.get("adopted_files") or []]
    if adopted:
        keep_user_owned(project, set(), adopted)


def report_kept(project: Path, moved_or_removed: set[str]) -> None:
    try:
        kept = keep_user_owned(project, moved_or_removed)
    except (OSError, subprocess.CalledProcessError) as exc:  # never fail half-way through an update
        print(f"WARNING: could not check for deleted files you own ({exc}): run `git status`; restore any"
              " with `git checkout HEAD -- <file>`.", file=sys.stderr)  # fmt: skip
        return
    if kept:
        print("Kept files you own that the template no longer renders with these answers (restored from git HEAD):")
        print("".join(f"  {path}\n" for path in kept), end="")
        print("Remove them by hand (git rm) if your project no longer needs them, with the code that uses them.")


def adopt_headerless(project: Path) -> None:
    """A project adopted before the answer adopted_files existed: the managed paths holding a file
    without the template's header are the repository's own files, kept at adoption. Recorded
    before the update (Copier reads the answers again), so it never merges into them."""
    sys.path.insert(0, str(Path(__file__).parent))
    import post_generate  # the hook's own module, beside this one

    answers = yaml.safe_load((project / post_generate.ANSWERS_FILE).read_text()) or {}
    if "adopted_files" in answers:
        return
    # Managed paths only: a user-owned file without the header is the user's rewrite, already safe.
    kept = [name for name in post_generate.kept_files(project, answers) if not post_generate.user_owned(name)]
    post_generate.record_adopted(project, kept)
    if kept:
        print(f"migration: recorded as adopted_files (yours for good, never written by an update): {', '.join(kept)}")


def main(argv: list[str]) -> int:
    stage, old, new = argv[0], Version(argv[1]), Version(argv[2])
    table = yaml.safe_load(TABLE.read_text()) or []
    project = Path.cwd()
    if stage == "before":
        try:
            adopt_headerless(project)
        except (OSError, yaml.YAMLError) as exc:  # never fail half-way through an update
            print(f"WARNING: could not record the files you had before adoption ({exc}).", file=sys.stderr)
    if stage == "after":
        try:
            keep_adopted(project)
        except (OSError, yaml.YAMLError, subprocess.CalledProcessError) as exc:
            print(f"WARNING: could not restore the files you had before adoption ({exc}): run `git status`; restore"
                  " any with `git checkout HEAD -- <file>`.", file=sys.stderr)  # fmt: skip
        planned = {e["rename"]["from"] for e in applicable(table, "before", old, new)}
        planned |= {e["remove"] for e in applicable(table, "after", old, new)}
        report_kept(project, planned)
    for entry in applicable(table, stage, old, new):
        done = apply(entry, project)
        if done:
            print(f"migration {entry['version']}: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
