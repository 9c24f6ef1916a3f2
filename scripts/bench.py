"""`make bench`: the project's trainer against its references, and `make prepare` against a plain
tokenizer loop, in one process; a table on the terminal and one JSON file.

A path is a way to train: eager, compiled, or a ZeRO preset. Its reference is a plain PyTorch loop
(scripts/raw_loop.py), or for a ZeRO preset DeepSpeed's own engine with the same config, driven
by hand. The two sides of a path run the same model, data, optimizer, schedule, clipping and
precision, interleaved in blocks (trainer, reference, then reference, trainer, ...) after warm-up,
because absolute times on a shared machine drift by 20% from one minute to the next and only a
ratio taken side by side means anything. Step time is the wall time between the ends of
consecutive optimizer steps, data loading included; compilation happens in the warm-up steps. The
trainer side is Lightning's Trainer with the run's LanguageModel, strategy, TokenDataModule,
PerformanceMonitor and CSV logging, without validation and checkpoints (they are not per-step
costs).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `python -m llm` sets it

import torch  # noqa: E402
import yaml  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as `python -m llm` sets it
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # lightning 2.6 on torch 2.13

from bench_distill import compare_distill, distill_line  # noqa: E402
from bench_paths import BenchPath, device, reference_block, trainer_block  # noqa: E402

from llm.model import ModelConfig, count_params, flops_per_token  # noqa: E402

SHARED = Path(os.environ.get("LLM_SHARED_DATA", REPO.parent / "shared" / "data"))
MODELS = {  # name -> (architecture, sequences per micro-batch)
    "tiny": ({**yaml.safe_load((REPO / "configs/model/tiny.yaml").read_text())}, 32),
    "10m": ({"block_size": 128, "n_layer": 6, "n_head": 5, "n_embd": 320}, 16),  # 10.0M with 8192 tokens
    "gpt2-124m": ({**yaml.safe_load((REPO / "configs/model/gpt2-124m.yaml").read_text())}, 16),
}


def compare(
    path: BenchPath,
    name: str,
    precision: str,
    data_kwargs: dict,
    vocab: int,
    rounds: int,
    steps: int,
    warmup: int,
    tmp: Path,
) -> dict:
    """Median step time, tokens/s, MFU and peak memory of a path through the trainer and through its
    reference, and their ratio."""
    from llm.train.monitor import training_dtype
    from llm.train.peaks import find_peak

    fields, batch = MODELS[name]
    config = ModelConfig(**{**fields, "vocab_size": fields.get("vocab_size") or vocab})
    data_kwargs = {**data_kwargs, "block_size": config.block_size, "batch_size": batch}
    peak = find_peak(device(), training_dtype(precision))
    times = {"trainer": [], "reference": []}
    cpu_times = {"trainer": [], "reference": []}
    memory = {"trainer": 0.0, "reference": 0.0}
    paired = []  # trainer / reference per round: the two blocks of a round ran next to each other in time
    for r in range(rounds):
        medians = {}
        for side in ("trainer", "reference") if r % 2 == 0 else ("reference", "trainer"):
            if device().type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if side == "trainer":
                clock = trainer_block(path, config, data_kwargs, precision, steps + warmup, tmp)
            else:
                clock = reference_block(path, config, data_kwargs, precision, steps + warmup)
            times[side] += clock.step_times(warmup)
            cpu_times[side] += clock.step_times(warmup, cpu=True)
            medians[side] = statistics.median(clock.step_times(warmup))
            memory[side] = max(memory[side], clock.peak)
        paired.append(medians["trainer"] / medians["reference"])
    tokens_per_step = batch * config.block_size
    fpt = flops_per_token(config)
    result = {
        "path": path.name,
        "reference_kind": path.reference,
        "deepspeed": path.deepspeed,
        "compile": path.compile,
        "model": name,
        "params": count_params(config),
        "precision": precision,
        "batch": batch,
        "block_size": config.block_size,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": fpt,
        "peak_flops": peak.flops,
        "peak_flops_source": peak.source,
        "steps_measured": len(times["trainer"]),
    }
    for side, values in times.items():
        median = statistics.median(values)
        q = statistics.quantiles(values, n=10) if len(values) > 1 else [median] * 9
        result[side] = {
            "median_step_seconds": median,
            "p10_step_seconds": q[0],
            "p90_step_seconds": q[-1],
            "tokens_per_sec": tokens_per_step / median,
            "mfu": tokens_per_step / median * fpt / peak.flops,
            "peak_memory_gib": memory[side] / 2**30,
            "median_cpu_seconds_per_step": statistics.median(cpu_times[side]),
        }
    trainer, reference = result["trainer"], result["reference"]
    result["ratio_trainer_to_reference"] = trainer["median_step_seconds"] / reference["median_step_seconds"]
    result["overhead_percent"] = 100 * (result["ratio_trainer_to_reference"] - 1)
    result["paired_round_ratios"] = paired
    result["cpu_time_ratio"] = trainer["median_cpu_seconds_per_step"] / reference["median_cpu_seconds_per_step"]
    result["overhead_percent_paired_median"] = 100 * (statistics.median(paired) - 1)
    return result


def prepare_bench(quick: bool, tmp: Path) -> dict:
    """`make prepare` (datasets.map on every core) against one process calling tokenizer.encode on
    the same documents, in the same way: as text (quoted special tokens included), each followed by
    an end-of-text token, empty ones skipped. Both must count the same tokens."""
    from tokenizers import Tokenizer

    from llm.config import PrepareConfig
    from llm.data.prepare import load_meta, prepare
    from llm.data.sources import stdlib_files
    from llm.data.tokenizer import ordinary

    tokenizer = SHARED / "gpt2" / "tokenizer.json"
    if not tokenizer.is_file():
        return {"skipped": f"{tokenizer} is absent (the GPT-2 tokenizer lives in ../shared/data)"}
    files, text = stdlib_files(), None
    if quick:  # 120 of those files as a folder of text files
        folder = tmp / "prep-corpus"
        folder.mkdir()
        for i, path in enumerate(files[:120]):
            (folder / f"{i:03d}-{path.stem}.txt").write_text(path.read_text(errors="replace"))
        files, text = sorted(folder.glob("*.txt")), str(folder)
    start = time.perf_counter()
    config = PrepareConfig(text=text, tokenizer=str(tokenizer), cache_dir=str(tmp / "prep"))
    prepared = prepare(config, log=lambda *_: None)
    prep_seconds = time.perf_counter() - start
    meta = load_meta(prepared)
    prep_tokens = sum(s["tokens"] for s in meta["splits"].values())

    tok = ordinary(Tokenizer.from_file(str(tokenizer)))
    start, loop_tokens = time.perf_counter(), 0
    for path in files:
        document = path.read_text(errors="replace")
        if document.strip():
            loop_tokens += len(tok.encode(document, add_special_tokens=False).ids) + 1
    loop_seconds = time.perf_counter() - start
    return {
        "corpus": text or "the embedded corpus (standard library .py files)",
        "files": len(files),
        "tokenizer": str(tokenizer),
        "num_proc": os.cpu_count(),
        "prepare": {"tokens": prep_tokens, "seconds": prep_seconds, "tokens_per_sec": prep_tokens / prep_seconds},
        "plain_loop": {"tokens": loop_tokens, "seconds": loop_seconds, "tokens_per_sec": loop_tokens / loop_seconds},
        "speedup": (prep_tokens / prep_seconds) / (loop_tokens / loop_seconds),
    }


def environment() -> dict:
    import datasets
    import deepspeed
    import lightning
    import tokenizers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "deepspeed": deepspeed.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def bench(
    quick: bool = False,
    out: str = "bench.json",
    paths: list[str] | None = None,
    models: list[str] | None = None,
    precisions: list[str] | None = None,
    rounds: int | None = None,
    steps: int | None = None,
    warmup: int = 2,
    num_workers: int = 0,
    distill: bool = True,
) -> dict:
    """Benchmark the trainer against its references, and data preparation against a plain loop.

    Args:
        quick: a few steps of the tiny model on a small text (what the tests run)
        out: the JSON file to write
        paths: eager, compiled (trainer against a plain torch loop), zero1, zero2, zero3 (trainer
            against DeepSpeed's engine with the same config), each DeepSpeed one also with -compiled
            (default: all five on a GPU; eager on CPU)
        models: which of tiny, 10m, gpt2-124m (default: tiny and 10m; tiny alone when quick)
        precisions: 32-true and/or bf16-mixed (default: both on CPU, bf16-mixed on GPU)
        rounds: blocks per side, alternating which side goes first (default 4 on CPU, 2 on GPU; 1 when quick)
        steps: measured steps per block (default 10; 3 when quick)
        warmup: steps per block before measuring
        num_workers: DataLoader workers on both sides
        distill: time the tiny model's step distilled from the 10m one against its plain step
    """
    import datasets

    from llm.config import PrepareConfig
    from llm.data.prepare import prepare
    from llm.train.loggers import quiet_lightning

    quiet_lightning()
    datasets.disable_progress_bars()  # the bench prints its own lines
    gpu = torch.cuda.is_available()
    paths = paths or (["eager", "compiled", "zero1", "zero2", "zero3"] if gpu else ["eager"])
    chosen = [BenchPath.parse(p) for p in paths]
    models = models or (["tiny"] if quick else ["gpt2-124m"] if gpu else ["tiny", "10m"])
    precisions = precisions or (["bf16-mixed"] if gpu else ["32-true", "bf16-mixed"])
    # a GPU's step times vary far less than those of a shared 2-core VM: fewer rounds say as much
    rounds, steps = rounds or (1 if quick else 2 if gpu else 4), steps or (3 if quick else 10)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if quick:  # a small text and a small BPE
            corpus = tmp / "small.txt"
            corpus.write_text(
                "\n\n".join(
                    Path(json.__file__).parent.joinpath(f).read_text()
                    for f in ("decoder.py", "encoder.py", "scanner.py")
                )
                * 4
            )
            data = {"text": str(corpus), "vocab_size": 512, "cache_dir": str(tmp / "data")}
        else:  # the embedded corpus and tokenizer of `make train`, from its cache in data/
            corpus, data = None, {"cache_dir": str(REPO / "data")}
        folder = prepare(PrepareConfig(**data), log=lambda *_: None)
        # in-process loading on both sides: on 2 cores a loader worker competes with the compute threads
        # and its jitter would drown a difference of a few percent; --num_workers sets another count
        data["num_workers"] = num_workers
        vocab = json.loads((folder / "meta.json").read_text())["vocab_size"]
        vocab = -(-vocab // 64) * 64
        results = {
            "settings": {
                "quick": quick,
                "paths": [p.name for p in chosen],
                "rounds": rounds,
                "steps_per_block": steps,
                "warmup_steps": warmup,
                "num_workers": data["num_workers"],
                "data": str(folder),
            },
            "environment": environment(),
            "training": [],
            "data_preparation": None,
            "distillation": None,
        }
        for path in chosen:
            for name in models:
                for precision in precisions:
                    print(f"bench: {path.name} {name} {precision} ...", file=sys.stderr, flush=True)
                    row = compare(path, name, precision, data, vocab, rounds, steps, warmup, tmp)
                    results["training"].append(row)
        if distill:
            print("bench: distillation ...", file=sys.stderr, flush=True)
            student, batch = MODELS["tiny"]
            teacher = MODELS["10m"][0]
            configs = [
                ModelConfig(**{**f, "vocab_size": vocab, "block_size": student["block_size"]})
                for f in (student, teacher)
            ]
            precision = "bf16-mixed" if gpu else "32-true"
            results["distillation"] = compare_distill(*configs, batch, data, precision, rounds, steps, warmup, tmp)
        print("bench: data preparation ...", file=sys.stderr, flush=True)
        results["data_preparation"] = prepare_bench(quick, tmp)
    eager = [r for r in results["training"] if r["path"] == "eager"]
    bf16 = {r["model"]: r for r in eager if r["precision"] == "bf16-mixed"}
    fp32 = {r["model"]: r for r in eager if r["precision"] == "32-true"}
    results["bf16_speedup"] = {
        m: bf16[m]["trainer"]["tokens_per_sec"] / fp32[m]["trainer"]["tokens_per_sec"] for m in bf16 if m in fp32
    }
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, out)
    return results


def print_table(results: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="each path through the trainer and through its reference (a plain torch loop, or DeepSpeed's engine "
        "with the same config): median step, p10-p90; overhead of the medians, and the median of the per-round "
        "ratios (paired)",
        title_justify="left",
    )
    for column in (
        "path",
        "model",
        "precision",
        "side",
        "step ms",
        "p10-p90 ms",
        "tokens/s",
        "MFU",
        "peak GiB",
        "overhead",
        "paired",
    ):
        table.add_column(column, justify="left" if column in ("path", "model", "precision", "side") else "right")
    for r in results["training"]:
        for side in ("trainer", "reference"):
            s = r[side]
            table.add_row(
                r["path"],
                r["model"],
                r["precision"],
                side if side == "trainer" else r["reference_kind"],
                f"{s['median_step_seconds'] * 1e3:,.1f}",
                f"{s['p10_step_seconds'] * 1e3:,.0f}-{s['p90_step_seconds'] * 1e3:,.0f}",
                f"{s['tokens_per_sec']:,.0f}",
                f"{s['mfu']:.1%}",
                f"{s['peak_memory_gib']:.2f}",
                f"{r['overhead_percent']:+.1f}%" if side == "trainer" else "",
                f"{r['overhead_percent_paired_median']:+.1f}%" if side == "trainer" else "",
            )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    for model, speedup in results["bf16_speedup"].items():
        console.print(f"bf16-mixed / 32-true tokens/s, {model}: {speedup:.2f}x")
    prep = results["data_preparation"]
    if "skipped" in prep:
        console.print(f"data preparation: skipped, {prep['skipped']}")
    else:
        console.print(
            f"data preparation ({prep['files']} files, GPT-2 tokenizer): make prepare "
            f"{prep['prepare']['tokens_per_sec']:,.0f} tokens/s on {prep['num_proc']} processes, a plain "
            f"loop {prep['plain_loop']['tokens_per_sec']:,.0f} tokens/s ({prep['speedup']:.2f}x)"
        )
    if results.get("distillation"):
        console.print(distill_line(results["distillation"]))
    peaks = {r["peak_flops_source"]: r["peak_flops"] for r in results["training"]}
    for source, flops in peaks.items():
        console.print(f"MFU against {flops / 1e12:,.2f} TFLOP/s ({source})")
    env = results["environment"]
    console.print(
        f"{env['cpu']}, {env['cpu_count']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
        f"GPU: {env['gpu'] or 'none'}. Written: {out}"
    )


if __name__ == "__main__":
    from llm.__main__ import function_cli
    from llm.argv import with_make_args
    from llm.errors import ConfigError

    try:
        function_cli(
            bench, with_make_args(sys.argv[1:])
        )  # bad options get one line, as every `python -m llm` command's do
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
