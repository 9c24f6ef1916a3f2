"""Shared fixtures: the shared data beside the project, the trained runs the tests read, and a
CPU-only environment (tests/support.py holds the helpers)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# The CPU suite runs on the CPU wherever it runs: on a workstation with GPUs, configs would default
# to the GPU and bf16, and the 32-true, devices=2 and exactness checks would test something else.
# Hidden before torch is imported, here and in every process the tests start. `make test-gpu`
# (LLM_TEST_GPU=1) runs the GPU tests with the GPUs visible.
GPU_SESSION = os.environ.get("LLM_TEST_GPU") == "1"
if not GPU_SESSION:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402

from support import REPO, Runs, exclusive  # noqa: E402

SHARED_DATA = Path(os.environ.get("LLM_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = REPO / "tests" / "fixtures"  # small, in the repository: what a fork's CI runs the fast tests on
SHARED_FIXTURES = {"shakespeare", "gpt2_tokenizer"}  # tests using these are marked shared_data


def shared(name: str) -> Path:
    """A file of the shared test data. A fork without it skips the tests that need it (each has a
    fast variant on tests/fixtures); a CI that promises the data (LLM_REQUIRE_SHARED_DATA=1, as
    .ci/run sets) fails instead: a skip there would hide a lost test."""
    path = SHARED_DATA / name
    if not path.exists():
        reason = f"{path} is absent: the shared test data lives beside the project in ../shared/data"
        if os.environ.get("LLM_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{reason} (LLM_REQUIRE_SHARED_DATA=1: this checkout must have it)")
        pytest.skip(reason)
    return path


def pytest_collection_modifyitems(items):
    # `-m "not slow and not shared_data"` (make test-fast) is what runs without ../shared/data
    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared_data)
        if item.get_closest_marker("gpu") and not GPU_SESSION:
            item.add_marker(pytest.mark.skip(reason="a GPU test: `make test-gpu` runs it, with the GPUs visible"))


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return shared("tinyshakespeare.txt")


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Path:
    return shared("gpt2/tokenizer.json")


@pytest.fixture(scope="session")
def fixture_text() -> Path:
    """3.4 kB of prose written for these tests (tests/fixtures/corpus.txt)."""
    return FIXTURES / "corpus.txt"


@pytest.fixture(scope="session")
def fixture_tokenizer() -> Path:
    """A 512-token byte-level BPE tokenizer.json trained on fixture_text: a ready-made tokenizer, as
    --data.tokenizer takes, without the shared data (tests/fixtures/README.md says how it was made)."""
    return FIXTURES / "bpe-512.json"


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, request) -> Path:
    """A folder of this session that every test worker shares (`make test` runs two: pytest-xdist)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if hasattr(request.config, "workerinput") else base) / "shared"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def data_cache(shared_dir) -> Path:
    """One prepared-data cache for the whole session: the same inputs are prepared once (the
    preparation's own lock keeps two workers from preparing them twice)."""
    return shared_dir / "data"


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No network in tests, W&B offline, and the datasets cache out of the user's home. (Inductor's
    cache stays where torch keeps it: a graph compiled by one run is not compiled again by the next.)"""
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets"))
    os.environ.pop("WANDB_API_KEY", None)


@pytest.fixture(scope="session")
def code_corpus(shared_dir) -> Path:
    """~400 kB of Python source in one text file: quick to prepare, no shared data needed."""
    import email
    import json as json_module
    import typing

    path = shared_dir / "corpus" / "code.txt"
    with exclusive(shared_dir / "corpus.lock"):
        if not path.exists():  # written once: its size and time are part of the prepared data's key
            sources = [Path(m.__file__).read_text() for m in (typing, json_module.decoder, json_module.encoder)]
            sources += [p.read_text() for p in sorted(Path(email.__file__).parent.glob("*.py"))]
            path.parent.mkdir(exist_ok=True)
            path.write_text("\n\n".join(sources))
    return path


@pytest.fixture(scope="session")
def runs(shared_dir, code_corpus, data_cache) -> Runs:
    """The trained runs the tests share (support.CANONICAL), each trained once on first use."""
    return Runs(shared_dir / "runs", code_corpus, data_cache)


@pytest.fixture
def experiment(request):
    """A unique experiment name; the run folders it leaves in runs/ go at the end."""
    name = f"test-{request.node.name[:40]}-{os.getpid()}".replace("[", "-").replace("]", "")
    yield name
    for folder in (REPO / "runs").glob(f"{name}-*"):
        shutil.rmtree(folder, ignore_errors=True)
