"""The suite's own ground: the CPU tests run on the CPU wherever they run (a workstation's GPUs are
hidden from them and from every process they start), and its tiers are what `make` says."""

from __future__ import annotations

import os
import subprocess
import sys

from support import REPO


def test_the_cpu_tests_hide_the_gpus_from_themselves_and_their_processes():
    import torch

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()
    child = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count(), torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.split() == ["0", "False"]


def test_each_tier_runs_what_it_says():
    def recipe(target: str) -> str:
        return subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout

    assert '-m "not long and not gpu and not bench and not stress and not cluster"' in recipe("test")  # GPUs hidden
    assert '-m "long and not gpu and not cluster"' in recipe("test-long")
    assert "-m cluster" in recipe("cluster-test")
    assert "LLM_TEST_GPU=1" in recipe("test-gpu") and "-m gpu" in recipe("test-gpu")
    assert "-m bench" in recipe("test-bench")
    assert "-m stress" in recipe("stress") and "scripts/stress.py" in recipe("stress")
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    tiers = ["make test", "make cluster-test", "make test-long", "make test-bench", "make stress STRESS_RUNS=10"]
    assert commands == tiers
    assert "export LLM_REQUIRE_CLUSTER=1" in (REPO / ".ci" / "run").read_text()
