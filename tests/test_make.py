"""The Makefile hands every variable to the program as the text typed: no value is Make code or shell
code, and `$`, quotes and spaces arrive unchanged. The program here stands in for .venv's python: it
writes the argv it was given, with ARGS= added as `python -m llm` adds it (llm/argv.py), so each case
is what the real command would receive."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from support import REPO, llm_here

HOSTILE = {
    "PROMPT": '$(shell touch {marker}) It costs $HOME, 5$; `touch {marker}` it\'s "quoted"',
    "CKPT": "/x$(shell touch {marker})",
    "MODEL": "tiny.yaml; touch {marker}; echo ",
    "GPU_MEM": "1 $$(touch {marker})",
    "RUN": "runs/a b'$(touch {marker})'",
    "TEXT": "data/$$HOME/{{x}}.txt",
    "TEACHER": "runs/t '$(touch {marker})'/best.ckpt",
}


@pytest.fixture
def argv_of(tmp_path):
    """make -s <target> VARS..., run with a python that records its argv: the argv it received."""
    recorder = tmp_path / "python"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, sys\nfrom llm.argv import with_make_args\n"
        "print(json.dumps(with_make_args(sys.argv[1:])))\n",
    )
    recorder.chmod(0o755)
    stamp = tmp_path / "installed"  # the install step's stamp, newer than pyproject.toml: nothing installs
    stamp.touch()

    def argv_of(target: str, **variables: str) -> list[str]:
        assignments = [f"{name}={value}" for name, value in variables.items()]
        result = subprocess.run(
            ["make", "-s", target, f"PY={recorder}", f"STAMP={stamp}", *assignments],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.splitlines()[-1])

    return argv_of


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_variable_reaches_the_program_as_typed_and_runs_nothing(argv_of, tmp_path, name):
    marker = tmp_path / "ran"
    value = HOSTILE[name].format(marker=marker)
    target = {"PROMPT": "sample", "CKPT": "sample", "GPU_MEM": "plan", "TEACHER": "distill"}.get(name, "train")
    argv = argv_of(target, **{name: value})
    assert not marker.exists(), f"{name}={value!r} ran a command"
    option = {
        "PROMPT": "--prompt=",
        "CKPT": "--ckpt=",
        "MODEL": "--model.config=",
        "GPU_MEM": "--memory_gib=",
        "RUN": "--run=",
        "TEXT": "--data.text=",
        "TEACHER": "--distill.teacher=",
    }[name]
    expected = f"configs/model/{value}.yaml" if name == "MODEL" else value
    assert f"{option}{expected}" in argv


def test_args_are_split_into_options_as_a_shell_would_and_nothing_in_them_runs(argv_of, tmp_path):
    marker = tmp_path / "ran"
    args = f"--seed=$HOME --eval_every=5 '--x=$(touch {marker})' --y=`touch {marker}` --paths=\"[a, b]\""
    argv = argv_of("train", ARGS=args)
    assert not marker.exists()
    words = ["--seed=$HOME", "--eval_every=5", f"--x=$(touch {marker})", "--y=`touch", f"{marker}`", "--paths=[a, b]"]
    assert argv[-6:] == words


def test_an_unbalanced_quote_in_args_is_one_line():
    result = llm_here("plan", env={"LLM_ARGS": "--gpus='2"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ARGS=--gpus='2: No closing quotation")


def test_pytest_args_keep_their_quotes(argv_of, tmp_path):
    recorder = tmp_path / "python"
    recorder.write_text(f"#!{sys.executable}\nimport json, os\nprint(json.dumps(os.environ['PYTEST_ADDOPTS']))\n")
    stamp = tmp_path / "installed"
    stamp.touch()
    result = subprocess.run(
        ["make", "-s", "test", f"PY={recorder}", f"STAMP={stamp}", 'PYTEST_ARGS=-k "a and b" -x $HOME'],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == '-k "a and b" -x $HOME'


@pytest.mark.parametrize(("force", "given"), [("1", "--force=true"), ("0", "--force=false"), ("", None)])
def test_force_is_what_it_says(argv_of, force, given):
    argv = argv_of("export", CKPT="c", OUT="o", FORCE=force)
    assert [a for a in argv if a.startswith("--force")] == ([given] if given else [])


def install_commands(*assignments: str) -> str:
    """What `make install` would run in a fresh clone (the stamp made again), without running it."""
    result = subprocess.run(
        ["make", "-n", "-B", "install", "STAMP=/nonexistent/stamp", *assignments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_install_takes_the_tested_versions_unless_told_not_to():
    assert "-c 'constraints.txt'" in install_commands()
    assert " -c " not in install_commands("CONSTRAINTS=")


def test_every_dependency_has_the_version_the_tests_passed_with():
    # a dependency added to pyproject.toml without a refreshed constraints.txt would install untested
    import re

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=!\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in wanted}
    pinned = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.lower().replace("_", "-")] = version
    assert names - {"torch"} <= pinned.keys(), sorted(names - {"torch"} - pinned.keys())
    assert "torch" not in pinned  # TORCH= pins it: a CUDA and a CPU build have different versions


@pytest.mark.parametrize(
    ("given", "line"),
    [
        ("MAX_STEP=5", "MAX_STEP=5: not a variable of this Makefile; did you mean MAX_STEPS? (make help lists them)"),
        ("DEVICE=2", "DEVICE=2: not a variable of this Makefile; did you mean DEVICES? (make help lists them)"),
        ("GPUS=8", "GPUS=8: not a variable of this Makefile; did you mean DEVICES? (make help lists them)"),  # renamed
        ("COLOUR=$(shell touch x)", "COLOUR=$(shell touch x): not a variable of this Makefile (make help lists them)"),
    ],
)
def test_a_variable_the_makefile_does_not_know_is_refused_with_the_nearest_name(given, line):
    # a typo would otherwise be ignored: MAX_STEP=5 trained the experiment's 500 steps
    command = ["make", "--no-print-directory", "-n", "train", given]  # as a sub-make too (make test runs it)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(rf"Makefile:\d+: \*\*\* {re.escape(line)}\.  Stop\.\n", result.stderr), result.stderr
    assert not (REPO / "x").exists()


def make_answer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_venv_with_a_space_is_refused_before_make_clean_removes_anything(tmp_path):
    # `rm -rf $(VENV)` would have read it as two folders, the second one the victim
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("mine")
    result = make_answer("clean", f"VENV=nonexistent {victim}")
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(
        rf"Makefile:\d+: \*\*\* VENV=nonexistent {re.escape(str(victim))}: not a path Make can use .*\.  Stop\.\n",
        result.stderr,
    ), result.stderr
    assert (victim / "precious").read_text() == "mine"


def test_make_clean_removes_a_virtual_environment_and_nothing_else(tmp_path):
    folder = tmp_path / "work"  # a folder of the user's, named by mistake
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = make_answer("clean", f"VENV={folder}")
    assert result.returncode == 2, result.stderr
    assert f"VENV={folder}: not a virtual environment (no pyvenv.cfg in it), so not removed" in result.stderr
    assert (folder / "notes.txt").read_text() == "mine"
    venv = tmp_path / "venv"  # what `python -m venv` makes: removed
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert make_answer("clean", f"VENV={venv}").returncode == 0 and not venv.exists()


def test_python_names_a_program_and_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    result = make_answer("rename", f"PYTHON=true; touch {marker};", "NAME=renamed")
    assert result.returncode == 2 and not marker.exists()
    assert f"true; touch {marker};: " in result.stderr  # one program's name, which does not exist
    assert not (REPO / "renamed").exists() and (REPO / "llm").is_dir()
