"""The metrics a training run logs, declared once. `make plot`'s charts and `make wandb-dashboard`'s
panels are built from this list, and the tests check it against what a real run logs (every key
declared is logged, every key logged is declared), so a new metric is added here and nowhere else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SECTIONS = ("Loss", "Optimizer", "Throughput", "Memory", "Distillation", "Benchmarks")
STEP = "trainer/global_step"  # the optimizer step, as Lightning's W&B logger writes it beside each row
TOKENS = "train/tokens"  # tokens trained so far, the whole job's: the other x-axis
X_AXES = {"step": STEP, "tokens": TOKENS}


@dataclass(frozen=True)
class Chart:
    section: str  # one of SECTIONS
    title: str
    unit: str  # the y axis
    series: tuple[tuple[str, str], ...]  # (key, legend)
    only: str | None = None  # logged by some runs only: "distill" (make distill), "benchmarks" (--eval_tasks=)
    pattern: str | None = None  # a family of keys, one series each, matched by this regular expression

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.series]

    def matches(self, key: str) -> bool:
        return key in self.keys or bool(self.pattern and re.fullmatch(self.pattern, key))


def _memory(name: str, title: str) -> Chart:
    return Chart("Memory", title, "GiB", ((f"mem/{name}_max", "max over ranks"), (f"mem/{name}_min", "min over ranks")))


CHARTS = (
    Chart("Loss", "Loss", "nats per token", (("train/loss", "train"), ("val/loss", "validation"))),
    Chart("Loss", "Bits per byte", "bits per byte of text", (("val/bpb", "validation"),)),
    Chart("Loss", "Perplexity", "perplexity", (("val/ppl", "validation"),)),
    Chart("Optimizer", "Learning rate", "learning rate", (("train/lr", "learning rate"),)),
    Chart("Optimizer", "Gradient norm", "L2 norm before clipping", (("train/grad_norm", "gradient norm"),)),
    Chart("Optimizer", "Skipped steps", "steps so far", (("train/skipped_steps", "non-finite, skipped"),)),
    Chart(
        "Throughput",
        "Tokens per second",
        "tokens / s",
        (("perf/tokens_per_sec", "all devices"), ("perf/tokens_per_sec_per_device", "per device")),
    ),
    Chart("Throughput", "Samples per second", "samples / s", (("perf/samples_per_sec", "all devices"),)),
    Chart("Throughput", "Model FLOPs utilisation", "MFU", (("perf/mfu", "MFU"),)),
    Chart("Throughput", "Step time", "seconds per optimizer step", (("perf/step_time", "step time"),)),
    Chart("Throughput", "Data wait", "fraction of the step", (("perf/data_wait_frac", "waiting for data"),)),
    Chart("Throughput", "Checkpoint saves", "seconds per save", (("perf/save_seconds", "save"),)),
    _memory("allocated", "Allocated"),
    _memory("reserved", "Reserved"),
    _memory("peak", "Peak allocated"),
    _memory("host_rss", "Host RSS"),
    Chart(
        "Distillation",
        "Loss terms",
        "nats per token",
        (("train/ce_loss", "CE on the data"), ("train/kd_loss", "T²·KL to the teacher")),
        only="distill",
    ),
    Chart("Distillation", "KL to the teacher", "nats per token, T = 1", (("val/kd", "validation"),), only="distill"),
    # --eval_tasks=: each task's metrics at each validation, eval/<task>/<metric> (benchmark_key)
    Chart("Benchmarks", "Benchmark scores", "score", (), only="benchmarks", pattern=r"eval/[^/]+/[^/]+"),
    Chart(
        "Benchmarks",
        "Benchmark time",
        "seconds per validation",
        (("perf/eval_seconds", "lm-eval tasks"),),
        only="benchmarks",
    ),
)


def charts(section: str) -> list[Chart]:
    return [c for c in CHARTS if c.section == section]


def logged_keys(*only: str) -> set[str]:
    """The keys every training run logs, with those the runs named in `only` add ("distill",
    "benchmarks"); a pattern's keys are the run's own (declared)."""
    return {TOKENS} | {key for c in CHARTS if c.only is None or c.only in only for key in c.keys}


def declared(key: str) -> bool:
    """Whether a logged key is one a chart shows."""
    return key == TOKENS or any(c.matches(key) for c in CHARTS)


def benchmark_key(task: str, metric: str) -> str:
    """A benchmark's score as logged during training (--eval_tasks=) and by make eval TASKS=."""
    return f"eval/{task}/{metric}"


def bits_per_byte(loss_nats, tokens: int, n_bytes: int):
    """Nats per token to bits per byte of text, comparable across tokenizers: the split's tokens
    carry its bytes, so loss·tokens/bytes is nats per byte."""
    return loss_nats * tokens / (n_bytes * math.log(2))
