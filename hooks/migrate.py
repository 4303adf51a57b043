"""Renames and removals from hooks/migrations.yml, run by Copier around `copier update` (_migrations).

Usage (from copier.yml): migrate.py <before|after> <version from> <version to>, in the project.
Applies the entries whose release lies in (from, to]: renames before the update (Copier deletes
a file the new version no longer renders, even one the user changed, so it must be moved
first), removals after it. Standard library, PyYAML and packaging (from Copier) only.
"""

import shutil
import sys
from pathlib import Path

import yaml
from packaging.version import Version

TABLE = Path(__file__).with_name("migrations.yml")


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


def main(argv: list[str]) -> int:
    stage, old, new = argv[0], Version(argv[1]), Version(argv[2])
    for entry in applicable(yaml.safe_load(TABLE.read_text()) or [], stage, old, new):
        done = apply(entry, Path.cwd())
        if done:
            print(f"migration {entry['version']}: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
