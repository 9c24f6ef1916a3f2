"""What the tests share: the entry point as a user runs it (a subprocess) or as a refusal is checked
(in this process), the reading of its output, and the trained runs that many tests read.

The trained runs are the suite's main cost, so each is trained once per session, on first use,
with one set of settings (CANONICAL) whatever the strategy: a test compares any two of them, or a
stopped-and-resumed run with the uninterrupted one, without training a reference of its own.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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

# --- the entry point --------------------------------------------------------------------------------


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


@dataclass
class Answer:
    returncode: int
    stdout: str
    stderr: str


def llm_here(*args: str, env: dict | None = None) -> Answer:
    """`python -m llm <args>` called in this process, for answers that come before any training
    (a refusal is decided before anything expensive starts): no interpreter to start, no torch,
    Lightning and DeepSpeed to import again. The environment, argv and working folder are restored."""
    from llm.__main__ import main

    saved_env, saved_argv, saved_cwd = dict(os.environ), list(sys.argv), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.environ.update(env or {})
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if "wandb" in sys.modules:  # W&B keeps the settings (WANDB_MODE, ...) of its first run per process
            sys.modules["wandb"].teardown()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return Answer(code, out.getvalue(), err.getvalue())


# make's own "make: *** [train] Error 2" (or "make[1]: ***" when make runs inside make, as in CI)
MAKE_ERROR = re.compile(r"^make(\[\d+\])?: \*\*\*")


def program_stderr(stderr: str) -> list[str]:
    """The non-empty stderr lines the program wrote, without the ones make adds after it."""
    return [line for line in stderr.splitlines() if line.strip() and not MAKE_ERROR.match(line)]


def assert_refused(result, *fragments: str) -> str:
    """Bad input's answer: exit status 2, one line on stderr, `error: ` and each fragment in it."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = program_stderr(result.stderr)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr[-3000:]}"
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


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


def wandb_records(wandb_run: Path) -> list[dict]:
    """The records of an offline W&B run folder, as W&B's own reader prints them."""
    wandb = Path(sys.executable).with_name("wandb")
    command = [str(wandb), "leet", "inspect", "--json", str(wandb_run)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def metrics_rows(run: Path) -> dict[int, dict]:
    """metrics.csv by step (steps done, from 1, as the console counts them), empty cells left out."""
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): {k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)}


def column(run: Path, key: str) -> dict[int, float]:
    return {step: float(row[key]) for step, row in metrics_rows(run).items() if key in row}


def losses(run: Path) -> dict[int, float]:
    return column(run, "train/loss")


def word_tokenizer(path: Path, size: int) -> Path:
    """A tokenizer.json of `size` whole-word tokens, the last one <|endoftext|>: a large vocabulary
    without the shared data."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


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


def callbacks(*specs: str) -> str:
    """--trainer.callbacks of tests/helpers.py classes: callbacks("BatchRecord", '{"class_path": ...}')."""
    items = [s if s.startswith("{") else json.dumps({"class_path": f"tests.helpers.{s}"}) for s in specs]
    return "--trainer.callbacks=[" + ", ".join(items) + "]"


# --- the trained runs the tests share ------------------------------------------------------------------

# weights of 16k elements or more, so that ZeRO-3 partitions nearly all of them (the presets keep
# tensors under 1e4 elements whole on every rank, as they cost more to gather than to hold)
CANONICAL_MODEL = [
    "--model.config.n_layer=2",
    "--model.config.n_head=2",
    "--model.config.n_embd=128",
    "--model.config.block_size=64",
    "--data.batch_size=4",
    "--data.val_batches=2",
    "--data.num_workers=0",
    "--data.vocab_size=512",
]
STEPS = 12
# the canonical model as a Llama (rotary positions, RMSNorm, SwiGLU, grouped-query attention, untied)
LLAMA = [
    "--model.config.mlp=swiglu",
    "--model.config.norm=rmsnorm",
    "--model.config.position=rope",
    "--model.config.bias=false",
    "--model.config.n_kv_head=1",
    "--model.config.tie_embeddings=false",
]
CANONICAL_CADENCE = [
    f"--trainer.max_steps={STEPS}",
    "--trainer.log_every_n_steps=1",
    "--eval_every=4",  # validations after steps 4, 8 and 12
    "--save_every=2",
    "--model.optimizer.warmup_steps=4",  # warm-up to step 4, cosine to lr * min_lr_ratio at step 12
    "--collective_timeout=120",  # a run that hangs fails its test in 2 minutes, not 10
]
# every canonical run records its batches (BatchRecord) and what each rank holds at the end (EngineProbe)
PROBES = ("BatchRecord", "EngineProbe")
# secrets in the environment of the runs, which nothing they write may contain, and where a user
# sends the W&B runs
FAKE_HF_TOKEN = "hf_" + "Zq7WkP3xR9mT2vL8nB4yC6dF1gH5jK0s"
FAKE_WANDB_KEY = "f00dfeed" * 5
RUN_ENV = {
    "HF_TOKEN": FAKE_HF_TOKEN,
    "WANDB_API_KEY": FAKE_WANDB_KEY,
    "WANDB_MODE": "offline",
    "WANDB_PROJECT": "llm-tests",
    "WANDB_ENTITY": "a-team",
}
# the benchmark every run can score offline, on a few of its questions (llm/benchmarks/continuation.py)
EVAL_LIMIT = 16
IN_LOOP_EVAL = ["--eval_tasks=val_continuation", f"--eval_limit={EVAL_LIMIT}"]
# name -> what makes it differ from the one-process run
COMPILE = "--model.compile=true"
CANONICAL = {
    "single": ["--wandb_log_model=true"],
    # eager, all of them: every curve is compared with DDP's. Each strategy's compiled run is a variant
    # compared with its eager run in make test-long (test_deepspeed.py): a compile on a cold cache (a
    # fresh clone: the cache keys hold the source's path) costs about a minute a process on a CPU
    # with lm-eval's scores at each validation (--eval_tasks=), as every rank scores a share: the
    # in-loop scores are compared with make eval's of the same checkpoints (test_in_loop_eval.py)
    "ddp": ["--trainer.devices=2", "--peak_flops=2e9", *IN_LOOP_EVAL],
    **{p: ["--trainer.devices=2", f"--deepspeed={p}"] for p in ("zero1", "zero2", "zero2_offload")},
    # ZeRO-3 keeps every checkpoint: a test resumes from the one of step 6
    "zero3": ["--trainer.devices=2", "--deepspeed=zero3", "--keep_last=6", *IN_LOOP_EVAL],
    # recomputing each block in backward is checked here, where ZeRO-3 gathers its partitions twice
    "zero3_offload": ["--trainer.devices=2", "--deepspeed=zero3_offload", "--model.activation_checkpointing=true"],
}
# the runs whose W&B records tests read; the others leave W&B out (WANDB_MODE=disabled)
WITH_WANDB = {"single", "zero2", "evaluated"}
EXTRA_PROBES = {
    "zero3_offload": ("BlockForwardCount",),  # counts forward calls; it would break a compiled graph
    # rank 1 ends each validation 2 s after rank 0: the ranks must still agree on the best checkpoint
    "ddp": ('{"class_path": "tests.helpers.SlowRank", "init_args": {"rank": 1, "seconds": 2}}',),
}


@contextlib.contextmanager
def exclusive(path: Path):
    """Held by one process at a time (the test workers of `make test` share the trained runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Runs:
    """The canonical runs (and variants of them), each trained once per session on first use, by
    whichever test worker asks first (the others wait for it): `runs("zero2")` is the folder of the
    2-process ZeRO-2 run; `runs("name", *extra)` a variant."""

    def __init__(self, root: Path, corpus: Path, cache: Path):
        self.root, self.corpus, self.cache = root, corpus, cache

    def args(self, folder: Path, *extra: str, probes: tuple[str, ...] = PROBES) -> list[str]:
        """The canonical run's arguments into `folder`; `extra` comes last and wins."""
        return [
            "fit",
            "--config",
            "configs/experiment/default.yaml",
            *CANONICAL_MODEL,
            f"--data.text={self.corpus}",
            f"--data.cache_dir={self.cache}",
            f"--run={folder}",
            *CANONICAL_CADENCE,
            *([callbacks(*probes)] if probes else []),
            *extra,
        ]

    def __call__(self, name: str, *extra: str, probes: tuple[str, ...] | None = None, here: bool = False) -> Path:
        """The run's folder, trained on first use: in a process of its own, as `make train` runs it,
        or in this one (`here`, and the canonical one-process run): a one-process run without compile
        or DeepSpeed, which then pays no interpreter start and imports."""
        key = (name, *extra, *(probes or ()))
        folder = self.root / "-".join(re.sub(r"\W+", "_", k).strip("_") for k in key)[:120]
        done = folder / "stdout.txt"  # written last: the run is complete
        with exclusive(folder.with_name(folder.name + ".lock")):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
                probes = PROBES + EXTRA_PROBES.get(name, ()) if probes is None else probes
                args = self.args(folder, *CANONICAL.get(name, []), *extra, probes=probes)
                env = RUN_ENV if name in WITH_WANDB else {**RUN_ENV, "WANDB_MODE": "disabled"}
                in_process = here or key == ("single",)
                result = (llm_here if in_process else run_llm)(*args, env=env)
                assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
                done.write_text(result.stdout)
        return folder


def batches(run: Path, rank: int = 0) -> list[tuple[int, int]]:
    """(step, checksum) of every batch a rank trained on, in order (tests/helpers.py BatchRecord)."""
    path = run / f"batches-rank{rank}.txt"
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines()] if path.exists() else []


def probes(run: Path, world: int) -> list[dict]:
    import torch

    return [torch.load(run / f"probe-rank{r}.pt", weights_only=True) for r in range(world)]


# --- the launchers' tests (test_multinode.py, test_cluster.py): a small model, run through make ---

SMALL = [
    "--model.config.n_layer=2",
    "--model.config.n_head=2",
    "--model.config.n_embd=64",
    "--model.config.block_size=64",
    "--data.batch_size=4",
    "--data.val_batches=2",
    "--data.num_workers=0",
    "--data.vocab_size=512",
    "--trainer.log_every_n_steps=1",
    "--eval_every=3",
]


def data_args(corpus: Path, cache: Path) -> str:
    return " ".join([*SMALL, f"--data.text={corpus}", f"--data.cache_dir={cache}"])


def make(*args: str, env: dict | None = None, timeout: int = 600, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        ["make", "-s", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def finish(process: subprocess.Popen, timeout: int = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


# a multiple-choice task over a local JSONL file, written as a user writes one (docs/evaluation.md)
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
