"""`make rename NAME=...`: give a fork its own package name (`llm` is taken on PyPI).

Renames the package folder and every use of the name in the files git knows (imports, `python -m`,
module paths in configs, pyproject, the Makefile, docs), the `LLM_` environment variables, the
checkpoint key `llm_config` and the default W&B project. Standard library only: it runs before
any install. Commit first; `git diff` then shows everything it changed.
"""

from __future__ import annotations

import keyword
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

OLD = "llm"
ROOT = Path(__file__).resolve().parents[1]


def refuse(message: str) -> None:
    print(f"error: NAME={message}", file=sys.stderr)
    sys.exit(2)


def check(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        refuse(f"{name}: not a lowercase Python identifier; use letters, digits and _, e.g. NAME=mylm")
    if name == OLD:
        refuse(f"{name}: that is the name it has already; choose another, e.g. NAME=mylm")
    if (ROOT / name).exists():
        refuse(f"{name}: {ROOT / name} exists already; choose another name or move that folder away")
    if not (ROOT / OLD).is_dir():
        refuse(f"{name}: there is no {OLD}/ package to rename here (renamed already?)")
    if find_spec(name) is not None:
        refuse(f"{name}: an installed module has this name already; choose another, e.g. NAME={name}_lm")


def tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def substitutions(name: str) -> list[tuple[re.Pattern, str]]:
    return [
        (re.compile(rf"\b{OLD}_config\b"), f"{name}_config"),  # the checkpoint key
        (re.compile(rf"\b{OLD.upper()}_(?=[A-Z])"), f"{name.upper()}_"),  # LLM_RESUME_FROM, LLM_SHARED_DATA, ...
        # the package: imports, python -m, module paths, the pyproject name; not llm.c, another project
        (re.compile(rf"\b{OLD}\b(?!\.c\b)"), name),
    ]


def rename(name: str) -> None:
    check(name)
    rules = substitutions(name)
    changed = 0
    for path in tracked_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # a binary file (a PNG)
        new = text
        for pattern, replacement in rules:
            new = pattern.sub(replacement, new)
        if new != text:
            path.write_text(new)
            changed += 1
    (ROOT / OLD).rename(ROOT / name)
    print(f"renamed {OLD}/ to {name}/ and the name in {changed} files; `make install` installs it as {name}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1]:
        refuse("(empty): give the new package name, e.g. make rename NAME=mylm")
    rename(sys.argv[1])
