"""The commands in README.md and the docs/ pages work as written: each `make` line names a target and
variables the Makefile has (`make -n`, which runs nothing), and each example of a refusal (a `$ make`
line followed by the answer) prints that answer. docs/extending.md's recipes are followed
literally, in a copy of the project, by tests/test_extending.py."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from support import REPO, program_stderr

PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "extending.md")]
ANSWER = re.compile(r"^(error: |Makefile:\d+: \*\*\* )")


def commands(page: Path) -> list[tuple[str, str | None]]:
    """(command, the answer shown under it or None) for each `make` line of a page's code blocks."""
    found = []
    lines = page.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(?: {4}|)(\$ )?(make .*)$", line)
        if not match:
            continue
        command = re.split(r" +# | \| ", match[2])[0].strip()  # a comment, or a pipe into grep
        below = lines[number + 1].strip() if number + 1 < len(lines) else ""
        found.append((command, below if match[1] and ANSWER.match(below) else None))
    return found


def make(command: str, *options: str) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    return subprocess.run(
        [words[0], "--no-print-directory", *options, *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_pages_have_commands():
    counts = {page.name: len(commands(page)) for page in PAGES}
    assert counts["README.md"] >= 5 and sum(counts.values()) >= 40, counts


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_command_names_a_target_and_variables_the_makefile_has(page):
    for command, answer in commands(page):
        if answer and answer.startswith("Makefile:"):
            continue  # an example of Make refusing a variable: the next test
        result = make(command, "-n")
        assert result.returncode == 0, f"{page.name}: {command}: {result.stderr.strip()}"


@pytest.mark.parametrize(
    "page, command, answer",
    [
        # Make's own refusals in make test; those of the program, each a Python start (about 15 s on 2
        # busy cores), in the long tier: tests/test_errors.py checks the same refusals in-process
        pytest.param(page, command, answer, marks=() if answer.startswith("Makefile:") else pytest.mark.long)
        for page in PAGES
        for command, answer in commands(page)
        if answer
    ],
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_every_refusal_shown_is_the_one_printed(page, command, answer):
    result = make(command)
    said = result.stderr.strip().splitlines()[0] if answer.startswith("Makefile:") else program_stderr(result.stderr)[0]
    # the page may shorten a long list with "..."
    pattern = ".*".join(re.escape(part) for part in answer.split("..."))
    where = f"{page.name}: {command}\n  shown: {answer}\n  said:  {said}"
    assert result.returncode == 2 and re.fullmatch(pattern, said), where
