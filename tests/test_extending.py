"""docs/extending.md, followed literally: each recipe in a fresh copy of the project, its new files
written, its insertions made, its commands run; a failing command, or an insertion point that is
not there exactly once, fails the recipe."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

GUIDE = REPO / "docs" / "extending.md"
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.M | re.S)


def recipes() -> dict[str, list[tuple[str, str]]]:
    """Section title -> its blocks in order, as (info string, body)."""
    out = {}
    for section in re.split(r"^## ", GUIDE.read_text(), flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        out[title.strip()] = [(m["info"].strip(), m["body"]) for m in FENCE.finditer(body)]
    return out


def project_copy(target: Path) -> Path:
    """The files git knows (committed or not, ignored ones left out), as a fresh clone has them."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def insert_after(path: Path, anchor: str, body: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == anchor.strip()]
    assert len(hits) == 1, f"{path.name}: the line {anchor!r} occurs {len(hits)} times, not once"
    lines[hits[0] + 1 : hits[0] + 1] = [body]
    path.write_text("".join(lines))


def overlay_venv(folder: Path) -> Path:
    """A virtual environment that sees this one's packages (a .pth file) and installs its own on
    top: the renamed project's `make install` adds itself there, never to .venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (site,) = folder.glob("lib/python*/site-packages")
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "_project_venv.pth").write_text(ours + "\n")
    return folder


def follow(title: str, copy: Path, env: dict) -> None:
    # as a user's shell runs them, not as a sub-make of `make test` (which prints "Entering directory")
    env = {k: v for k, v in env.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    for info, body in recipes()[title]:
        words = info.split(maxsplit=2)
        if info == "sh":
            script = "set -euxo pipefail\n" + body
            result = subprocess.run(
                ["bash", "-c", script], cwd=copy, env=env, capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, f"{title}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        elif len(words) == 3 and words[1] == "new":
            (copy / words[2]).parent.mkdir(parents=True, exist_ok=True)
            (copy / words[2]).write_text(body)
        elif len(words) == 3 and words[2].startswith("after: "):
            insert_after(copy / words[1], words[2].removeprefix("after: "), body)


def test_every_recipe_is_tested_and_every_block_is_understood():
    found = recipes()
    assert set(found) == set(RECIPES) | {"Renaming the package"}, sorted(found)
    for title, blocks in found.items():
        assert any(info == "sh" for info, _ in blocks), f"{title}: no command to run"
        for info, _ in blocks:
            words = info.split(maxsplit=2)
            assert info == "sh" or (len(words) == 3 and (words[1] == "new" or words[2].startswith("after: "))), info


RECIPES = [
    "A model preset",
    "An architecture option",
    "A data format",
    "A DataModule",
    "A metric or a callback",
    "A DeepSpeed preset",
    "An experiment",
]


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory, code_corpus) -> dict:
    """What every recipe's run shares: this environment (never a new install), the text it trains
    on unless the recipe names one, and one prepared-data cache."""
    cache = tmp_path_factory.mktemp("recipe-data")
    return {"VENV": str(Path(sys.executable).parents[1]), "TEXT": str(code_corpus), "cache": cache}


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("title", RECIPES)
def test_recipe_trains(title, tmp_path, recipe_data):
    copy = project_copy(tmp_path / "project")
    (copy / "data").symlink_to(recipe_data["cache"])  # the default cache_dir, shared by the recipes
    env = {**os.environ, "VENV": recipe_data["VENV"], "TEXT": recipe_data["TEXT"], "PYTHONPATH": str(copy)}
    env["WANDB_MODE"] = "disabled"  # no recipe reads its W&B run: W&B is left out (and costs nothing)
    follow(title, copy, env)


@pytest.mark.slow
@pytest.mark.long
def test_renamed_project_installs_and_passes_its_tests(tmp_path):
    copy = project_copy(tmp_path / "project")
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)  # a fork is a git checkout
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    env = {**os.environ, "VENV": str(overlay_venv(tmp_path / "venv"))}
    env.pop("PYTHONPATH", None)
    follow("Renaming the package", copy, env)
    assert not (copy / "llm").exists() and (copy / "mylm" / "train" / "cli.py").is_file()
    leftovers = [
        str(p.relative_to(copy))
        for p in copy.rglob("*.py")
        if re.search(r"\bllm\b(?!\.c\b)|\bLLM_|llm_config", p.read_text()) and p.name != "rename.py"  # says what it did
    ]
    assert not leftovers, leftovers
    assert "MYLM_SHARED_DATA" in (copy / "tests" / "conftest.py").read_text()
    refused = subprocess.run(["make", "-s", "rename", "NAME=Bad-Name"], cwd=copy, capture_output=True, text=True)
    assert refused.returncode != 0 and "error: NAME=Bad-Name: not a lowercase Python identifier" in refused.stderr


def test_make_help_lists_every_target_and_every_preset():
    help_text = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    phony = re.search(r"^\.PHONY:(.*?)(?<!\\)$", (REPO / "Makefile").read_text(), re.M | re.S)[1]
    targets = set(phony.replace("\\\n", " ").split()) - {"help"}
    assert {t for t in targets if not re.search(rf"^  make {re.escape(t)}\s", help_text, re.M)} == set()
    for folder in ("model", "deepspeed"):
        for preset in (REPO / "configs" / folder).glob("*.yaml"):
            assert re.search(rf"[:,] {re.escape(preset.stem)}[,;( ]", help_text), preset


def test_the_code_hosts_ci_runs_lint_and_the_fast_tests_and_nothing_that_needs_shared_data():
    import yaml

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    runs = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    assert runs == ["make lint", "make test-fast"]
    recipe = subprocess.run(["make", "-n", "test-fast"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    fast = '-m "not slow and not shared_data and not long and not gpu and not bench and not stress and not cluster"'
    assert fast in recipe and "-n '2'" in recipe
