"""Shared fixtures: the shared data beside the project, and the real entry point in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLM_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = REPO / "tests" / "fixtures"  # small, in the repository: what a fork's CI runs the fast tests on
SHARED_FIXTURES = {"shakespeare", "gpt2_tokenizer"}  # tests using these are marked shared_data

# a model and run small enough for a 2-core CPU: a few seconds of training
TINY = [
    "--model.config.n_layer=2",
    "--model.config.n_head=2",
    "--model.config.n_embd=64",
    "--model.config.block_size=64",
    "--data.batch_size=8",
    "--data.val_batches=2",
    "--data.num_workers=0",
]


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


def corpus_fit(corpus: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    """`python -m llm fit` arguments: the default experiment at TINY size on `corpus`, with a
    512-token BPE trained on it, into `run`; `extra` overrides come last and win."""
    return [
        "fit",
        "--config",
        "configs/experiment/default.yaml",
        *TINY,
        f"--data.text={corpus}",
        "--data.vocab_size=512",
        f"--data.cache_dir={cache}",
        f"--run={run}",
        *extra,
    ]


def assert_refused(result, *fragments: str) -> str:
    """Bad input's answer: exit status 2, one line on stderr, `error: ` and each fragment in it."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = program_stderr(result.stderr)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr[-3000:]}"
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def word_tokenizer(path: Path, size: int) -> Path:
    """A tokenizer.json of `size` whole-word tokens, the last one <|endoftext|>: a large vocabulary
    without the shared data."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


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
def data_cache(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session: the same inputs are prepared once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No network in tests, W&B offline, and the datasets cache out of the user's home."""
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets"))
    os.environ.pop("WANDB_API_KEY", None)


def run_llm(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """`python -m llm <args>` as a user runs it; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "llm", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# make's own "make: *** [train] Error 2" (or "make[1]: ***" when make runs inside make, as in CI)
MAKE_ERROR = re.compile(r"^make(\[\d+\])?: \*\*\*")


def wandb_records(wandb_run: Path) -> list[dict]:
    """The records of an offline W&B run folder, as W&B's own reader prints them."""
    import json

    wandb = Path(sys.executable).with_name("wandb")
    command = [str(wandb), "leet", "inspect", "--json", str(wandb_run)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def program_stderr(stderr: str) -> list[str]:
    """The non-empty stderr lines the program wrote, without the ones make adds after it."""
    return [line for line in stderr.splitlines() if line.strip() and not MAKE_ERROR.match(line)]


def trained_steps(stdout: str) -> list[int]:
    """The optimizer steps a process trained, from its plain progress lines ("step 5/8 | loss ...",
    printed at every logging step when the output is not a terminal)."""
    return [int(m.group(1)) for m in re.finditer(r"^step (\d+)/\d+ \| loss ", stdout, re.M)]


def snapshot(folder: Path) -> dict:
    """Every file under folder with its size, modification time and bytes: to prove nothing changed."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> Path:
    """~400 kB of Python source in one text file: quick to prepare, no shared data needed."""
    import email
    import json as json_module
    import typing

    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    sources = [Path(m.__file__).read_text() for m in (typing, json_module.decoder, json_module.encoder)]
    sources += [p.read_text() for p in sorted(Path(email.__file__).parent.glob("*.py"))]
    path.write_text("\n\n".join(sources))
    return path
